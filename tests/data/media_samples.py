"""Media made inside the tests (no downloads): painted videos, chirps, hand-built PNG headers.

A painted video's frame k shows k in binary: 8 vertical stripes, stripe b white when bit b of k is
set, so the sampled frames can be read back after encoding, decoding and resizing.
"""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import soundfile

BITS = 8


def painted_frame(k: int, height: int = 224, width: int = 224) -> np.ndarray:
    """(H, W, 3) uint8 showing k in binary as BITS vertical stripes."""
    img = np.zeros((height, width, 3), np.uint8)
    for b in range(BITS):
        if k >> b & 1:
            img[:, b * width // BITS : (b + 1) * width // BITS] = 255
    return img


def read_painted(frame: np.ndarray) -> int:
    """The k painted into a (3, H, W) or (H, W, 3) frame (stripe centres, red channel)."""
    chw = frame if frame.shape[0] == 3 else frame.transpose(2, 0, 1)
    h, w = chw.shape[1:]
    return sum(int(chw[0, h // 2, int((b + 0.5) * w / BITS)] > 127) << b for b in range(BITS))


def chirp(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(N, channels) float32: a 100 Hz -> 6 kHz sweep plus some noise, different per channel."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    sweep = 0.3 * np.sin(2 * np.pi * (100 + 3000 * t / max(seconds, 1e-9)) * t)
    noise = 0.05 * rng.standard_normal((channels, t.size))
    return np.stack([sweep * (0.5 + 0.5 * c) + noise[c] for c in range(channels)], 1).astype(np.float32)


def pcm16(wave: np.ndarray) -> np.ndarray:
    """(N, channels) float -> int16, the PCM both soundfile and FFmpeg containers then store as is."""
    return np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)


def audio_bytes(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _audio_stream(container, wave: np.ndarray, rate: int, codec: str):
    """A new audio stream of `container` and the one frame holding (N, channels) float32 `wave`."""
    layout = "mono" if wave.shape[1] == 1 else "stereo"
    stream = container.add_stream(codec, rate=rate, layout=layout)
    fmt = "s16" if codec.startswith("pcm_s16") else stream.codec_context.format.name
    if fmt == "s16":
        data = pcm16(wave).reshape(1, -1)  # packed (1, N * channels)
    else:
        data = np.ascontiguousarray(wave.T)  # planar float
    frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    return stream, frame


def _encode(container, stream, frame) -> None:
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def painted_video(
    n_frames: int,
    fps: int,
    *,
    height: int = 224,
    width: int = 224,
    fmt: str = "mp4",
    audio: tuple[np.ndarray, int, str] | None = None,
) -> bytes:
    """An H.264 video whose frame k is `painted_frame(k)`; optional (wave, rate, codec) sound track."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12"}
        sound = _audio_stream(container, *audio) if audio is not None else None  # all streams before muxing
        for k in range(n_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(painted_frame(k, height, width), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            _encode(container, *sound)
    return buf.getvalue()


def audio_in_container(wave: np.ndarray, rate: int, fmt: str, codec: str) -> bytes:
    """An audio-only file in an FFmpeg container soundfile cannot read (m4a, mkv, ...)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        _encode(container, *_audio_stream(container, wave, rate, codec))
    return buf.getvalue()


def video_without_frames() -> bytes:
    """A Matroska file with an H.264 video stream that holds no frame (and a short sound track)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        _encode(container, *_audio_stream(container, np.zeros((16000, 1), np.float32), 16000, "pcm_s16le"))
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but carries one compressed row: a bomb header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def image_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format=fmt)
    return buf.getvalue()


def mp3_with_cover(wave: np.ndarray, rate: int) -> bytes:
    """An MP3 whose ID3v2.3 tag holds a JPEG cover (FFmpeg shows it as an attached_pic video stream)."""
    body = b"\x00image/jpeg\x00\x03\x00" + image_bytes(painted_frame(3, 64, 64), "JPEG")
    frame = b"APIC" + struct.pack(">I", len(body)) + b"\x00\x00" + body
    size = bytes((len(frame) >> shift) & 127 for shift in (21, 14, 7, 0))  # ID3 "syncsafe" integer
    return b"ID3\x03\x00\x00" + size + frame + audio_bytes(wave, rate, "MP3", "MPEG_LAYER_III")
