"""Per-tower parity with the HF encoders (fp32): vision and audio features, and their layouts.

Tolerance: max |diff| <= 1e-5 x max |HF feature| (features of the tiny random models reach ~20).
"""

from __future__ import annotations

import pytest
import torch

from omnicore.models.audio import audio_encoder, audio_layout
from omnicore.models.vision import vision_encoder, vision_layout, window_order
from omnicore.ops import CPU, REF
from omnicore.params import select

GRID_SETS = {
    "one_image": [(1, 4, 6)],
    "odd_units": [(1, 6, 10)],
    "divisible_by_window": [(1, 16, 16)],
    "video_t3": [(3, 8, 4)],
    "mixed_items": [(1, 4, 4), (2, 12, 8), (1, 18, 2)],
}
CLIP_SETS = {
    "short": [57],
    "exact_chunk": [200],
    "two_chunks_and_rest": [450],
    "three_frames": [3],
    "many": [3, 200, 201, 399, 75],
}


def _close(got, ref):
    err, top = (got - ref).abs().max(), ref.abs().max()
    assert err <= 1e-5 * top, f"max diff {err:.3g} vs max |ref| {top:.3g}"


@pytest.mark.parametrize("ops", [CPU, REF], ids=lambda o: o.name)
@pytest.mark.parametrize("grids", GRID_SETS)
@pytest.mark.parametrize("config_name", ["tiny_gqa", "tiny_mha"])
def test_vision_features_match_hf(hf_pair, config_name, grids, ops):
    cfg, model, params, _ = hf_pair(config_name)
    grid = torch.tensor(GRID_SETS[grids])
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.visual(pixels, grid)
        got = vision_encoder(select(params, "vision."), cfg.vision, pixels, vision_layout(cfg.vision, grid), ops=ops)
    _close(got, ref)


@pytest.mark.parametrize("ops", [CPU, REF], ids=lambda o: o.name)
@pytest.mark.parametrize("clips", CLIP_SETS)
@pytest.mark.parametrize("config_name", ["tiny_gqa", "tiny_mha"])
def test_audio_features_match_hf(hf_pair, config_name, clips, ops):
    cfg, model, params, _ = hf_pair(config_name)
    frames = torch.tensor(CLIP_SETS[clips])
    feats = torch.randn(cfg.audio.n_mels, int(frames.sum()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.audio_tower(feats, feature_lens=frames, aftercnn_lens=(frames - 1) // 2 + 1).last_hidden_state
        layout = audio_layout(cfg.audio, frames.tolist())
        got = audio_encoder(select(params, "audio."), cfg.audio, feats, layout, ops=ops)
    assert got.shape == ref.shape
    assert list(layout.tokens_per_clip) == [((n - 1) // 2 + 1) // 2 for n in frames.tolist()]
    _close(got, ref)


@pytest.mark.parametrize("grids", GRID_SETS)
def test_window_order_matches_hf(hf_pair, grids):
    """Window permutation and window boundaries equal HF's get_window_index (after dropping empty windows)."""
    cfg, model, _, _ = hf_pair("tiny_gqa")
    grid = torch.tensor(GRID_SETS[grids])
    ref_index, ref_cu = model.visual.get_window_index(grid)
    layout = vision_layout(cfg.vision, grid)
    assert torch.equal(layout.order, ref_index)
    assert layout.windows.cu_seqlens.tolist() == torch.unique_consecutive(torch.tensor(ref_cu)).tolist()


def test_extra_empty_windows_when_divisible():
    """A merged grid divisible by the window gets whole windows only (HF pads a full empty row/col)."""
    from omnicore.config import TINY

    order, sizes = window_order(TINY.vision, (1, 16, 16))  # 8 x 8 merged tokens, 4 x 4 windows
    assert sizes == [16, 16, 16, 16]
    assert order[:4].tolist() == [0, 1, 2, 3] and order[4:8].tolist() == [8, 9, 10, 11]
