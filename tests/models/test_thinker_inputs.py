"""Batch handling: packed equals padded, given positions are used, bad batches raise named errors."""

from __future__ import annotations

import pytest
import torch
from hf_reference import Piece, build_batch

import omnicore
from omnicore.config import TINY
from omnicore.models.thinker import init_thinker

T, I, V, A = "text", "image", "video", "audio"
ROWS = [
    [Piece(T, 3), Piece(I, grid=(1, 4, 6)), Piece(T, 4)],
    [Piece(T, 2), Piece(A, 250), Piece(T, 5)],
    [Piece(V, grid=(2, 4, 4)), Piece(T, 6)],
]


@pytest.fixture(scope="module")
def params():
    return init_thinker(TINY, seed=0, std=0.25)


def _packed(batch):
    """The same samples without padding, back to back, with cu_seqlens."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    packed = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    packed["input_ids"] = batch["input_ids"][mask][None]
    packed["labels"] = batch["labels"][mask][None]
    packed["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return packed


@pytest.mark.parametrize("padding", ["left", "right"])
def test_packed_batch_equals_padded_batch(params, padding):
    batch = build_batch(TINY, ROWS, seed=4, padding=padding)
    padded_logits = omnicore.thinker_logits(params, TINY, batch)
    packed = _packed(batch)
    packed_logits = omnicore.thinker_logits(params, TINY, packed)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(packed_logits[0], padded_logits[mask], atol=1e-5, rtol=0)
    assert (padded_logits[~mask] == 0).all()
    assert torch.allclose(omnicore.thinker_loss(params, TINY, packed), omnicore.thinker_loss(params, TINY, batch), rtol=1e-6)


def test_given_position_ids_are_used(params):
    batch = build_batch(TINY, ROWS[:1], seed=2)
    inputs = omnicore.prepare_inputs(TINY, batch)
    shifted = {**batch, "position_ids": torch.zeros(3, *batch["input_ids"].shape, dtype=torch.long)}
    assert torch.equal(omnicore.prepare_inputs(TINY, shifted).positions, torch.zeros_like(inputs.positions))
    assert not torch.allclose(omnicore.thinker_loss(params, TINY, shifted), omnicore.thinker_loss(params, TINY, batch))


def test_sum_reduction_and_empty_targets(params):
    batch = build_batch(TINY, ROWS, seed=5)
    n = int((batch["labels"][:, 1:] != -100).sum())
    mean = omnicore.thinker_loss(params, TINY, batch)
    assert torch.allclose(omnicore.thinker_loss(params, TINY, batch, reduction="sum"), mean * n, rtol=1e-6)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    empty = omnicore.thinker_loss(leaves, TINY, batch)
    assert empty.item() == 0.0
    empty.backward()  # attached to the graph: a rank with no targets still joins the gradient reduction


def _without(batch, key):
    return {k: v for k, v in batch.items() if k != key}


def test_placeholder_count_mismatch_is_named():
    batch = build_batch(TINY, ROWS[:1], seed=1)
    batch["pixel_values"] = torch.randn(48, TINY.vision.patch_dim)
    batch["image_grid_thw"] = torch.tensor([[1, 4, 12]])
    with pytest.raises(ValueError, match="6 image placeholder token\\(s\\) but its image input produces 12"):
        omnicore.prepare_inputs(TINY, batch)
    with pytest.raises(ValueError, match="6 image placeholder token\\(s\\) but its image input produces 0"):
        omnicore.prepare_inputs(TINY, _without(build_batch(TINY, ROWS[:1]), "pixel_values"))


def test_audio_under_three_frames_is_named():
    batch = build_batch(TINY, [[Piece(T, 2), Piece(A, 3), Piece(T, 2)]])
    batch["feature_attention_mask"][0, 2:] = 0
    with pytest.raises(ValueError, match="audio too short: clip 0 has 2 mel frame"):
        omnicore.prepare_inputs(TINY, batch)


def test_missing_keys_and_flags_are_named():
    video = build_batch(TINY, ROWS[2:], seed=1)
    with pytest.raises(KeyError, match="video_second_per_grid"):
        omnicore.prepare_inputs(TINY, _without(video, "video_second_per_grid"))
    with pytest.raises(KeyError, match="no image_grid_thw"):
        omnicore.prepare_inputs(TINY, _without(build_batch(TINY, ROWS[:1]), "image_grid_thw"))
    with pytest.raises(ValueError, match="use_audio_in_video=True but 1 of 1 video"):
        omnicore.prepare_inputs(TINY, {**video, "use_audio_in_video": True})
    audio = build_batch(TINY, ROWS[1:2])
    with pytest.raises(KeyError, match="feature_attention_mask"):
        omnicore.prepare_inputs(TINY, _without(audio, "feature_attention_mask"))


def test_pixel_shape_mismatch_is_named(params):
    batch = build_batch(TINY, ROWS[:1])
    batch["pixel_values"] = batch["pixel_values"][:, :100]
    with pytest.raises(ValueError, match="pixel_values has shape \\(24, 100\\); the grids need \\(24, 1176\\)"):
        omnicore.thinker_logits(params, TINY, batch)
