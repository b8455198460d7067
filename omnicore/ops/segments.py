"""Packed-sequence segments: the one description of "which tokens attend to which".

Every tower runs on token-major activations (N, C) holding many sequences back to back (the
text samples of a packed micro-batch, the windows of the vision encoder, the 2-second chunks of
the audio encoder). A `Segments` value names their boundaries once per batch, with the host-side
facts each backend needs (lengths as Python ints, tokens grouped by segment length), so no layer
recomputes a mask, a `.tolist()` or an index.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

__all__ = ["Segments", "LengthBucket"]


@attrs.frozen
class LengthBucket:
    """All segments of one length: `count` segments of `length` tokens.

    `index` lists their tokens segment by segment, shape (count * length,); it is None when the
    segments are back to back from token `start` (always so for a single segment, or when every
    segment has this length), so a plain slice suffices and nothing is gathered.
    """

    length: int
    count: int
    index: torch.Tensor | None
    start: int = 0

    @property
    def tokens(self) -> slice:
        """The token range of a contiguous bucket (`index` None)."""
        return slice(self.start, self.start + self.count * self.length)


@attrs.frozen
class Segments:
    """Boundaries of packed sequences along the token axis.

    `cu_seqlens` (S + 1,) int32 starts at 0 and ends at the token count; `lengths` are the same
    facts as Python ints. Zero-length segments are dropped at construction (the vision encoder's
    empty padding windows produce them; flash kernels reject them).
    """

    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    buckets: tuple[LengthBucket, ...]

    @property
    def total(self) -> int:
        return int(sum(self.lengths))

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str = "cpu") -> Segments:
        lengths = tuple(int(n) for n in lengths if int(n) > 0)
        starts, offset = [], 0
        for n in lengths:
            starts.append(offset)
            offset += n
        cu = torch.tensor([0, *(s + n for s, n in zip(starts, lengths))], dtype=torch.int32, device=device)
        by_length: dict[int, list[int]] = {}
        for start, n in zip(starts, lengths):
            by_length.setdefault(n, []).append(start)
        buckets = []
        for n, seg_starts in sorted(by_length.items()):
            if all(b - a == n for a, b in zip(seg_starts, seg_starts[1:])):
                # Back to back (one length overall, a lone segment, a run of full windows): a slice.
                buckets.append(LengthBucket(length=n, count=len(seg_starts), index=None, start=seg_starts[0]))
                continue
            first = torch.tensor(seg_starts, dtype=torch.long, device=device)
            index = (first[:, None] + torch.arange(n, device=device)).reshape(-1)
            buckets.append(LengthBucket(length=n, count=len(seg_starts), index=index))
        return cls(cu_seqlens=cu, lengths=lengths, buckets=tuple(buckets))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> Segments:
        bounds = cu_seqlens.tolist()
        if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {bounds}")
        return cls.from_lengths([b - a for a, b in zip(bounds, bounds[1:])], cu_seqlens.device)

    def segment_ids(self) -> torch.Tensor:
        """(N,) index of the segment each token belongs to."""
        counts = torch.tensor(self.lengths, dtype=torch.long, device=self.cu_seqlens.device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=counts.device), counts)
