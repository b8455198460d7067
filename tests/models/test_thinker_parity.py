"""End-to-end parity with transformers' Qwen2_5OmniThinkerForConditionalGeneration (4.52.4), fp32.

Tolerances: logits max |diff| <= 1e-5 x max |HF logit| over valid tokens; loss 1e-5 relative;
every parameter's gradient max |diff| <= 1e-4 x its max |HF gradient|; position ids and rope deltas
exactly equal. Weights go through HF's save_pretrained and omnicore's load_hf.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import Piece, build_batch, hf_kwargs

import omnicore
from omnicore.checkpoint.hf import native_to_hf
from omnicore.models.positions import MediaQueue, batch_positions

T, I, V, A, VA = "text", "image", "video", "audio", "video_audio"

CASES = {
    "text_only": [[Piece(T, 9)], [Piece(T, 5)]],
    "image": [[Piece(T, 3), Piece(I, grid=(1, 4, 6)), Piece(T, 4)]],
    "multi_image": [[Piece(I, grid=(1, 4, 4)), Piece(T, 2), Piece(I, grid=(1, 6, 8)), Piece(T, 3)]],
    "image_and_video": [[Piece(T, 2), Piece(I, grid=(1, 4, 6)), Piece(T, 2), Piece(V, grid=(2, 4, 4)), Piece(T, 3)]],
    "video_t3_fps1.5": [[Piece(T, 2), Piece(V, grid=(3, 6, 4), fps=1.5), Piece(T, 2)]],
    "audio_under_one_chunk": [[Piece(T, 2), Piece(A, 57), Piece(T, 3)]],
    "audio_two_chunks_and_rest": [[Piece(A, 450), Piece(T, 4)]],
    "multi_audio": [[Piece(A, 120), Piece(T, 2), Piece(A, 33)], [Piece(T, 3), Piece(A, 260)]],
    "audio_in_video": [[Piece(T, 2), Piece(VA, 400, grid=(4, 4, 4)), Piece(T, 3)]],
    "left_padding_mixed_rows": [[Piece(T, 2), Piece(I, grid=(1, 4, 4)), Piece(T, 6)], [Piece(T, 3), Piece(A, 90), Piece(T, 1)]],
    "grid_divisible_by_window": [[Piece(T, 1), Piece(I, grid=(1, 24, 24)), Piece(T, 2)]],
}
CONFIG_NAMES = ["tiny_gqa", "tiny_mha"]


def _hf_run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**hf_kwargs(batch))
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def _omni_run(params, cfg, batch):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with torch.no_grad():
        logits = omnicore.thinker_logits(leaves, cfg, batch, ops=omnicore.ops.CPU)
    loss = omnicore.thinker_loss(leaves, cfg, batch, ops=omnicore.ops.CPU)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    return logits, loss.detach(), grads


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("config_name", CONFIG_NAMES)
def test_logits_loss_and_gradients_match_hf(hf_pair, config_name, case):
    cfg, model, params, _ = hf_pair(config_name)
    batch = build_batch(cfg, CASES[case], seed=list(CASES).index(case))
    ref_logits, ref_loss, ref_grads = _hf_run(model, batch)
    logits, loss, grads = _omni_run(params, cfg, batch)

    valid = batch["attention_mask"].bool()
    scale = ref_logits[valid].abs().max()
    assert scale > 1.0, "logits should be O(1) for a meaningful comparison"
    diff = (logits[valid] - ref_logits[valid]).abs().max()
    assert diff <= 1e-5 * scale, f"logits differ by {diff:.3g} (max |logit| {scale:.3g})"
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0), f"loss {loss.item()} vs HF {ref_loss.item()}"

    bad = []
    for name, g in grads.items():
        ref = ref_grads[native_to_hf(name)]
        ref = torch.zeros_like(params[name]) if ref is None else ref
        g = torch.zeros_like(params[name]) if g is None else g
        top = ref.abs().max()
        err = (g - ref).abs().max()
        if err > 1e-4 * top or (top == 0 and err > 0):
            bad.append(f"{name}: max diff {err:.3g}, max |grad| {top:.3g}")
    assert not bad, "gradients differ:\n" + "\n".join(bad)


@pytest.mark.parametrize("case", CASES)
def test_position_ids_and_rope_deltas_match_hf(hf_pair, case):
    cfg, model, _, _ = hf_pair("tiny_gqa")
    batch = build_batch(cfg, CASES[case], seed=1)
    audio_frames = batch["feature_attention_mask"].sum(1) if "feature_attention_mask" in batch else None
    ref_pos, ref_delta = model.get_rope_index(
        batch["input_ids"],
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        batch["attention_mask"],
        batch.get("use_audio_in_video", False),
        audio_frames,
        batch.get("video_second_per_grid"),
    )
    media = MediaQueue(
        image_grids=batch.get("image_grid_thw", torch.zeros(0, 3)).tolist(),
        video_grids=batch.get("video_grid_thw", torch.zeros(0, 3)).tolist(),
        video_seconds_per_grid=batch.get("video_second_per_grid", torch.zeros(0)).tolist(),
        audio_mel_frames=[] if audio_frames is None else audio_frames.tolist(),
    )
    pos, delta = batch_positions(cfg, batch["input_ids"], batch["attention_mask"], media)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)
    # The thinker's own packed positions are the same values at the valid tokens.
    inputs = omnicore.prepare_inputs(cfg, batch)
    valid = batch["attention_mask"].bool()
    assert torch.equal(inputs.positions, ref_pos[:, valid])
    assert torch.equal(inputs.rope_deltas, ref_delta)
