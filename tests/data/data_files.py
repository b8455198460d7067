"""Media and JSON files written by the dataset / template tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
from media_samples import painted_video
from PIL import Image


def write_image(path: Path, height: int = 56, width: int = 84, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_wav(path: Path, seconds: float = 1.0, seed: int = 0, rate: int = 16000) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate)
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1))
    return path


def write_video(path: Path, frames: int = 12, fps: int = 4, audio_seconds: float | None = None) -> Path:
    """An H.264 MP4 (painted frames), with a 16 kHz PCM sound track when `audio_seconds` is given."""
    audio = None
    if audio_seconds is not None:
        rng = np.random.default_rng(1)
        audio = ((0.1 * rng.standard_normal((int(audio_seconds * 16000), 1))).astype(np.float32), 16000, "aac")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(painted_video(frames, fps, audio=audio))
    return path
