"""A save that fails midway (the disk fills on its third file) fails loudly, and the previous
checkpoint stays the newest: the tracker still names it, it loads, and the run continues from it."""

from __future__ import annotations

import errno

import pytest
from small_run import small_run

from omnicore.checkpoint.commit import read_tracker
from omnicore.checkpoint.native import NativeCheckpoint
from omnicore.checkpoint.safetensors_io import SafetensorsWriter


def test_disk_full_on_the_third_file_of_a_save_keeps_the_previous_checkpoint(tiny_hf, samples, tmp_path, monkeypatch):
    real_write = SafetensorsWriter.write
    opened: list[str] = []

    def filling_write(self, name, data):
        if str(self.path) not in opened:
            opened.append(str(self.path))
        if "iter_0000002" in str(self.path) and len([p for p in opened if "iter_0000002" in p]) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, name, data)

    monkeypatch.setattr(SafetensorsWriter, "write", filling_write)
    with pytest.raises(OSError, match="No space left on device"):
        small_run(tmp_path, tiny_hf, 3, samples, ["--checkpoint.save_interval=1"])
    run_dir = tmp_path / "run"
    assert read_tracker(run_dir) == "1"
    assert not (run_dir / "iter_0000002").exists()
    assert NativeCheckpoint(run_dir).meta["iteration"] == 1
    monkeypatch.setattr(SafetensorsWriter, "write", real_write)
    summary = small_run(tmp_path, tiny_hf, 3, samples, ["--checkpoint.save_interval=1"])  # continues from step 1
    assert summary["step"] == 3 and read_tracker(run_dir) == "3"
    assert not list(run_dir.glob(".tmp-*"))  # the failed save's leftovers are gone once a later save of that step commits
