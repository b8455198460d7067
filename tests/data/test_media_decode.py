"""Decoders: audio against librosa, video frame sampling against the written rules, frame lists.

Resampling tolerance: atol 1e-6 against `librosa.load(path, sr=16000)` (measured: 0.0, bit-exact,
since both read with libsndfile, average channels in float32 and call soxr HQ).
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from media_samples import audio_bytes, audio_in_container, chirp, painted_frame, painted_video, pcm16, read_painted
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from omnicore.data import (
    MediaError,
    ProcessorConfig,
    Reason,
    decode_audio,
    decode_image,
    decode_video,
    decode_video_audio,
    video_from_frames,
)
from omnicore.data.video import frame_count, frame_indices, frame_pixel_bounds, frame_size

CFG = ProcessorConfig()
RESAMPLE_ATOL = 1e-6


@pytest.mark.parametrize(
    "fmt,subtype,channels",
    [
        ("WAV", "PCM_16", 2),
        ("WAV", "FLOAT", 1),
        ("FLAC", "PCM_24", 2),
        ("MP3", "MPEG_LAYER_III", 2),
        ("OGG", "VORBIS", 1),
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # librosa's audioread import
def test_44k_audio_matches_librosa_load(tmp_path, fmt, subtype, channels):
    librosa = pytest.importorskip("librosa")
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(audio_bytes(chirp(2.3, 44100, channels), 44100, fmt, subtype))
    with open(path, "rb") as f:
        ours = decode_audio(f)
    ref, rate = librosa.load(path, sr=16000)
    assert rate == 16000 and ours.dtype == torch.float32 and ours.shape == ref.shape
    diff = np.abs(ours.numpy() - ref).max()
    assert diff <= RESAMPLE_ATOL, f"{fmt}/{subtype}: max abs diff {diff}"


def test_16k_mono_is_returned_unchanged():
    wave = chirp(1.0, 16000)
    ours = decode_audio(audio_bytes(wave, 16000, "WAV", "FLOAT"))
    assert torch.equal(ours, torch.from_numpy(wave[:, 0]))


def test_ffmpeg_containers_decode_like_soundfile():
    """soundfile cannot read Matroska: PyAV decodes it, to the same samples as the WAV of the same PCM."""
    wave = chirp(1.5, 44100, 2)
    wav = decode_audio(audio_bytes(pcm16(wave), 44100, "WAV", "PCM_16"))
    mkv = audio_in_container(wave, 44100, "matroska", "pcm_s16le")
    assert torch.allclose(decode_audio(mkv), wav, atol=1e-6)
    assert torch.allclose(decode_video_audio(mkv), wav, atol=1e-6)


def test_aac_m4a_decodes_to_the_right_length_and_level():
    wave = chirp(2.0, 44100, 1)
    ours = decode_audio(audio_in_container(wave, 44100, "mp4", "aac"))
    assert abs(ours.numel() / 16000 - 2.0) < 0.1  # encoder priming adds a few ms
    level = ours.pow(2).mean().sqrt().item() / float(np.sqrt((wave**2).mean()))
    assert 0.8 < level < 1.2


def test_video_sound_track():
    wave = chirp(3.0, 16000, 1)
    video = painted_video(30, 10, audio=(wave, 16000, "pcm_s16le"), fmt="matroska")
    track = decode_video_audio(video)
    assert torch.allclose(track, decode_audio(audio_bytes(pcm16(wave), 16000, "WAV", "PCM_16")), atol=1e-6)
    with pytest.raises(MediaError) as info:
        decode_video_audio(painted_video(8, 10))
    assert info.value.reason == Reason.NO_AUDIO


@pytest.mark.parametrize(
    "total,video_fps,settings,expected",
    [
        (30, 10.0, {}, 6),  # 3 s at 2 fps
        (300, 30.0, {}, 20),
        (9, 3.0, {}, 6),
        (61, 24.0, {}, 4),  # 5.08 -> floored to even
        (61, 24.0, {"video_fps": 1.0}, 4),  # 2.54 -> raised to min_frames
        (3, 30.0, {}, 2),  # min_frames 4 capped by floor2(total)
        (10000, 25.0, {}, 768),  # 800 capped by FPS_MAX_FRAMES
        (10000, 25.0, {"video_maxlen": 128}, 128),
        (10000, 25.0, {"video_maxlen": 7}, 6),
        (30, 10.0, {"video_min_frames": 7}, 8),  # ceil2(7) = 8
    ],
)
def test_frame_count_rules(total, video_fps, settings, expected):
    assert frame_count(total, video_fps, ProcessorConfig(**settings)) == expected


def test_frame_count_refuses_single_frame_videos():
    with pytest.raises(ValueError, match="fewer than 2"):
        frame_count(1, 30.0, CFG)


def test_frame_indices_and_pixel_bounds():
    assert frame_indices(30, 6) == [0, 6, 12, 17, 23, 29]
    assert frame_indices(61, 4) == [0, 20, 40, 60]
    assert frame_indices(8, 4) == [0, 2, 5, 7]
    assert frame_pixel_bounds(6, CFG) == (100352, 602112)
    assert frame_pixel_bounds(768, CFG) == (100352, 235200)  # total_pixels * 2 / n
    assert frame_pixel_bounds(4000, CFG)[1] == int(100352 * 1.05)  # never below 1.05 min
    assert frame_pixel_bounds(6, ProcessorConfig(video_max_pixels=16384))[1] == 16384  # lowers, like qwen-omni-utils
    assert frame_pixel_bounds(6, ProcessorConfig(video_max_pixels=10**6))[1] == 10**6  # raises, like LLaMA-Factory
    recipe = ProcessorConfig(video_max_pixels=16384, video_min_pixels=0, video_maxlen=128)  # MindSpeed-MM recipe
    assert frame_size(224, 224, 6, CFG) == (336, 336)
    assert frame_size(224, 224, 6, recipe) == (112, 112)
    assert frame_size(480, 640, 6, recipe) == (84, 140)


def _all_frames(data: bytes) -> torch.Tensor:
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)


@pytest.mark.parametrize(
    "total,fps,settings",
    [
        (30, 10, {}),
        (61, 24, {}),
        (100, 50, {"video_fps": 20.0, "video_maxlen": 16}),
        (3, 30, {}),
        (31, 10, {"video_fps": 1.0}),
    ],
)
def test_decoded_frames_are_the_rule_frames(total, fps, settings):
    """Frame k shows k: the frames that come back are exactly round(linspace(0, total-1, n)), and equal
    a decode-everything, batched-resize pipeline (what qwen-omni-utils does)."""
    cfg = ProcessorConfig(**settings)
    data = painted_video(total, fps)
    video = decode_video(data, cfg)
    expected = frame_indices(total, frame_count(total, float(fps), cfg))
    assert list(video.indices) == expected
    assert [read_painted(f.numpy()) for f in video.frames] == expected
    assert video.total_frames == total and video.video_fps == fps
    assert video.second_per_grid == 2 / cfg.video_fps
    assert video.frames.dtype == torch.uint8 and video.frames.shape[0] % 2 == 0
    size = frame_size(224, 224, len(expected), cfg)
    bicubic = InterpolationMode.BICUBIC
    reference = tvf.resize(_all_frames(data)[expected], list(size), interpolation=bicubic, antialias=True)
    assert torch.equal(video.frames, reference)


def test_frame_lists_keep_order_pad_to_even_and_respect_maxlen():
    images = [Image.fromarray(painted_frame(k, 112, 112)) for k in range(7)]
    video = video_from_frames(images, CFG)
    assert [read_painted(f.numpy()) for f in video.frames] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert video.video_fps is None and video.total_frames == 7
    capped = video_from_frames(images, ProcessorConfig(video_maxlen=4))
    assert [read_painted(f.numpy()) for f in capped.frames] == frame_indices(7, 4) == [0, 2, 4, 6]


def test_images_decode_to_rgb():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "TIFF", "WEBP", "GIF"):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        image = decode_image(buf.getvalue())
        assert image.mode == "RGB" and image.size == (30, 40)
        if fmt != "GIF":  # GIF quantises to a palette
            assert np.array_equal(np.asarray(image), array), fmt
