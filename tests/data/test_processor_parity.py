"""Processor parity with transformers 4.52.4: Qwen2VLImageProcessor (slow, PIL), Qwen2VLVideoProcessor,
WhisperFeatureExtractor(feature_size=128, chunk_length=300) on media generated here.

Tolerances: pixel values exact (0.0: same PIL resize, same float64 rescale and float32 normalise);
log-mel features atol 1e-5 on the valid frames (measured max 1.2e-7: FFT / matmul rounding of the
shorter STFT); valid lengths and grids exact.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from media_samples import painted_video
from PIL import Image

from omnicore.data import (
    ProcessorConfig,
    audio_features,
    audio_inputs,
    decode_image,
    decode_video,
    image_inputs,
    smart_resize,
    video_from_frames,
    video_inputs,
)
from omnicore.data.processor import mel_filters
from omnicore.models.positions import audio_token_count

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

CFG = ProcessorConfig()
MEL_ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_image():
    return Qwen2VLImageProcessor(min_pixels=CFG.image_min_pixels, max_pixels=CFG.image_max_pixels)


@pytest.fixture(scope="module")
def hf_video():
    return Qwen2VLVideoProcessor(min_pixels=CFG.video_min_pixels, max_pixels=CFG.video_max_pixels)


def _hf_audio(chunk_length=300):
    return WhisperFeatureExtractor(feature_size=128, chunk_length=chunk_length)


def _hf_features(wave: np.ndarray, chunk_length: int = 300) -> tuple[torch.Tensor, int]:
    """HF's (n_mels, whole window) features of one clip, as the Omni processor calls it, and its valid frames."""
    out = _hf_audio(chunk_length)(
        [wave], sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt"
    )
    return out["input_features"][0], int(out["attention_mask"].sum())


def test_smart_resize_reference_examples_and_errors():
    kw = dict(min_pixels=CFG.image_min_pixels, max_pixels=CFG.image_max_pixels)
    assert smart_resize(480, 640, **kw) == (476, 644)
    assert smart_resize(1080, 1920, **kw) == (1092, 1932)
    assert smart_resize(50, 50, **kw) == (56, 56)
    with pytest.raises(ValueError, match="larger than factor"):
        smart_resize(20, 500, **kw)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 28 * 201, **kw)
    # qwen-omni-utils' frame rule clamps small sides instead of failing
    assert smart_resize(20, 500, min_pixels=0, max_pixels=10**6, strict=False) == (28, 504)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(28, 6000),
    st.integers(28, 6000),
    st.sampled_from([(3136, 12845056), (100352, 602112), (0, 16384), (3136, 262144)]),
)
def test_smart_resize_equals_hf(height, width, bounds):
    if max(height, width) / min(height, width) > 200:
        return
    low, high = bounds
    expected = hf_smart_resize(height, width, factor=28, min_pixels=low, max_pixels=high)
    if 0 in expected:  # HF returns a zero side here; we refuse it
        with pytest.raises(ValueError):
            smart_resize(height, width, min_pixels=low, max_pixels=high)
        return
    assert smart_resize(height, width, min_pixels=low, max_pixels=high) == expected


IMAGE_CASES = [
    ((480, 640), "RGB"),
    ((50, 50), "RGB"),
    ((33, 517), "RGBA"),
    ((1080, 1920), "L"),
    ((300, 29), "P"),
    ((97, 203), "CMYK"),  # saved as JPEG
]


@pytest.mark.parametrize("size,mode", IMAGE_CASES)
def test_image_pixel_values_equal_hf(hf_image, size, mode):
    """The same file through HF's path (PIL open, its RGB conversion, the slow processor) and ours."""
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    ours = image_inputs([decode_image(buf.getvalue())], CFG)
    ref = hf_image(images=[Image.open(io.BytesIO(buf.getvalue()))], return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].dtype == torch.float32 and ours["pixel_values"].shape[1] == 1176
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])


def test_several_images_concatenate_in_order(hf_image):
    rng = np.random.default_rng(1)
    sizes = [(64, 90), (200, 120), (56, 56)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    ours, ref = image_inputs(images, CFG), hf_image(images=images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])


@pytest.mark.parametrize("frames,fps,size", [(30, 10, (224, 224)), (9, 3, (120, 336)), (61, 24, (96, 160))])
def test_video_pixel_values_equal_hf(hf_video, frames, fps, size):
    video = decode_video(painted_video(frames, fps, height=size[0], width=size[1]), CFG)
    ours = video_inputs([video], CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf_video(videos=[video.frames.float()], return_tensors="pt")
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert ours["video_second_per_grid"].tolist() == [2 / CFG.video_fps]


def test_frame_list_video_and_odd_count_equal_hf(hf_video):
    images = [Image.fromarray(np.full((100, 150, 3), 20 * k, np.uint8)) for k in range(5)]
    video = video_from_frames(images, CFG)
    assert video.frames.shape[0] == 6 and video.indices == (0, 1, 2, 3, 4, 4)  # padded by the last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf_video(videos=[video.frames[:5].float()], return_tensors="pt")  # HF pads the same way
    ours = video_inputs([video], CFG)
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])


def _clips():
    rng = np.random.default_rng(0)
    burst = (0.001 * rng.standard_normal(5120)).astype(np.float32)
    burst[-40:] = 0.9 * np.sign(rng.standard_normal(40))  # loudest where only frames after the clip look
    return {
        "150 samples": (0.1 * rng.standard_normal(150)).astype(np.float32),
        "1 s + 17": (0.1 * rng.standard_normal(16017)).astype(np.float32),
        "3.7 s tone": (0.5 * np.sin(np.arange(59200) * 0.07)).astype(np.float32),
        "burst at end": burst,
        "silence": np.zeros(3210, np.float32),
    }


@pytest.mark.parametrize("name", list(_clips()))
def test_audio_features_equal_hf_valid_frames(name):
    wave = _clips()[name]
    ref, valid = _hf_features(wave)
    ours = audio_features(torch.from_numpy(wave), CFG)
    assert ours.shape == (128, valid) and valid == math.ceil(wave.size / 160)
    diff = (ours - ref[:, :valid]).abs().max().item()
    assert diff <= MEL_ATOL, f"{name}: max abs diff {diff}"


def test_burst_case_pins_the_padding_rule():
    """HF's clamp max for the burst clip sits in a frame after the last valid one, so computing the
    clip alone (reflect padding, max over valid frames) is wrong by far more than the tolerance."""
    wave = _clips()["burst at end"]
    feats, valid = _hf_features(wave)
    assert feats.max() > feats[:, :valid].max() + 0.1
    stft = torch.stft(torch.from_numpy(wave), 400, 160, window=torch.hann_window(400), return_complex=True)
    naive = torch.clamp(mel_filters(CFG).T @ stft[:, :valid].abs() ** 2, min=1e-10).log10()
    naive = (torch.maximum(naive, naive.max() - 8) + 4) / 4
    assert (naive - feats[:, :valid]).abs().max() > 0.1
    assert (audio_features(torch.from_numpy(wave), CFG) - feats[:, :valid]).abs().max() <= MEL_ATOL


@pytest.mark.parametrize("samples", [15_700, 15_990, 16_000, 17_000])
def test_audio_features_at_the_window_edge_equal_hf(samples):
    """A 1 s window stands in for 300 s: clips near it, at it and over it (cut, as HF truncates)."""
    cfg = ProcessorConfig(audio_max_samples=16_000)
    wave = (0.2 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    ref, valid = _hf_features(wave, chunk_length=1)
    ours = audio_features(torch.from_numpy(wave), cfg)
    assert ours.shape[1] == valid == min(math.ceil(samples / 160), 100)
    assert (ours - ref[:, :valid]).abs().max().item() <= MEL_ATOL


def test_mel_filters_equal_hf():
    ours = mel_filters(CFG)
    ref = torch.from_numpy(_hf_audio().mel_filters.astype(np.float32))
    assert ours.shape == (201, 128)
    assert (ours - ref).abs().max().item() <= 1e-8


def test_audio_inputs_pack_clips_for_the_thinker():
    clips = [torch.from_numpy(c) for c in _clips().values()]
    batch = audio_inputs(clips, CFG)
    lengths = [math.ceil(c.numel() / 160) for c in clips]
    assert batch["audio_feature_lengths"].tolist() == lengths
    assert batch["input_features"].shape == (128, sum(lengths))
    assert audio_token_count(lengths[2]) == 92  # 3.7 s -> 370 frames -> 185 after the conv -> 92 tokens


def test_processor_config_from_hf():
    cfg = ProcessorConfig.from_hf(
        {
            "min_pixels": 3136,
            "max_pixels": 262144,
            "feature_size": 128,
            "chunk_length": 300,
            "sampling_rate": 16000,
            "n_fft": 400,
            "hop_length": 160,
            "patch_size": 14,
        }
    )
    assert cfg.image_max_pixels == 262144 and cfg.audio_max_samples == 4_800_000
    with pytest.raises(ValueError, match="hop_length"):
        ProcessorConfig.from_hf({"hop_length": 320})
    with pytest.raises(ValueError, match="video_maxlen"):
        ProcessorConfig(video_maxlen=0)
    with pytest.raises(ValueError, match="video_min_pixels"):
        ProcessorConfig(video_min_pixels=-1)
