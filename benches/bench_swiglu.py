"""SwiGLU: the `cpu` ops backend vs ops/ref.py (silu(gate) * up), forward and forward + backward.

Shapes from the 7B config, fewer tokens: text MLP 256 x 18944, vision MLP 1024 x 3420, and tiny
16 x 64 (the audio tower's MLP is GELU); fp32 and bf16, gate and up both trainable activations.
Correctness first, on the same inputs: output and both gradients (fp32 atol 1e-5 + rtol 1e-6;
bf16 atol 2e-2 + two ulps). The gate (benches/thresholds.toml [swiglu], "not slower": median +
IQR / 2 >= 1.0) applies to forward + backward, the training step (the forward ratio, where the
in-place product differs, is recorded too), on every shape but "tiny", where both sides take
microseconds and the ratio measures Python overhead.

    python -m pytest benches/bench_swiglu.py -s -p no:cacheprovider                 # timed gate
    python -m pytest benches/bench_swiglu.py -s -p no:cacheprovider --bench-quick   # correctness (CI)
"""

from __future__ import annotations

import pytest
import torch
from common import check_close, forward_backward, omni_7b, thresholds, time_and_gate_elementwise

from omnicore import ops

CFG = omni_7b()
SHAPES = {"text": (256, CFG.text.ffn), "vision": (1024, CFG.vision.ffn), "tiny": (16, 64)}
GATED = ("text", "vision")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_vs_ref(shape, dtype, bench_rounds, benchmark, pytestconfig):
    backend = ops.resolve("cpu")
    g = torch.Generator().manual_seed(0)
    gate_in, up, grad_out = (torch.randn(*SHAPES[shape], generator=g).to(dtype) for _ in range(3))
    gate_in.requires_grad_(), up.requires_grad_()
    rounds = 3 * bench_rounds  # cheap calls: more rounds, a steadier median
    atol, rtol = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2**-6)

    diffs = {"forward": check_close(backend.swiglu(gate_in, up), ops.REF.swiglu(gate_in, up), atol, rtol, what=f"{shape} forward")}
    steps = {name: forward_backward(o.swiglu, (gate_in, up), grad_out) for name, o in (("ref", ops.REF), ("ops", backend))}
    for name, a, b in zip(("d_gate", "d_up"), steps["ops"](), steps["ref"]()):
        diffs[name] = check_close(a, b, atol, rtol, what=f"{shape} {name}")

    time_and_gate_elementwise(
        benchmark, op="swiglu", shape=shape, dims=SHAPES[shape], dtype=dtype, backend_name=backend.name, diffs=diffs,
        forward={"ref": lambda: ops.REF.swiglu(gate_in, up), "ops": lambda: backend.swiglu(gate_in, up)}, steps=steps, rounds=rounds,
        threshold=thresholds("swiglu")["swiglu_vs_ref"] if shape in GATED else None, quick=pytestconfig.getoption("--bench-quick"),
    )  # fmt: skip
