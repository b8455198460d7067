"""LoRA under TP = 2 / 4 (gloo, spawned processes, timeouts) equals one process: loss and every
gathered adapter gradient to 1e-5 relative (norm of the difference over the gradient's norm), with
adapters on every linear of every tower (column and row parallel layers, kv heads copied at TP 4)."""

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
from lora_tp_worker import loss_and_grads  # noqa: E402


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size, case, sequence_parallel", [(2, "mixed", False), (2, "text", True), (4, "text", False)])
def test_lora_tp_equals_one_process(tmp_path, size, case, sequence_parallel):
    ref_loss, ref_grads = loss_and_grads(case)
    job = {"case": case, "out": str(tmp_path), "sequence_parallel": sequence_parallel}
    launch(size, ["tests/tp/lora_tp_worker.py", json.dumps(job)], tmp_path / "logs", extra_paths=[str(Path(__file__).resolve().parent)])
    got = load_file(str(tmp_path / "result.safetensors"))
    assert torch.allclose(got["loss"][0], ref_loss, rtol=1e-5, atol=0)
    assert set(got) - {"loss"} == set(ref_grads)
    bad = []
    for name, ref in ref_grads.items():
        err, norm = (got[name] - ref).norm(), ref.norm()
        if err > 1e-5 * max(norm, 1e-6) or (case == "mixed" and not norm > 0):
            bad.append(f"{name}: |diff| {err:.3g} vs |grad| {norm:.3g}")
    assert not bad, "\n".join(bad)
