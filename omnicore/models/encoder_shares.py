"""Encoder data parallelism inside an LLM TP group (DESIGN.md section 5, hetero parallel): which media
each encoder replica encodes.

The rule: a micro-batch of n samples is dealt to D replicas in contiguous runs of k = ceil(n / D)
samples in batch order (replica j takes samples j*k .. j*k + k - 1); a replica encodes the images,
videos and audio clips whose placeholders lie in its samples. When D divides n (the run config
checks this for fixed-size micro-batches) every replica gets n / D samples; a packed micro-batch cut
by a token budget may hold any n, and then the last replicas get fewer samples or none. Either way a
replica's media may be none: it then contributes zero feature rows (the runtime gathers sizes that
every rank computes from the same micro-batch, so no rank waits on another's size).
Because items are in placeholder order, each replica's items are a contiguous run, and the
replicas' features joined in replica order are the whole batch's features in item order.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from omnicore.config import ThinkerConfig
from omnicore.models.audio import audio_layout
from omnicore.models.vision import vision_layout

__all__ = ["Share", "share_of_samples", "media_shares"]


@attrs.frozen
class Share:
    """One replica's part of a Media: items [start, stop), its input values and layout, and the
    feature rows it produces (0 when it holds no item; values / layout are then None)."""

    start: int
    stop: int
    rows: int
    values: torch.Tensor | None = None
    layout: object | None = None


def share_of_samples(n_samples: int, replicas: int) -> int:
    """Samples per replica (the last replicas may get fewer or none)."""
    return -(-n_samples // replicas)


def media_shares(cfg: ThinkerConfig, media, tower: str, sample_ids: torch.Tensor, n_samples: int, replicas: int) -> list[Share]:
    """Split `media` (a thinker `Media`) into `replicas` shares by sample (module docstring).

    `sample_ids` (N,) is the sample of every token (the batch's segment ids); `tower` is "vision"
    or "audio" and says how an item's values and layout are cut.
    """
    counts = list(media.layout.tokens_per_item if tower == "vision" else media.layout.tokens_per_clip)
    firsts = torch.tensor([0, *counts[:-1]], dtype=torch.long).cumsum(0).to(media.slots.device)
    item_samples = sample_ids[media.slots[firsts]].tolist()  # the sample of every item's first slot
    per = share_of_samples(n_samples, replicas)
    owner = [s // per for s in item_samples]  # non-decreasing: items are in placeholder order
    shares = []
    for j in range(replicas):
        start = sum(o < j for o in owner)
        stop = start + sum(o == j for o in owner)
        if start == stop:
            shares.append(Share(start, stop, 0))
            continue
        values, layout = _cut(cfg, media, tower, start, stop)
        shares.append(Share(start, stop, sum(counts[start:stop]), values, layout))
    return shares


def _cut(cfg: ThinkerConfig, media, tower: str, start: int, stop: int):
    """Input values and layout of items [start, stop)."""
    device = media.slots.device
    if tower == "vision":
        grids: Sequence = media.items
        rows = [t * h * w for t, h, w in grids]  # patch rows of every item
        lo, hi = sum(rows[:start]), sum(rows[:stop])
        return media.values[lo:hi], vision_layout(cfg.vision, grids[start:stop], device=device)
    frames = media.layout.mel_frames
    lo, hi = sum(frames[:start]), sum(frames[:stop])
    return media.values[:, lo:hi], audio_layout(cfg.audio, frames[start:stop], device=device)
