"""The commit protocol's crash windows: a kill between an overwrite's two renames leaves the tracked
step set aside, whole; it still loads, and the next writer moves it back. What killed saves leave
behind (temporary folders, set-aside copies, a tracker's temporary file) is cleared by the next one."""

from __future__ import annotations

import json
import os

import pytest

import omnicore.checkpoint.commit as commit
from omnicore.checkpoint.commit import META, TRACKER, StepWriter, read_tracker
from omnicore.checkpoint.native import resolve_step


def _save(root, iteration, text, *, overwrite=False):
    with StepWriter(root, iteration=iteration, overwrite=overwrite) as step:
        step.write_text("data.json", json.dumps({"v": text}))
        return step.commit({"kind": "test"})


def test_a_kill_between_the_overwrite_renames_keeps_the_previous_step(tmp_path, monkeypatch):
    _save(tmp_path, 4, "first")
    real_rename, calls = os.rename, []

    def killed_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as SIGKILL would, after the old folder moved aside
        real_rename(src, dst)

    monkeypatch.setattr(commit.os, "rename", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, "second", overwrite=True)
    monkeypatch.setattr(commit.os, "rename", real_rename)
    assert not (tmp_path / "iter_0000004").exists() and read_tracker(tmp_path) == "4"
    found = resolve_step(tmp_path)
    assert found.name == ".old-iter_0000004" and json.loads((found / "data.json").read_text()) == {"v": "first"}

    (tmp_path / f".{TRACKER}.tmp-999").write_text("6")  # a tracker write killed before its rename
    (tmp_path / ".tmp-iter_0000006").mkdir()  # a save of step 6 killed midway
    _save(tmp_path, 8, "third")
    assert json.loads((tmp_path / "iter_0000004" / "data.json").read_text()) == {"v": "first"}  # moved back, whole
    assert (tmp_path / "iter_0000004" / META).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "iter_0000008", TRACKER]
