"""Length policy: a token limit that never cuts inside a media block, and per-item media caps.

The sequence limit (`max_seq_len`, from the run config's sequence length) either drops a sample that
is too long or keeps its first user / assistant rounds that fit (`on_too_long="truncate"`): whole
rounds go, so no media block, turn or label run is ever cut, and the media of dropped rounds go too.
A sample whose first round alone is too long is dropped. Media caps (`max_audio_seconds`,
`max_video_frames`) apply to each decoded item with `on_media_limit`: "error" stops the run,
"skip" drops the sample, "truncate" keeps the beginning (audio) or the first frames (video).
Every drop and truncation is counted by the caller (see `sample.process_sample`).
"""

from __future__ import annotations

import math

import attrs
import torch

from omnicore.data.errors import BadSample, MediaLimitError, Problem
from omnicore.data.video import VideoFrames

__all__ = ["LengthPolicy", "cap_audio", "cap_video"]


def _choice(*allowed: str):
    def check(instance, attribute, value) -> None:
        if value not in allowed:
            raise ValueError(f"{attribute.name} must be one of {', '.join(allowed)}; got {value!r}")

    return check


def _positive_or_none(instance, attribute, value) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (number and math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be positive or None, got {value!r}")


def _count_or_none(instance, attribute, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{attribute.name} must be a positive integer or None, got {value!r}")


@attrs.frozen(kw_only=True)
class LengthPolicy:
    """Token and media limits; None means no limit."""

    max_seq_len: int | None = attrs.field(default=None, validator=_count_or_none)
    on_too_long: str = attrs.field(default="drop", validator=_choice("drop", "truncate"))
    max_audio_seconds: float | None = attrs.field(default=None, validator=_positive_or_none)
    max_video_frames: int | None = attrs.field(default=None, validator=_count_or_none)
    on_media_limit: str = attrs.field(default="truncate", validator=_choice("error", "truncate", "skip"))


def _over(policy: LengthPolicy, name: str, what: str) -> None:
    """Raise for "error" / "skip"; return for "truncate"."""
    if policy.on_media_limit == "error":
        raise MediaLimitError(f"media {name!r}: {what} (on_media_limit='error')")
    if policy.on_media_limit == "skip":
        raise BadSample(Problem.MEDIA_LIMIT, f"media {name!r}: {what}")


def cap_audio(wave: torch.Tensor, policy: LengthPolicy, sampling_rate: int, name: str) -> tuple[torch.Tensor, bool]:
    """(N,) waveform -> (waveform within `max_audio_seconds`, whether it was cut)."""
    if policy.max_audio_seconds is None:
        return wave, False
    limit = int(policy.max_audio_seconds * sampling_rate)
    if wave.shape[0] <= limit:
        return wave, False
    seconds = wave.shape[0] / sampling_rate
    _over(policy, name, f"{seconds:.2f} s of audio, over max_audio_seconds {policy.max_audio_seconds}")
    return wave[:limit], True


def cap_video(video: VideoFrames, policy: LengthPolicy, temporal_patch: int, name: str) -> tuple[VideoFrames, bool]:
    """Sampled frames -> (at most `max_video_frames` of them, whether frames were cut).

    Truncation keeps the first frames, rounded down to the temporal patch (at least one patch).
    """
    cap = policy.max_video_frames
    if cap is None or video.frames.shape[0] <= cap:
        return video, False
    _over(policy, name, f"{video.frames.shape[0]} frames, over max_video_frames {cap}")
    keep = max(cap // temporal_patch, 1) * temporal_patch
    return attrs.evolve(video, frames=video.frames[:keep], indices=video.indices[:keep]), True
