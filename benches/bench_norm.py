"""RMSNorm: the `cpu` ops backend vs ops/ref.py (HF Qwen2RMSNorm semantics), forward and forward + backward.

Shapes from the 7B config, fewer tokens: text 512 x 3584, vision 1024 x 1280 (the audio tower
uses LayerNorm, not RMSNorm), and tiny 16 x 64; fp32 and bf16, the weight trainable.
Correctness first, on the same inputs: output and both gradients (fp32 atol 1e-5 + rtol 1e-6;
bf16 atol 2e-2 + two ulps, the backward rounds once where autograd rounds each product; bf16
d_weight, a sum over rows of products the reference rounds one by one, atol two ulps of its
largest entry). The gate (benches/thresholds.toml [norm], "not slower": median + IQR / 2 >= 1.0)
applies to forward + backward, the training step (the forward ratio is recorded too), on every
shape but "tiny", where both sides take microseconds and the ratio measures Python overhead.

    python -m pytest benches/bench_norm.py -s -p no:cacheprovider                 # timed gate
    python -m pytest benches/bench_norm.py -s -p no:cacheprovider --bench-quick   # correctness (CI)
"""

from __future__ import annotations

import pytest
import torch
from common import check_close, forward_backward, omni_7b, thresholds, time_and_gate_elementwise

from omnicore import ops

CFG = omni_7b()
SHAPES = {
    "text": (512, CFG.text.hidden),
    "vision": (1024, CFG.vision.hidden),
    "tiny": (16, 64),
}
GATED = ("text", "vision")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_vs_ref(shape, dtype, bench_rounds, benchmark, pytestconfig):
    backend, eps = ops.resolve("cpu"), CFG.text.rms_eps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*SHAPES[shape], generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(SHAPES[shape][1], generator=g)).to(dtype).requires_grad_()
    grad_out = torch.randn(*SHAPES[shape], generator=g).to(dtype)
    rounds = 3 * bench_rounds  # cheap calls: more rounds, a steadier median
    atol, rtol = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2**-6)

    diffs = {"forward": check_close(backend.rms_norm(x, w, eps), ops.REF.rms_norm(x, w, eps), atol, rtol, what=f"{shape} forward")}
    steps = {
        name: forward_backward(lambda a, b, o=o: o.rms_norm(a, b, eps), (x, w), grad_out)
        for name, o in (("ref", ops.REF), ("ops", backend))
    }
    d_x, d_w = steps["ops"]()
    ref_d_x, ref_d_w = steps["ref"]()
    diffs["d_x"] = check_close(d_x, ref_d_x, atol, rtol, what=f"{shape} d_x")
    # d_weight sums one product per row; in bf16 the reference rounds each product before summing.
    w_atol = atol if dtype == torch.float32 else 2**-6 * ref_d_w.abs().max().item()
    diffs["d_weight"] = check_close(d_w, ref_d_w, w_atol, rtol, what=f"{shape} d_weight")

    time_and_gate_elementwise(
        benchmark, op="norm", shape=shape, dims=SHAPES[shape], dtype=dtype, backend_name=backend.name, diffs=diffs,
        forward={"ref": lambda: ops.REF.rms_norm(x, w, eps), "ops": lambda: backend.rms_norm(x, w, eps)}, steps=steps, rounds=rounds,
        threshold=thresholds("norm")["rms_norm_vs_ref"] if shape in GATED else None, quick=pytestconfig.getoption("--bench-quick"),
    )  # fmt: skip
