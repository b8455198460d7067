"""Audio decoding: soundfile first, PyAV (FFmpeg) for what libsndfile cannot read, then 16 kHz mono.

This is `librosa.load(path, sr=16000)` (what qwen-omni-utils and LLaMA-Factory call) without
librosa: float32 samples, channels averaged (mean over channels, in float32), soxr "HQ"
resampling (librosa's default `soxr_hq`), the result cut or zero-padded to ceil(N * 16000 / rate)
samples. `decode_video_audio` reads a video's sound track (for `use_audio_in_video`) through
PyAV. Empty tracks, clips too short for one audio token (fewer than 3 mel frames) and NaN/Inf
samples are `MediaError`s, so they never reach the encoder.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import av
import numpy as np
import soundfile
import soxr
import torch

from omnicore.data.media import DEFAULT_LIMITS, MediaError, MediaLimits, MediaSource, Reason, decoding, media_source
from omnicore.data.processor import HOP_LENGTH
from omnicore.models.audio import MIN_MEL_FRAMES

__all__ = ["decode_audio", "decode_video_audio", "resample"]

_BLOCK = 1 << 18  # frames per soundfile read: memory follows the real data, not a header's claim


def resample(wave: np.ndarray, rate: int, sampling_rate: int) -> np.ndarray:
    """(N,) float32 at `rate` -> (ceil(N * sampling_rate / rate),) float32 (soxr HQ, as librosa)."""
    if rate == sampling_rate:
        return wave
    out = soxr.resample(wave, rate, sampling_rate, quality="HQ")
    size = math.ceil(wave.shape[0] * sampling_rate / rate)
    if out.shape[0] >= size:
        return np.ascontiguousarray(out[:size], dtype=np.float32)
    return np.pad(out, (0, size - out.shape[0])).astype(np.float32)


def _max_frames(rate: int, limits: MediaLimits) -> int:
    return int(limits.max_audio_seconds * rate)


def _too_long(name: str, limits: MediaLimits) -> MediaError:
    return MediaError(name, Reason.TOO_LARGE, f"over max_audio_seconds {limits.max_audio_seconds}")


def _read_soundfile(stream: BinaryIO, name: str, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """(N,) float32 mono and the file's rate, read in blocks (a header may claim any length).

    Channels are averaged block by block (librosa's to_mono: mean over axis 0 of the (channels, N)
    view, per sample, so blocking changes no bit) to hold only the mono signal in memory.
    """
    stream.seek(0)
    with soundfile.SoundFile(stream) as file:
        rate, blocks, total = file.samplerate, [], 0
        while True:
            part = file.read(_BLOCK, dtype="float32", always_2d=True)  # (frames, channels)
            if not len(part):
                break
            blocks.append(part.T.mean(axis=0))
            total += len(part)
            if total > _max_frames(rate, limits):
                raise _too_long(name, limits)
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), rate


def _read_av(stream: BinaryIO, name: str, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """(N,) float32 mono and rate of the first audio stream of any FFmpeg container."""
    stream.seek(0)
    with av.open(stream, mode="r") as container:
        if not container.streams.audio:
            raise MediaError(name, Reason.NO_AUDIO, "no audio stream")
        converter, rate, chunks, total = None, 0, [], 0
        for frame in container.decode(container.streams.audio[0]):
            if converter is None:  # planar float32, the file's own layout and rate: no resampling here
                rate = frame.sample_rate
                converter = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
            for part in converter.resample(frame):
                chunks.append(part.to_ndarray().mean(axis=0))  # (channels, samples) -> mono
                total += chunks[-1].shape[0]
            if total > _max_frames(rate, limits):
                raise _too_long(name, limits)
        if converter is not None:
            chunks += [part.to_ndarray().mean(axis=0) for part in converter.resample(None)]
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), rate


def _finish(wave: np.ndarray, rate: int, name: str, sampling_rate: int) -> torch.Tensor:
    if wave.shape[0] == 0:
        raise MediaError(name, Reason.EMPTY, "no audio samples")
    if not np.isfinite(wave).all():
        raise MediaError(name, Reason.CORRUPT, "NaN or infinite samples")
    out = resample(np.ascontiguousarray(wave, dtype=np.float32), rate, sampling_rate)
    if -(-out.shape[0] // HOP_LENGTH) < MIN_MEL_FRAMES:
        raise MediaError(name, Reason.EMPTY, f"{out.shape[0]} samples at {sampling_rate} Hz give no audio token")
    return torch.from_numpy(out)


def decode_audio(
    source: MediaSource, *, sampling_rate: int = 16000, limits: MediaLimits = DEFAULT_LIMITS
) -> torch.Tensor:
    """(N,) float32 mono at `sampling_rate` from an audio file (wav, flac, ogg, mp3, m4a, a video...)."""
    stream, name = media_source(source)
    with decoding(name, "audio"):
        try:
            wave, rate = _read_soundfile(stream, name, limits)
        except MediaError:
            raise
        except Exception as soundfile_error:  # not a libsndfile format (m4a, mp4, ...): try FFmpeg
            try:
                wave, rate = _read_av(stream, name, limits)
            except MediaError:
                raise
            except Exception as e:
                raise MediaError(name, Reason.CORRUPT, f"soundfile: {soundfile_error}; FFmpeg: {e}") from e
        return _finish(wave, rate, name, sampling_rate)


def decode_video_audio(
    source: MediaSource, *, sampling_rate: int = 16000, limits: MediaLimits = DEFAULT_LIMITS
) -> torch.Tensor:
    """(N,) float32 mono at `sampling_rate`: the sound track of a video (`MediaError` NO_AUDIO if none)."""
    stream, name = media_source(source)
    with decoding(name, "video sound track"):
        wave, rate = _read_av(stream, name, limits)
        return _finish(wave, rate, name, sampling_rate)
