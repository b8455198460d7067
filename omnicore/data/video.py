"""Video decoding with PyAV and the qwen-omni-utils frame sampling rules; frame lists too.

Frame count n (`frame_count`): total / video_fps * fps, clamped to [ceil2(min_frames),
floor2(min(maxlen, total))] and to total, then floored to even (the temporal patch). Frames taken:
round(linspace(0, total - 1, n)) in float32 (`frame_indices`). Per-frame pixel bounds
(`frame_pixel_bounds`) from n and the total budget, then smart resize (sides clamped to >= 28) and
a torchvision bicubic antialiased resize of the uint8 frames, so values stay integers in 0..255.
`second_per_grid` = temporal_patch_size / fps (the configured fps, as HF 4.52 uses it).
The file is read twice: a demux pass counts packets (no decoding), a decode pass keeps the chosen
frames, resized one at a time (memory stays n resized frames). If the two counts disagree (rare
streams), sampling is redone from the decoded count, so indices always follow decoded frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import BinaryIO

import attrs
import av
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from omnicore.data.media import DEFAULT_LIMITS, MediaError, MediaLimits, MediaSource, Reason, decoding, media_source
from omnicore.data.processor import ProcessorConfig, smart_resize

__all__ = [
    "VideoFrames",
    "frame_count",
    "frame_indices",
    "frame_pixel_bounds",
    "frame_size",
    "decode_video",
    "video_from_frames",
]


@attrs.frozen(kw_only=True)
class VideoFrames:
    """Sampled, resized frames of one video, ready for `processor.process_video`.

    frames: (T, 3, H, W) uint8, T even, H and W multiples of 28. indices: the source frame of each
    row. total_frames / video_fps: the source's decoded frame count and average rate (frame lists:
    their length and None). second_per_grid: seconds per temporal grid (2 / fps) for the positions.
    """

    frames: torch.Tensor
    indices: tuple[int, ...]
    total_frames: int
    video_fps: float | None
    second_per_grid: float


def frame_count(total_frames: int, video_fps: float, cfg: ProcessorConfig) -> int:
    """Frames to sample from a video of `total_frames` at `video_fps` (qwen-omni-utils `smart_nframes`)."""
    step = cfg.temporal_patch_size
    min_frames = math.ceil(cfg.video_min_frames / step) * step
    max_frames = math.floor(min(cfg.video_maxlen, total_frames) / step) * step
    wanted = total_frames / video_fps * cfg.video_fps
    n = math.floor(min(max(wanted, min_frames), max_frames, total_frames) / step) * step
    if n < step:
        raise ValueError(f"a video of {total_frames} frame(s) gives fewer than {step} frames to sample")
    return n


def frame_indices(total_frames: int, n: int) -> list[int]:
    """round(linspace(0, total - 1, n)), in float32 and rounding half to even like torch/qwen-omni-utils."""
    return torch.linspace(0, total_frames - 1, n, dtype=torch.float32).round().long().tolist()


def frame_pixel_bounds(n: int, cfg: ProcessorConfig) -> tuple[int, float]:
    """(min_pixels, max_pixels) per frame for a video of n sampled frames.

    max = min(ceiling, max(min(ceiling, total_pixels * 2 / n), int(1.05 * min))) with ceiling =
    `video_max_pixels`. With the default ceiling (768 x 28 x 28) this is qwen-omni-utils exactly, and
    a lower `video_max_pixels` acts like its per-element max_pixels (it can only lower the bound); a
    higher one raises the ceiling, as LLaMA-Factory's `video_max_pixels` does.
    """
    ceiling = cfg.video_max_pixels
    budget = max(min(ceiling, cfg.video_total_pixels / n * cfg.temporal_patch_size), int(cfg.video_min_pixels * 1.05))
    return cfg.video_min_pixels, min(ceiling, budget)


def frame_size(height: int, width: int, n: int, cfg: ProcessorConfig) -> tuple[int, int]:
    """(H, W) each sampled frame is resized to (qwen-omni-utils smart resize: sides clamped to >= 28)."""
    low, high = frame_pixel_bounds(n, cfg)
    return smart_resize(height, width, factor=cfg.factor, min_pixels=low, max_pixels=high, strict=False)


def _resize(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, H, W) uint8, torchvision bicubic with antialias (as qwen-omni-utils)."""
    if tuple(frame.shape[1:]) == size:
        return frame
    return tvf.resize(frame, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def _video_stream(container) -> av.VideoStream | None:
    """The first real video stream: cover art in audio files is a video stream flagged attached_pic."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _probe(stream: BinaryIO, name: str, limits: MediaLimits) -> tuple[int, float]:
    """(packet count, average frame rate) of the first video stream, without decoding."""
    stream.seek(0)
    with av.open(stream, mode="r") as container:
        video = _video_stream(container)
        if video is None:
            raise MediaError(name, Reason.NO_FRAMES, "no video stream")
        width, height = video.codec_context.width, video.codec_context.height
        if width * height > limits.max_pixels:
            raise MediaError(name, Reason.TOO_LARGE, f"frames of {width}x{height}, over max_pixels {limits.max_pixels}")
        count = 0
        for packet in container.demux(video):
            count += packet.size > 0  # the demuxer ends with an empty flush packet
            if count > limits.max_video_frames:
                raise MediaError(name, Reason.TOO_LARGE, f"over max_video_frames {limits.max_video_frames}")
        rate = video.average_rate or video.guessed_rate
        if not rate and video.duration and video.time_base and count:
            rate = count / float(video.duration * video.time_base)
    if count == 0:
        raise MediaError(name, Reason.NO_FRAMES, "the video stream has no frames")
    if not rate or float(rate) <= 0:
        raise MediaError(name, Reason.CORRUPT, "the video stream has no frame rate")
    return count, float(rate)


def _decode(
    stream: BinaryIO, name: str, indices: Sequence[int], cfg: ProcessorConfig, limits: MediaLimits
) -> tuple[list[torch.Tensor | None], int]:
    """The frames at `indices` (decode order = presentation order), resized; and the decoded count."""
    rows: dict[int, list[int]] = {}
    for row, index in enumerate(indices):
        rows.setdefault(index, []).append(row)
    out: list[torch.Tensor | None] = [None] * len(indices)
    size, count = None, 0
    stream.seek(0)
    with av.open(stream, mode="r") as container:
        video = _video_stream(container)
        video.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(video), start=1):
            if count > limits.max_video_frames:
                raise MediaError(name, Reason.TOO_LARGE, f"over max_video_frames {limits.max_video_frames}")
            if count - 1 not in rows:
                continue
            if frame.width * frame.height > limits.max_pixels:
                raise MediaError(name, Reason.TOO_LARGE, f"a {frame.width}x{frame.height} frame, over max_pixels")
            size = size or frame_size(frame.height, frame.width, len(indices), cfg)
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
            resized = _resize(rgb, size)
            for row in rows[count - 1]:
                out[row] = resized
    return out, count


def _sample(total: int, video_fps: float, name: str, cfg: ProcessorConfig) -> list[int]:
    try:
        return frame_indices(total, frame_count(total, video_fps, cfg))
    except ValueError as e:
        raise MediaError(name, Reason.NO_FRAMES, str(e)) from e


def decode_video(source: MediaSource, cfg: ProcessorConfig, *, limits: MediaLimits = DEFAULT_LIMITS) -> VideoFrames:
    """Sample and resize the frames of a video file (open, seekable binary file or bytes)."""
    stream, name = media_source(source)
    with decoding(name, "video"):
        total, video_fps = _probe(stream, name, limits)
        indices = _sample(total, video_fps, name, cfg)
        frames, decoded = _decode(stream, name, indices, cfg, limits)
        if decoded != total:
            total = decoded
            indices = _sample(total, video_fps, name, cfg)
            frames, _ = _decode(stream, name, indices, cfg, limits)
        return VideoFrames(
            frames=torch.stack(frames),
            indices=tuple(indices),
            total_frames=total,
            video_fps=video_fps,
            second_per_grid=cfg.temporal_patch_size / cfg.video_fps,
        )


def video_from_frames(images: Sequence[Image.Image], cfg: ProcessorConfig) -> VideoFrames:
    """A video given as a list of frame images (decoded with `decode_image`).

    All frames are used, in order (over `video_maxlen`: an even `video_maxlen` of them, spread by the
    `frame_indices` rule), and padded to an even count by repeating the last. Every frame is resized
    like a decoded video's, to the size derived from the first frame.
    """
    if not images:
        raise MediaError("<frames>", Reason.NO_FRAMES, "an empty frame list")
    step = cfg.temporal_patch_size
    indices = list(range(len(images)))
    if len(images) > cfg.video_maxlen:
        indices = frame_indices(len(images), cfg.video_maxlen // step * step)
    indices += [indices[-1]] * (-len(indices) % step)
    first = images[indices[0]]
    try:
        size = frame_size(first.height, first.width, len(indices), cfg)
    except ValueError as e:
        raise MediaError("<frames>", Reason.CORRUPT, str(e)) from e
    resized = {}
    for i in set(indices):
        rgb = torch.from_numpy(np.asarray(images[i].convert("RGB")).copy()).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
        resized[i] = _resize(rgb, size)
    return VideoFrames(
        frames=torch.stack([resized[i] for i in indices]),
        indices=tuple(indices),
        total_frames=len(images),
        video_fps=None,
        second_per_grid=step / cfg.video_fps,
    )
