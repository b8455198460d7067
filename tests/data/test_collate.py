"""Packed and padded micro-batches from processed samples give the same loss and logits."""

from __future__ import annotations

import pytest
import torch
from hf_reference import Piece, build_batch

import omnicore
from omnicore.config import TINY
from omnicore.data.collate import collate_packed, collate_padded
from omnicore.models.thinker import init_thinker

T, I, V, A, VA = "text", "image", "video", "audio", "video_audio"
SAMPLES = [
    [Piece(T, 3), Piece(I, grid=(1, 4, 6)), Piece(T, 4)],
    [Piece(T, 6)],
    [Piece(T, 2), Piece(A, 250), Piece(T, 5), Piece(A, 40)],
    [Piece(V, grid=(2, 4, 4)), Piece(T, 6)],
    [Piece(T, 2), Piece(VA, 300, grid=(2, 4, 4)), Piece(T, 2)],
]


def _sample(pieces, seed):
    """One processed sample (no batch dimension) in the pipeline's format."""
    b = build_batch(TINY, [pieces], seed=seed)
    sample = {"input_ids": b["input_ids"][0], "labels": b["labels"][0]}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        if key in b:
            sample[key] = b[key]
    if "input_features" in b:
        mask = b["feature_attention_mask"].bool()
        sample["input_features"] = b["input_features"].transpose(1, 2)[mask].T
        sample["audio_feature_lengths"] = mask.sum(1)
    inputs = omnicore.prepare_inputs(TINY, {k: v for k, v in b.items() if k != "use_audio_in_video"})
    sample["position_ids"] = inputs.positions
    return sample


@pytest.fixture(scope="module")
def samples():
    return [_sample(p, i) for i, p in enumerate(SAMPLES)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_and_padded_give_the_same_loss(samples, side):
    params = init_thinker(TINY, seed=0, std=0.2)
    packed, padded = collate_packed(samples), collate_padded(samples, side=side)
    assert packed["cu_seqlens"].tolist()[-1] == sum(s["input_ids"].numel() for s in samples)
    assert packed["input_features"].shape[1] == int(packed["audio_feature_lengths"].sum())
    loss_packed = omnicore.thinker_loss(params, TINY, packed)
    loss_padded = omnicore.thinker_loss(params, TINY, padded)
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-6)
    logits = omnicore.thinker_logits(params, TINY, padded)
    assert torch.allclose(omnicore.thinker_logits(params, TINY, packed)[0], logits[padded["attention_mask"].bool()], atol=1e-5)


def test_given_positions_equal_computed_ones(samples):
    packed = collate_packed(samples)
    computed = omnicore.prepare_inputs(TINY, {k: v for k, v in packed.items() if k != "position_ids"}).positions
    assert torch.equal(omnicore.prepare_inputs(TINY, packed).positions, computed)


def test_empty_micro_batch_is_refused():
    with pytest.raises(ValueError, match="empty micro-batch"):
        collate_packed([])
