"""The Qwen2.5-Omni processor maths: smart resize, patch flattening and grid_thw, Whisper log-mel.

Mirrors transformers 4.52: `Qwen2VLImageProcessor` (the slow PIL class: bicubic resize, x/255 in
float64, CLIP normalisation in float32), `Qwen2VLVideoProcessor` (fused (x - 255 mean) / (255 std)
in float32) and `WhisperFeatureExtractor` (128 mel bins). Log-mel features are computed on the real
clip only, never on a 300 s zero-padded window, yet equal HF's valid frames: see `audio_features`.
Outputs use the batch keys of `omnicore.models.thinker.prepare_inputs` (audio in packed form:
`input_features` (n_mels, sum L) with `audio_feature_lengths`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from omnicore.data.video import VideoFrames

__all__ = [
    "ProcessorConfig",
    "smart_resize",
    "image_size",
    "flatten_patches",
    "process_image",
    "process_video",
    "image_inputs",
    "video_inputs",
    "mel_filters",
    "audio_features",
    "audio_inputs",
    "N_FFT",
    "HOP_LENGTH",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_FFT = 400  # Whisper: 25 ms windows
HOP_LENGTH = 160  # 10 ms hop, 100 frames per second at 16 kHz
MAX_ASPECT = 200


@attrs.frozen(kw_only=True)
class ProcessorConfig:
    """Processor settings; defaults are the Qwen2.5-Omni checkpoint's and qwen-omni-utils'.

    Video names follow LLaMA-Factory / MindSpeed-MM `preprocess_parameters`. Per-frame pixel budget:
    `video_max_pixels` is the ceiling (qwen-omni-utils' 768 x 28 x 28 by default), lowered for long
    videos to `video_total_pixels * 2 / n_frames` but never below 1.05 x `video_min_pixels`, and never
    above `video_max_pixels` (see `omnicore.data.video.frame_pixel_bounds`).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = attrs.field(default=CLIP_MEAN, converter=tuple)
    image_std: tuple[float, float, float] = attrs.field(default=CLIP_STD, converter=tuple)
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 16384 * 28 * 28
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_maxlen: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: int = int(128000 * 28 * 28 * 0.9)
    sampling_rate: int = 16000
    n_mels: int = 128
    audio_max_samples: int = 300 * 16000  # HF's window (chunk_length 300 s); longer clips are cut

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merged 2x2 block of 14-px patches = 28."""
        return self.patch_size * self.merge_size

    def __attrs_post_init__(self) -> None:
        positive = ("patch_size", "temporal_patch_size", "merge_size", "image_max_pixels", "video_fps")
        positive += ("video_maxlen", "video_max_pixels", "video_total_pixels", "sampling_rate", "n_mels")
        for name in positive + ("audio_max_samples",):
            if getattr(self, name) <= 0:
                raise ValueError(f"ProcessorConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("image_min_pixels", "video_min_pixels", "video_min_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"ProcessorConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.video_maxlen < self.temporal_patch_size:
            raise ValueError(f"ProcessorConfig.video_maxlen {self.video_maxlen} is below temporal_patch_size")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("ProcessorConfig.image_mean and image_std need 3 values (RGB)")

    @classmethod
    def from_hf(cls, preprocessor_config: Mapping[str, Any], **overrides) -> ProcessorConfig:
        """Settings from a checkpoint's `preprocessor_config.json` (image and feature-extractor keys)."""
        keys = {
            "patch_size": "patch_size",
            "temporal_patch_size": "temporal_patch_size",
            "merge_size": "merge_size",
            "image_mean": "image_mean",
            "image_std": "image_std",
            "min_pixels": "image_min_pixels",
            "max_pixels": "image_max_pixels",
            "sampling_rate": "sampling_rate",
            "feature_size": "n_mels",
        }
        values = {ours: preprocessor_config[hf] for hf, ours in keys.items() if hf in preprocessor_config}
        if "chunk_length" in preprocessor_config:
            values["audio_max_samples"] = int(preprocessor_config["chunk_length"]) * values.get("sampling_rate", 16000)
        for hf, expected in (("n_fft", N_FFT), ("hop_length", HOP_LENGTH)):
            if preprocessor_config.get(hf, expected) != expected:
                given = preprocessor_config[hf]
                raise ValueError(f"preprocessor_config {hf}={given}: omnicore supports only {expected}")
        return cls(**(values | overrides))


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int, strict: bool = True
) -> tuple[int, int]:
    """(H, W), multiples of `factor`, near the input aspect, with H*W in [min_pixels, max_pixels].

    Round each side to the nearest multiple (Python `round`, ties to even); if that is over the
    budget, scale both by beta = sqrt(h*w / max) and floor; if under, by sqrt(min / (h*w)) and ceil.
    `strict=True` is transformers 4.52 (images): a side under `factor` or an aspect over 200 is a
    ValueError. `strict=False` is qwen-omni-utils (video frames): sides are clamped to >= factor.
    """
    if strict and (height < factor or width < factor):
        raise ValueError(f"height:{height} and width:{width} must be larger than factor:{factor}")
    if min(height, width) <= 0 or max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT}, got {height}x{width}")
    lower = factor if not strict else 0
    h_bar = max(lower, round(height / factor) * factor)
    w_bar = max(lower, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(lower, math.floor(height / beta / factor) * factor)
        w_bar = max(lower, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:  # 4.52 would go on with a zero side and fail later
        raise ValueError(f"{height}x{width} resizes to {h_bar}x{w_bar} under max_pixels {max_pixels}")
    return h_bar, w_bar


def image_size(height: int, width: int, cfg: ProcessorConfig) -> tuple[int, int]:
    """The (H, W) an image is resized to (strict 4.52 rule, image pixel bounds)."""
    low, high = cfg.image_min_pixels, cfg.image_max_pixels
    return smart_resize(height, width, factor=cfg.factor, min_pixels=low, max_pixels=high)


def flatten_patches(frames: torch.Tensor, cfg: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C, H, W) normalised frames -> patches (t*gh*gw, C*2*14*14) in merge-block order, grid (3,).

    T is padded to a multiple of the temporal patch by repeating the last frame. Rows come in
    merge-block order (each 2x2 block of patches is 4 consecutive rows, what the merger groups);
    columns are (channel, frame, py, px).
    """
    tps, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if frames.shape[0] % tps:
        frames = torch.cat([frames, frames[-1:].expand(tps - frames.shape[0] % tps, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // tps, h // p, w // p
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m}: resize first")
    # (gt*tps, C, H, W) -> (gt, tps, C, gh/m, m, p, gw/m, m, p) -> (gt, gh/m, gw/m, m, m, C, tps, p, p)
    x = frames.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tps * p * p), torch.tensor([gt, gh, gw], dtype=torch.long)


def _image_levels(cfg: ProcessorConfig) -> np.ndarray:
    """(256, 3) float32: the 4.52 slow image processor's value for each uint8 level of each channel,
    x * (1/255) in float64 cast to float32, then (x - mean) / std in float32."""
    x = (torch.arange(256, dtype=torch.float64)[:, None].expand(256, 3) * (1 / 255)).to(torch.float32)
    return ((x - torch.tensor(cfg.image_mean, dtype=torch.float32)) / torch.tensor(cfg.image_std, dtype=torch.float32)).numpy()


def _normalise_image(pixels: np.ndarray, cfg: ProcessorConfig) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 by table lookup. The processor's arithmetic is elementwise
    on uint8 input and IEEE operations are correctly rounded, so each value is exactly its result,
    without the float64 pass over every pixel."""
    levels = _image_levels(cfg)
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for c in range(3):
        out[c] = levels[:, c][pixels[..., c]]
    return torch.from_numpy(out)


def _single_frame_patches(frame: torch.Tensor, cfg: ProcessorConfig) -> torch.Tensor:
    """`flatten_patches` of one (C, H, W) frame repeated over the temporal patch, with the repeat
    made by the final copy (an expanded view) instead of a copy of its own."""
    tps, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    c, h, w = frame.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m}: resize first")
    gh, gw = h // p, w // p
    # (C, H, W) -> (gh/m, gw/m, m, m, C, 1, p, p) -> repeated over tps: rows and columns as flatten_patches
    x = frame.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
    return x.expand(gh // m, gw // m, m, m, c, tps, p, p).reshape(gh * gw, c * tps * p * p)


def process_image(image: Image.Image, cfg: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB PIL image -> pixel_values (N, 1176) float32 and grid_thw (3,) = (1, H/14, W/14).

    As the 4.52 slow processor: PIL bicubic resize to `image_size`, x * (1/255) in float64 cast to
    float32, (x - mean) / std in float32 (by exact table lookup); the single frame is repeated to
    fill the temporal patch.
    """
    height, width = image_size(image.height, image.width, cfg)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    frame = _normalise_image(np.asarray(image, dtype=np.uint8), cfg)
    grid = torch.tensor([1, height // cfg.patch_size, width // cfg.patch_size], dtype=torch.long)
    return _single_frame_patches(frame, cfg), grid


def process_video(frames: torch.Tensor, cfg: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 3, H, W) frames in 0..255, already resized (H, W multiples of 28) -> (N, 1176), grid (3,).

    As `Qwen2VLVideoProcessor`: (x - 255 mean) / (255 std) in float32, T padded to even.
    """
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32) * 255.0
    std = torch.tensor(cfg.image_std, dtype=torch.float32) * 255.0
    x = (frames.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    return flatten_patches(x, cfg)


def image_inputs(images: Sequence[Image.Image], cfg: ProcessorConfig) -> dict[str, torch.Tensor]:
    """Batch keys for several images: `pixel_values` (sum N, 1176), `image_grid_thw` (n, 3)."""
    done = [process_image(image, cfg) for image in images]
    return {"pixel_values": torch.cat([v for v, _ in done]), "image_grid_thw": torch.stack([g for _, g in done])}


def video_inputs(videos: Sequence[VideoFrames], cfg: ProcessorConfig) -> dict[str, torch.Tensor]:
    """Batch keys for several decoded videos: `pixel_values_videos`, `video_grid_thw` (n, 3) and
    `video_second_per_grid` (n,) = temporal_patch_size / fps of each."""
    done = [process_video(video.frames, cfg) for video in videos]
    return {
        "pixel_values_videos": torch.cat([v for v, _ in done]),
        "video_grid_thw": torch.stack([g for _, g in done]),
        "video_second_per_grid": torch.tensor([video.second_per_grid for video in videos], dtype=torch.float32),
    }


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    log = mel >= 15.0
    return np.where(log, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


def mel_filters(cfg: ProcessorConfig) -> torch.Tensor:
    """(n_fft/2 + 1, n_mels) = (201, 128) Slaney-normalised triangular filters over 0..8000 Hz.

    Built in float64 and cast to float32, as HF's `mel_filter_bank(norm="slaney", mel_scale="slaney")`.
    """
    bins = N_FFT // 2 + 1
    fft_hz = np.linspace(0.0, cfg.sampling_rate // 2, bins)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(8000.0)), cfg.n_mels + 2))
    width = np.diff(edges)
    offset = edges[None, :] - fft_hz[:, None]  # (bins, n_mels + 2)
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (edges[2:] - edges[:-2])  # Slaney: equal area per filter
    return torch.from_numpy(filters.astype(np.float32))


def audio_features(wave: torch.Tensor, cfg: ProcessorConfig) -> torch.Tensor:
    """(N,) float32 16 kHz mono -> log-mel features (n_mels, L), L = ceil(N / 160) valid frames.

    HF pads every clip with zeros to 300 s, takes the STFT (n_fft 400, hop 160, periodic Hann,
    centred with reflect padding) and clamps the log10 mel at (max over the *whole* window) - 8.
    That max also covers the two or three frames after the clip whose windows still overlap its
    last samples (they can be the loudest), and a silent frame (log10(1e-10) = -10) whenever the
    clip is shorter than the window. So the clip is padded with 400 zeros (at least 200 past its
    end: the reflect padding at the end then mirrors zeros, as HF sees them), which yields exactly
    those frames, all equal to HF's; the max is taken over them, the first L are returned. A clip
    within 400 samples of the window is padded to the window and HF's last frame dropped.
    Clips longer than `cfg.audio_max_samples` are cut to it, as HF's truncation.
    """
    wave = wave.to(torch.float32).reshape(-1)[: cfg.audio_max_samples]
    n = wave.numel()
    if n == 0:
        raise ValueError("audio_features: empty waveform")
    frames = -(-n // HOP_LENGTH)
    padded = min(frames * HOP_LENGTH + N_FFT, cfg.audio_max_samples)
    wave = torch.nn.functional.pad(wave, (0, padded - n))
    window = torch.hann_window(N_FFT, dtype=torch.float32)
    spec = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    if padded == cfg.audio_max_samples:
        spec = spec[:, :-1]  # HF drops the frame centred on the window's end
    power = spec.abs() ** 2  # (201, frames computed)
    log_mel = torch.clamp(mel_filters(cfg).T @ power, min=1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0)[:, :frames].contiguous()


def audio_inputs(waves: Sequence[torch.Tensor], cfg: ProcessorConfig) -> dict[str, torch.Tensor]:
    """Packed batch keys for several clips: `input_features` (n_mels, sum L), `audio_feature_lengths` (n,)."""
    feats = [audio_features(wave, cfg) for wave in waves]
    return {
        "input_features": torch.cat(feats, dim=1),
        "audio_feature_lengths": torch.tensor([f.shape[1] for f in feats], dtype=torch.long),
    }
