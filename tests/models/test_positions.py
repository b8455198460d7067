"""3-D position ids: the reference's worked examples, packed restarts, and the chunking rule vs HF."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omnicore
from omnicore.config import TINY
from omnicore.models.positions import MediaQueue, PositionError, _chunk_bounds, sample_positions

tok = TINY.tokens


def test_image_worked_example():
    ids = [1, tok.vision_start] + [tok.image] * 6 + [tok.vision_end, 2]
    pos = sample_positions(TINY, ids, MediaQueue(image_grids=[(1, 4, 6)]))
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert int(pos.max()) + 1 - len(ids) == -3


def test_video_worked_example():
    ids = [1, tok.vision_start] + [tok.video] * 12 + [tok.vision_end, 2]
    pos = sample_positions(TINY, ids, MediaQueue(video_grids=[(3, 4, 4)], video_seconds_per_grid=[1.0]))
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 27, 27, 27, 27, 52, 52, 52, 52, 53, 54]
    assert pos[1, 2:6].tolist() == [2, 2, 3, 3] and pos[2, 2:6].tolist() == [2, 3, 2, 3]
    assert int(pos.max()) + 1 - len(ids) == 39


def test_audio_in_video_worked_example():
    # 2 text, both starts, video chunk 0 (8), audio 0..49, video chunk 1 (8), audio 50..99, both ends, 1 text
    body = [tok.video] * 8 + [tok.audio] * 50 + [tok.video] * 8 + [tok.audio] * 50
    ids = [1, 2, tok.vision_start, tok.audio_start] + body + [tok.audio_end, tok.vision_end, 3]
    media = MediaQueue(video_grids=[(4, 4, 4)], video_seconds_per_grid=[1.0], audio_mel_frames=[400])
    pos = sample_positions(TINY, ids, media)
    assert pos[:, :4].tolist() == [[0, 1, 2, 2]] * 3
    assert pos[0, 4:12].tolist() == [3] * 4 + [28] * 4 and pos[1, 4:12].tolist() == [3, 3, 4, 4] * 2
    assert pos[0, 12:62].tolist() == list(range(3, 53))
    assert pos[0, 62:70].tolist() == [53] * 4 + [78] * 4
    assert pos[0, 70:120].tolist() == list(range(53, 103))
    assert pos[:, 120:].tolist() == [[103, 103, 104]] * 3
    assert int(pos.max()) + 1 - len(ids) == -18


def test_packed_samples_restart_at_zero():
    img = [tok.vision_start] + [tok.image] * 6 + [tok.vision_end]
    first, second = [5, 6] + img, [7] + img + [8, 9]
    batch = {
        "input_ids": torch.tensor(first + second),
        "cu_seqlens": torch.tensor([0, len(first), len(first) + len(second)]),
        "image_grid_thw": torch.tensor([[1, 4, 6], [1, 4, 6]]),
        "pixel_values": torch.zeros(48, TINY.vision.patch_dim),
    }
    inputs = omnicore.prepare_inputs(TINY, batch)
    alone = [sample_positions(TINY, s, MediaQueue(image_grids=[(1, 4, 6)])) for s in (first, second)]
    assert torch.equal(inputs.positions, torch.cat(alone, dim=1))
    assert inputs.positions[0, len(first)].item() == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=30), st.sampled_from([10, 25, 50]))
def test_chunk_rule_matches_hf(hf_pair, steps, per_chunk):
    """HF's counter-based chunking (which lags when one step jumps a whole chunk) is reproduced."""
    _, model, _, _ = hf_pair("tiny_gqa")
    values = torch.tensor(steps).cumsum(0) - steps[0]
    start = 7
    assert _chunk_bounds(values, per_chunk) == model.get_chunked_index(values + start, per_chunk, start)


def test_layout_errors_name_the_problem():
    with pytest.raises(PositionError, match="needs 6 placeholder tokens, found 5"):
        sample_positions(TINY, [tok.vision_start] + [tok.image] * 5 + [tok.vision_end], MediaQueue(image_grids=[(1, 4, 6)]))
    with pytest.raises(PositionError, match="placeholder for image #0 but only 0 given"):
        sample_positions(TINY, [tok.vision_start, tok.image, tok.vision_end], MediaQueue())
    with pytest.raises(PositionError, match="expected <\\|audio_bos\\|>"):
        sample_positions(TINY, [1, tok.audio, tok.audio_end], MediaQueue(audio_mel_frames=[4]))
    media = MediaQueue(image_grids=[(1, 2, 2), (1, 2, 2)])
    sample_positions(TINY, [tok.vision_start, tok.image, tok.vision_end], media)
    with pytest.raises(PositionError, match="1 image\\(s\\) left over"):
        media.check_consumed()
