"""The whole thinker with each non-reference backend equals the thinker with `ops.REF`.

One batch exercising every op path: causal GQA text with 3-D rotary over two packed rows,
windowed vision attention with 2-D rotary (full and ragged windows), chunked audio attention.
The `npu` backend runs on the emulated torch_npu (as documented, not run on hardware); `cuda`
without flash-attn is the SDPA path, which runs on CPU tensors. fp32; tolerances: loss 1e-5
relative, every gradient max |diff| <= 1e-4 x its max |reference gradient|.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import Piece, build_batch

import omnicore
from omnicore import ops
from omnicore.config import TINY

ROWS = [
    [Piece("text", 3), Piece("image", grid=(1, 12, 8)), Piece("text", 4)],
    [Piece("text", 2), Piece("audio", 260), Piece("text", 5)],
]


def _loss_and_grads(params, batch, backend):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss = omnicore.thinker_loss(leaves, TINY, batch, ops=backend)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("name", ["cpu", "cuda", pytest.param("npu", marks=pytest.mark.as_documented)])
def test_thinker_with_backend_matches_reference(name, request):
    fake = request.getfixturevalue("fake_npu") if name == "npu" else None
    backend = {"cpu": ops.CPU, "cuda": ops.CUDA, "npu": ops.NPU}[name]
    params = omnicore.init_thinker(TINY, seed=0, std=0.05)
    batch = build_batch(TINY, ROWS, seed=3)
    ref_loss, ref_grads = _loss_and_grads(params, batch, ops.REF)
    loss, grads = _loss_and_grads(params, batch, backend)
    if fake is not None:
        kernels = {"npu_fusion_attention", "npu_rotary_mul", "npu_rms_norm", "npu_swiglu"}
        assert {call[0] for call in fake.calls} == kernels, "every op ran on the (emulated) kernel"
    assert torch.allclose(loss, ref_loss, rtol=1e-5), f"loss {loss.item()} vs reference {ref_loss.item()}"
    for key, want in ref_grads.items():
        if want is None:
            assert grads[key] is None, key
            continue
        diff = (grads[key] - want).abs()
        assert diff.max() <= 1e-4 * want.abs().max(), f"{key}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"
