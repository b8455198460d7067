"""Mutated media through a real cache build (worker processes, per-sample decode timeout): truncated
and byte-flipped PNG, JPEG, WebP, WAV, FLAC, MP3, MP4 and WebM files never crash or hang the build;
each one is either a sample or a bad sample with its reason. A decoder that hangs costs one worker
and is recorded as timed out.

CI runs 3 mutants per format; the full count (200 per format) runs with
    OMNICORE_FULL_FAULTS=1 python -m pytest tests/data/test_media_mutants.py -p no:cacheprovider -s
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
from data_files import write_json
from media_samples import audio_bytes, chirp, image_bytes, mp3_with_cover, painted_frame, painted_video

import omnicore.data.sample as sample_module
from omnicore import TINY
from omnicore.data import MLLM, SampleContext, load_tokenizer, open_cache, read_dataset
from omnicore.data.workers import WorkerDied, worker_map

PER_FORMAT = 200 if os.environ.get("OMNICORE_FULL_FAULTS") else 3
WAVE = chirp(1.0, 16000)


def _webm() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for k in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(painted_frame(k, 64, 64), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _originals() -> dict[str, tuple[str, bytes]]:
    """format -> (the record's media kind, the intact file's bytes)."""
    picture = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    return {
        "png": ("images", image_bytes(picture, "PNG")),
        "jpg": ("images", image_bytes(picture, "JPEG")),
        "webp": ("images", image_bytes(picture, "WEBP")),
        "wav": ("audios", audio_bytes(WAVE, 16000)),
        "flac": ("audios", audio_bytes(WAVE, 16000, "FLAC")),
        "mp3": ("audios", mp3_with_cover(WAVE, 16000)),
        "mp4": ("videos", painted_video(6, 4, height=64, width=64)),
        "webm": ("videos", _webm()),
    }


def mutants(data: bytes, count: int, seed: int) -> list[bytes]:
    """Half truncations at random lengths, half copies with 1-16 random bytes flipped."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        if k % 2 == 0:
            out.append(data[: int(rng.integers(0, len(data)))])
        else:
            buf = bytearray(data)
            for pos in rng.integers(0, len(buf), int(rng.integers(1, 17))):
                buf[pos] ^= int(rng.integers(1, 256))
            out.append(bytes(buf))
    return out


def _write_mutants(root: Path) -> int:
    records = []
    tag = {"images": "<image>", "audios": "<audio>", "videos": "<video>"}
    for j, (fmt, (kind, data)) in enumerate(_originals().items()):
        for k, blob in enumerate(mutants(data, PER_FORMAT, seed=j)):
            name = f"{fmt}-{k:03d}.{fmt}"
            (root / name).write_bytes(blob)
            records.append({"messages": [{"role": "user", "content": f"{tag[kind]}What is it?"}, {"role": "assistant", "content": "A test."}],
                            kind: [name]})  # fmt: skip
    write_json(root / "data.json", records)
    return len(records)


@pytest.mark.timeout(1800 if PER_FORMAT > 3 else 300)
def test_mutated_media_never_crash_or_hang_a_build(tmp_path, model_dir):
    root = tmp_path / "media"
    root.mkdir()
    total = _write_mutants(root)
    convs, _ = read_dataset(root / "data.json", MLLM)
    ctx = SampleContext(tokenizer=load_tokenizer(model_dir), model=TINY)
    started = time.monotonic()
    cache = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, workers=2, decode_timeout=60, progress=False)
    seconds = time.monotonic() - started
    bad = cache.stats.bad
    assert len(cache) + len(bad) == total  # every mutant accounted for: a sample or a named bad sample
    assert all(str(b) and ".json" in str(b) for b in bad)
    by_format = {fmt: sum(1 for b in bad if f"{fmt}-" in str(b)) for fmt in _originals()}
    print(f"\n{total} mutants ({PER_FORMAT} per format) in {seconds:.1f} s: {len(cache)} usable, {len(bad)} bad samples; "
          f"bad per format {by_format}")  # fmt: skip


def _slow_on_item_two(item: int) -> int:
    if item == 2:
        time.sleep(120)
    return item * 10


@pytest.mark.timeout(120)
def test_a_hanging_item_times_out_and_costs_one_worker():
    started = time.monotonic()
    out = list(worker_map(_slow_on_item_two, range(5), workers=2, timeout=2.0))
    assert out[:2] == [0, 10] and out[3:] == [30, 40]
    assert out[2] == WorkerDied(2, "timed out after 2 s")
    assert time.monotonic() - started < 30


@pytest.mark.timeout(300)
def test_a_decoder_that_hangs_is_a_bad_sample_not_a_hung_build(tmp_path, model_dir, monkeypatch):
    root = tmp_path / "media"
    root.mkdir()
    picture = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    for k in range(3):
        (root / f"img{k}.png").write_bytes(image_bytes(picture, "PNG"))
    q = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A test."}]
    write_json(root / "data.json", [{"messages": q, "images": [f"img{k}.png"]} for k in range(3)])
    real = sample_module.decode_image

    def stuck_on_img1(source, *args, **kwargs):  # inherited by the forked workers
        if "img1" in str(getattr(source, "name", source)):
            time.sleep(600)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(sample_module, "decode_image", stuck_on_img1)
    convs, _ = read_dataset(root / "data.json", MLLM)
    ctx = SampleContext(tokenizer=load_tokenizer(model_dir), model=TINY)
    cache = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, workers=1, decode_timeout=3, progress=False)
    assert len(cache) == 2
    assert len(cache.stats.bad) == 1 and "timed out after 3 s while decoding it" in str(cache.stats.bad[0])
