"""TP = 2 and TP = 4 (gloo, spawned processes, timeouts) equal TP = 1 on the tiny thinker with
4-head encoders (text: 4 query heads, 2 kv heads, so at TP 4 each kv head lives on two ranks): loss and every gathered gradient to
1e-5 relative (norm of the difference over the gradient's norm: sums over ranks add in another
order, so single elements may differ by a little more), for text, image, video, audio and mixed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_launch import launch  # noqa: E402
from tp_worker import CASES, loss_and_grads  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", [2, 4])
def test_tp_equals_one_process(tmp_path, size, case):
    _check(tmp_path, size, case, sequence_parallel=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["text", "mixed"])
@pytest.mark.parametrize("size", [2, 4])
def test_sequence_parallel_equals_one_process(tmp_path, size, case):
    """Sequence parallel on equals off (both equal one process); token counts not divisible by
    the TP size exercise the padding."""
    _check(tmp_path, size, case, sequence_parallel=True)


def _check(tmp_path, size, case, *, sequence_parallel):
    ref_loss, ref_grads = loss_and_grads(case)
    job = {"case": case, "out": str(tmp_path), "sequence_parallel": sequence_parallel}
    launch(size, ["tests/tp/tp_worker.py", json.dumps(job)], tmp_path / "logs", extra_paths=[str(Path(__file__).resolve().parent)])
    got = load_file(str(tmp_path / "result.safetensors"))
    assert torch.allclose(got["loss"][0], ref_loss, rtol=1e-5, atol=0)
    bad = []
    for name, ref in ref_grads.items():
        err, size_ = (got[name] - ref).norm(), ref.norm()
        if err > 1e-5 * max(size_, 1e-6):
            bad.append(f"{name}: |diff| {err:.3g} vs |grad| {size_:.3g}")
    assert not bad, "\n".join(bad)
