"""Collate processed samples into one micro-batch for `omnicore.prepare_inputs`.

A sample is a dict in the thinker's key names without a batch dimension: `input_ids` (n,),
`labels` (n,), optionally `position_ids` (3, n), and its media: `pixel_values` (P, 1176) with
`image_grid_thw` (k, 3); `pixel_values_videos` with `video_grid_thw` and `video_second_per_grid`;
`input_features` (n_mels, sum L) with `audio_feature_lengths` (m,). Media of all samples are
concatenated in sample order, which is the order the placeholders appear in the packed sequence.

- `collate_packed`: samples back to back, `cu_seqlens`, positions restart per sample (no padding).
- `collate_padded`: rows padded to the longest (right padding by default), `attention_mask`.
Both give the same loss (a test checks); packing is the default because padding is wasted work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["collate_packed", "collate_padded", "MEDIA_KEYS", "sample_tokens"]

IGNORE_INDEX = -100
# (values key, its per-item metadata keys) in the thinker's names; values concatenate along dim 0,
# except audio features, which concatenate along time (dim 1).
MEDIA_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pixel_values", ("image_grid_thw",)),
    ("pixel_values_videos", ("video_grid_thw", "video_second_per_grid")),
    ("input_features", ("audio_feature_lengths",)),
)


def sample_tokens(sample: Mapping[str, torch.Tensor]) -> int:
    return int(sample["input_ids"].numel())


def _media(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for values, meta in MEDIA_KEYS:
        present = [s for s in samples if s.get(values) is not None]
        if not present:
            continue
        out[values] = torch.cat([s[values] for s in present], dim=1 if values == "input_features" else 0)
        for key in meta:
            out[key] = torch.cat([torch.as_tensor(s[key]) for s in present])
    return out


def collate_packed(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One packed micro-batch: input_ids / labels (1, N), position_ids (3, 1, N) when every sample
    has them, cu_seqlens (S + 1,), and the media concatenated."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    lengths = torch.tensor([sample_tokens(s) for s in samples])
    batch = {
        "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
        "labels": torch.cat([s.get("labels", torch.full_like(s["input_ids"], IGNORE_INDEX)) for s in samples])[None],
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
    }
    if all(s.get("position_ids") is not None for s in samples):
        batch["position_ids"] = torch.cat([s["position_ids"] for s in samples], dim=1)[:, None]
    return batch | _media(samples)


def collate_padded(samples: Sequence[Mapping[str, torch.Tensor]], *, pad_id: int = 0, side: str = "right") -> dict[str, torch.Tensor]:
    """One padded micro-batch (B, T) with attention_mask; labels -100 and positions 1 at padding."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(sample_tokens(s) for s in samples)
    b = len(samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    with_pos = all(s.get("position_ids") is not None for s in samples)
    positions = torch.ones(3, b, width, dtype=torch.long) if with_pos else None
    for i, s in enumerate(samples):
        n = sample_tokens(s)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = s["input_ids"]
        labels[i, cols] = s.get("labels", torch.full_like(s["input_ids"], IGNORE_INDEX))
        mask[i, cols] = 1
        if with_pos:
            positions[:, i, cols] = s["position_ids"]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if with_pos:
        batch["position_ids"] = positions
    return batch | _media(samples)
