"""3-D multimodal rotary position ids (TMRoPE), the semantics of HF `get_rope_index` (4.52).

Each token gets a (t, h, w) triple. Text advances all three axes by one. A vision block gives its
merged tokens (t_k + s, r + s, c + s) with s the next free position and t_k = floor(k * seconds per
temporal grid * position_id_per_seconds) (fp32, as HF). An audio block is sequential. A video with
its own sound track (`<|vision_bos|><|audio_bos|>` ... `<|audio_eos|><|vision_eos|>`) interleaves
video and audio in chunks of `position_id_per_seconds * seconds_per_chunk` temporal positions; both
start tokens share one id, as do both end tokens. After any block, "next" is the maximum of the
*last appended* piece plus one (not the running maximum: it matters after an interleaved block).

Whether a video carries its audio is read from the token layout (the token before its first
`<|VIDEO|>` is `<|audio_bos|>`), so one batch may mix both kinds; the HF flag is checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from omnicore.config import ThinkerConfig

__all__ = ["MediaQueue", "sample_positions", "packed_positions", "batch_positions", "audio_token_count", "PositionError"]


class PositionError(ValueError):
    """Token layout and media metadata disagree (placeholder counts, block delimiters)."""


def audio_token_count(mel_frames: int) -> int:
    """Tokens the audio encoder emits for a clip of `mel_frames` frames (conv stride 2, then pool 2)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@attrs.define
class MediaQueue:
    """Media metadata consumed in reading order across a batch (HF shares counters across rows)."""

    image_grids: Sequence[Sequence[int]] = ()
    video_grids: Sequence[Sequence[int]] = ()
    video_seconds_per_grid: Sequence[float] = ()
    audio_mel_frames: Sequence[int] = ()
    _image: int = 0
    _video: int = 0
    _audio: int = 0

    def next_image(self, where: str) -> tuple[int, int, int]:
        self._image += 1
        return tuple(_take(self.image_grids, self._image - 1, "image", where))

    def next_video(self, where: str) -> tuple[tuple[int, int, int], float]:
        self._video += 1
        grid = tuple(_take(self.video_grids, self._video - 1, "video", where))
        spg = _take(self.video_seconds_per_grid, self._video - 1, "video_second_per_grid", where)
        return grid, float(spg)

    def next_audio(self, where: str) -> int:
        self._audio += 1
        return int(_take(self.audio_mel_frames, self._audio - 1, "audio", where))

    def check_consumed(self) -> None:
        left = [
            f"{len(items) - used} {kind}"
            for kind, items, used in (
                ("image(s)", self.image_grids, self._image),
                ("video(s)", self.video_grids, self._video),
                ("audio clip(s)", self.audio_mel_frames, self._audio),
            )
            if len(items) > used
        ]
        if left:
            raise PositionError(f"media without placeholders in the text: {', '.join(left)} left over")


def _take(items: Sequence, i: int, kind: str, where: str):
    if i >= len(items):
        raise PositionError(f"{where}: placeholder for {kind} #{i} but only {len(items)} given")
    return items[i]


def sample_positions(cfg: ThinkerConfig, ids: Sequence[int], media: MediaQueue, *, where: str = "sample") -> torch.Tensor:
    """(3, n) int64 positions of one unpadded token sequence; consumes its media from `media`."""
    walk = _Walk(cfg, list(ids), media, where)
    tok = cfg.tokens
    placeholders = {tok.image, tok.video, tok.audio}
    while (first := next((j for j in range(walk.cursor, len(ids)) if ids[j] in placeholders), None)) is not None:
        if ids[first] == tok.audio:
            walk.audio_block(first)
        elif ids[first] == tok.video and first > 0 and ids[first - 1] == tok.audio_start:
            walk.audio_in_video_block(first)
        else:
            walk.vision_block(first)
    walk.linear(len(ids) - walk.cursor)
    return torch.cat(walk.pieces, dim=1) if walk.pieces else torch.zeros(3, 0, dtype=torch.long)


class _Walk:
    """Left-to-right walk over one sequence, appending (3, n) position pieces."""

    def __init__(self, cfg: ThinkerConfig, ids: list[int], media: MediaQueue, where: str):
        self.cfg, self.ids, self.media, self.where = cfg, ids, media, where
        self.tok, self.merge = cfg.tokens, cfg.vision.spatial_merge_size
        self.pieces: list[torch.Tensor] = []
        self.cursor = 0

    def next_pos(self) -> int:
        return int(self.pieces[-1].max()) + 1 if self.pieces else 0

    def linear(self, n: int) -> None:
        if n > 0:
            self.pieces.append(torch.arange(n).expand(3, n) + self.next_pos())

    def expect(self, at: int, token: int | None, name: str) -> None:
        if token is None:  # vision_end unknown to this config: nothing to check
            return
        if not (0 <= at < len(self.ids)) or self.ids[at] != token:
            found = self.ids[at] if 0 <= at < len(self.ids) else "the end of the sequence"
            raise PositionError(f"{self.where}: expected {name} at token {at}, found {found}")

    def expect_run(self, start: int, token: int, n: int, name: str) -> None:
        run = self.ids[start : start + n]
        if len(run) != n or any(t != token for t in run):
            got = next((k for k, t in enumerate(run) if t != token), len(run))
            raise PositionError(
                f"{self.where}: the {name} at token {start} needs {n} placeholder tokens, found {got}"
            )

    def audio_block(self, first: int) -> None:
        """`<|audio_bos|> AUDIO x n <|audio_eos|>`: sequential positions."""
        n = audio_token_count(self.media.next_audio(self.where))
        self.expect(first - 1, self.tok.audio_start, "<|audio_bos|>")
        self.expect_run(first, self.tok.audio, n, "audio clip")
        self.expect(first + n, self.tok.audio_end, "<|audio_eos|>")
        for length in (first - 1 - self.cursor, 1, n, 1):
            self.linear(length)
        self.cursor = first + n + 1

    def vision_block(self, first: int) -> None:
        """`<|vision_bos|> IMAGE|VIDEO x n <|vision_eos|>`: (t, h, w) grid positions."""
        is_image = self.ids[first] == self.tok.image
        if is_image:
            grid, seconds_per_grid = self.media.next_image(self.where), None
        else:
            grid, seconds_per_grid = self.media.next_video(self.where)
        n = grid[0] * grid[1] * grid[2] // self.merge**2
        self.expect(first - 1, self.tok.vision_start, "<|vision_bos|>")
        self.expect_run(first, self.ids[first], n, "image" if is_image else "video")
        self.expect(first + n, self.tok.vision_end, "<|vision_eos|>")
        self.linear(first - 1 - self.cursor)
        self.linear(1)
        t_ids = _temporal_ids(self.cfg, grid[0], seconds_per_grid)
        self.pieces.append(_vision_positions(grid, t_ids, self.merge) + self.next_pos())
        self.linear(1)
        self.cursor = first + n + 1

    def audio_in_video_block(self, first: int) -> None:
        """`<|vision_bos|><|audio_bos|> V0 A0 V1 A1 ... <|audio_eos|><|vision_eos|>`."""
        tok = self.tok
        self.expect(first - 2, tok.vision_start, "<|vision_bos|>")
        grid, seconds_per_grid = self.media.next_video(self.where)
        n_audio = audio_token_count(self.media.next_audio(self.where))
        self.linear(first - 2 - self.cursor)
        start = self.next_pos()
        self.pieces.append(torch.full((3, 2), start))  # both start tokens share one id
        s = start + 1
        video = _vision_positions(grid, _temporal_ids(self.cfg, grid[0], seconds_per_grid), self.merge) + s
        audio = torch.arange(n_audio).expand(3, n_audio) + s
        per_chunk = int(self.cfg.position_id_per_seconds * self.cfg.seconds_per_chunk)
        streams = (
            (_chunk_bounds(video[0] - s, per_chunk), video, tok.video, "video chunk"),
            (_chunk_bounds(audio[0] - s, per_chunk), audio, tok.audio, "audio chunk"),
        )
        at = first
        for j in range(max(len(streams[0][0]), len(streams[1][0]))):
            for bounds, positions, token, name in streams:
                if j < len(bounds):
                    lo, hi = bounds[j]
                    self.expect_run(at, token, hi - lo, f"{name} {j} of the audio-in-video block at {first}")
                    self.pieces.append(positions[:, lo:hi])
                    at += hi - lo
        self.expect(at, tok.audio_end, "<|audio_eos|>")
        self.expect(at + 1, tok.vision_end, "<|vision_eos|>")
        self.pieces.append(torch.full((3, 2), self.next_pos()))  # both end tokens share one id
        self.cursor = at + 2


def _temporal_ids(cfg: ThinkerConfig, grid_t: int, seconds_per_grid: float | None) -> torch.Tensor:
    if seconds_per_grid is None:  # images: one temporal grid per second by definition
        return torch.arange(grid_t) * cfg.position_id_per_seconds
    # fp32 product, truncated, in HF's order of operations: (k * seconds) * per_second.
    spg = torch.tensor(seconds_per_grid, dtype=torch.float32)
    return (torch.arange(grid_t) * spg * cfg.position_id_per_seconds).long()


def _vision_positions(grid: Sequence[int], t_ids: torch.Tensor, merge: int) -> torch.Tensor:
    """(3, t*gh*gw) raster positions of merged tokens, relative to the block start."""
    gt, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
    t = t_ids.view(gt, 1, 1).expand(gt, gh, gw)
    h = torch.arange(gh).view(1, gh, 1).expand(gt, gh, gw)
    w = torch.arange(gw).view(1, 1, gw).expand(gt, gh, gw)
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)])


def _chunk_bounds(values: torch.Tensor, per_chunk: int) -> list[tuple[int, int]]:
    """Split a non-decreasing run of temporal values into chunks at multiples of `per_chunk`.

    The chunk counter advances at most once per element, as in HF, so when one step jumps a whole
    chunk (fps < 1) chunk numbers lag the value ranges; processor and model share this rule.
    """
    bounds, start, current = [], 0, 1
    for i, v in enumerate(values.tolist()):
        if v >= current * per_chunk:
            bounds.append((start, i))
            start, current = i, current + 1
    bounds.append((start, len(values)))
    return bounds


def packed_positions(
    cfg: ThinkerConfig, flat_ids: torch.Tensor, cu_seqlens: Sequence[int], media: MediaQueue
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, N) of samples packed back to back (restarting at 0 in each) and deltas (S, 1)."""
    ids = flat_ids.tolist()
    pieces, deltas = [], []
    for i, (lo, hi) in enumerate(zip(cu_seqlens, cu_seqlens[1:])):
        pos = sample_positions(cfg, ids[lo:hi], media, where=f"sample {i}")
        pieces.append(pos)
        deltas.append(int(pos.max()) + 1 - (hi - lo))
    media.check_consumed()
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions.to(flat_ids.device), torch.tensor(deltas, device=flat_ids.device).unsqueeze(1)


def batch_positions(
    cfg: ThinkerConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    media: MediaQueue,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, B, T) (padded slots hold 1, as HF) and rope deltas (B, 1) of a padded batch.

    delta = max position + 1 - valid tokens: decoding continues at (tokens so far) + delta.
    """
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = torch.ones(3, batch, length, dtype=torch.long)
    deltas = []
    for row in range(batch):
        ids = input_ids[row][mask[row]].tolist()
        pos = sample_positions(cfg, ids, media, where=f"batch row {row}")
        positions[:, row, mask[row].cpu()] = pos
        deltas.append((int(pos.max()) + 1 if len(ids) else 0) - len(ids))
    media.check_consumed()
    return positions.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)

