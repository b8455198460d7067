"""The preprocessed-sample cache: hits and misses by content, one build among concurrent processes, a
killed build never read, corrupt entries and manifests detected and named.

Builds that must overlap or be killed run in child processes (`_child`, started with `python -c`),
made slow on purpose by a decoder that sleeps; every wait on a child has a deadline that names it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import torch
from data_files import write_image, write_json, write_video, write_wav

import omnicore.data.sample as sample_module
from omnicore import TINY
from omnicore.checkpoint.safetensors_io import SafetensorsFile
from omnicore.data import (
    MLLM,
    CacheError,
    CorruptEntry,
    ProcessorConfig,
    SampleContext,
    TemplateConfig,
    load_tokenizer,
    open_cache,
    process_sample,
    read_cache,
    read_dataset,
)
from omnicore.data.cache import BUILD_LOG, MANIFEST, cache_key

HERE = Path(__file__).resolve().parent
DECODERS = ("decode_image", "decode_audio", "decode_video", "decode_video_audio")


def turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_dataset(root: Path) -> Path:
    """Images, a clip, a video, a text-only record and one record whose image is missing."""
    for k in range(3):
        write_image(root / f"img{k}.png", 56, 84 + 28 * k, seed=k)
    write_wav(root / "clip.wav", 1.2, seed=5)
    write_video(root / "talk.mp4", frames=8, fps=4)
    records = [{"messages": turn(f"<image>What is in picture {k}?", "A cat."), "images": [f"img{k}.png"]} for k in range(3)]
    records += [
        {"messages": turn("<audio>What is said?", "Hello."), "audios": ["clip.wav"]},
        {"messages": turn("<video>What moves?", "Stripes."), "videos": ["talk.mp4"]},
        {"messages": turn("Name a prime number.", "11.")},
        {"messages": turn("<image>And this one?", "Nothing."), "images": ["missing.png"]},
    ]
    return write_json(root / "data.json", records)


def inputs(root: Path, model_dir: Path, **ctx_args):
    convs, _ = read_dataset(root / "data.json", MLLM)
    return convs, SampleContext(tokenizer=load_tokenizer(model_dir), model=TINY, **ctx_args)


@pytest.fixture
def dataset(tmp_path) -> Path:
    write_dataset(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Records every media decoding `process_sample` does (the decoders it calls, by name)."""
    calls: list[str] = []
    for name in DECODERS:
        real = getattr(sample_module, name)
        monkeypatch.setattr(sample_module, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    return calls


def log_lines(cache_dir: Path, word: str) -> list[str]:
    return [line for line in (cache_dir / BUILD_LOG).read_text().splitlines() if f" {word}" in line]


def all_samples(cache) -> list[dict[str, torch.Tensor]]:
    return [cache.load(i) for i in range(len(cache))]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), sorted(x)


def test_a_hit_reuses_the_cache_without_decoding_media(dataset, model_dir, tmp_path, decoded):
    convs, ctx = inputs(dataset, model_dir)
    built = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    assert built.built and len(built) == 6 and decoded  # the missing image is dropped
    assert built.stats.counts["dropped: media error"] == 1 and built.stats.counts["samples"] == 6
    assert "missing.png" in str(built.stats.bad[0])
    expected = [process_sample(c, ctx).to_dict() for c in convs[:6]]
    assert_same(all_samples(built), expected)

    decoded.clear()
    hit = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    assert not hit.built and hit.key == built.key
    assert_same(all_samples(hit), expected)
    assert decoded == []  # nothing decoded: every tensor came from the cache
    assert hit.stats.counts == built.stats.counts and [str(b) for b in hit.stats.bad] == [str(b) for b in built.stats.bad]
    assert len(log_lines(tmp_path / "cache", "commit")) == 1


CHANGES = {
    "a media file": lambda root, ctx: (write_image(root / "img1.png", 56, 112, seed=99), ctx)[1],
    "the pixel budget": lambda root, ctx: attrs.evolve(ctx, processor=ProcessorConfig(image_max_pixels=56 * 56)),
    "the template": lambda root, ctx: attrs.evolve(ctx, template=TemplateConfig(system_prompt="Be brief.")),
    "nothing": lambda root, ctx: ctx,
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_input_misses_the_cache(dataset, model_dir, tmp_path, decoded, change):
    convs, ctx = inputs(dataset, model_dir)
    first = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    before = all_samples(first)
    decoded.clear()
    ctx = CHANGES[change](dataset, ctx)
    again = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    if change == "nothing":
        assert not again.built and again.key == first.key and not decoded
        assert_same(all_samples(again), before)
        return
    assert again.built and again.key != first.key and decoded
    assert_same(all_samples(again), [process_sample(c, ctx).to_dict() for c in convs[:6]])
    changed = [i for i in range(6) if not all(torch.equal(before[i][k], v) for k, v in again.load(i).items() if k in before[i])]
    assert changed  # the new cache holds the new inputs' samples, not the old ones
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == sorted([first.key, again.key])


@pytest.mark.timeout(300)
def test_a_build_with_worker_processes_equals_one_without(dataset, model_dir, tmp_path):
    convs, ctx = inputs(dataset, model_dir)
    alone = open_cache(tmp_path / "a", convs, ctx, tokenizer_dir=model_dir, progress=False)
    pooled = open_cache(tmp_path / "b", convs, ctx, tokenizer_dir=model_dir, progress=False, workers=2, shard_samples=2)
    assert pooled.key == alone.key and len(pooled.entries) == 6 and len({e.shard for e in pooled.entries}) == 3
    assert [e.checksum for e in pooled.entries] == [e.checksum for e in alone.entries]
    assert_same(all_samples(pooled), all_samples(alone))
    assert pooled.stats.counts == alone.stats.counts


def test_overwrite_rebuilds_once_per_build_token(dataset, model_dir, tmp_path):
    convs, ctx = inputs(dataset, model_dir)
    args = {"tokenizer_dir": model_dir, "progress": False, "overwrite": True, "build_token": "run-1"}
    assert open_cache(tmp_path / "cache", convs, ctx, **args).built
    assert not open_cache(tmp_path / "cache", convs, ctx, **args).built  # another rank of the same run
    assert open_cache(tmp_path / "cache", convs, ctx, **(args | {"build_token": "run-2"})).built
    assert len(log_lines(tmp_path / "cache", "commit")) == 2


def test_a_corrupt_entry_is_detected_and_named(dataset, model_dir, tmp_path):
    convs, ctx = inputs(dataset, model_dir)
    cache = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    folder = tmp_path / "cache" / cache.key
    shard = folder / cache.entries[1].shard
    info = SafetensorsFile(shard).tensors["1/pixel_values"]
    with open(shard, "r+b") as f:  # flip one byte inside sample 1's pixels
        f.seek(info.begin + info.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    reopened = read_cache(folder)
    with pytest.raises(CorruptEntry, match=r"cache entry 1 \(id .*data\.json\[1\]\) in .*shard-00000.*checksum mismatch") as err:
        reopened.load(1)
    assert err.value.index == 1
    assert_same([reopened.load(0), reopened.load(2)], [cache.load(0), cache.load(2)])  # the others are intact


def test_a_damaged_manifest_is_rebuilt(dataset, model_dir, tmp_path):
    convs, ctx = inputs(dataset, model_dir)
    cache = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    manifest = tmp_path / "cache" / cache.key / MANIFEST
    manifest.write_text(manifest.read_text().replace('"samples": 6', '"samples": 7'))
    with pytest.raises(CacheError, match="checksum mismatch"):
        read_cache(manifest.parent)
    again = open_cache(tmp_path / "cache", convs, ctx, tokenizer_dir=model_dir, progress=False)
    assert again.built and again.stats.counts["samples"] == 6
    assert "unusable" in log_lines(tmp_path / "cache", "start")[-1]


def _child(root: str, model_dir: str, cache_dir: str, go: str, delay: str) -> None:
    """A builder process: slow decoding, waits for the `go` file, opens the cache, prints what it read."""
    real = sample_module.decode_image

    def slow(*args, **kwargs):
        time.sleep(float(delay))
        return real(*args, **kwargs)

    sample_module.decode_image = slow
    convs, ctx = inputs(Path(root), Path(model_dir))
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    cache = open_cache(cache_dir, convs, ctx, tokenizer_dir=model_dir, progress=True, shard_samples=1)
    checksums = [[k, float(v.double().sum())] for i in range(len(cache)) for k, v in sorted(cache.load(i).items())]
    print(json.dumps({"built": cache.built, "key": cache.key, "n": len(cache), "sums": checksums, "pid": os.getpid()}), flush=True)


def start_child(*args: str) -> subprocess.Popen:
    code = f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; import test_cache; test_cache._child(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(procs: dict[str, subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for name, proc in procs.items():
        while True:  # the first line a child prints is "ready"
            line = proc.stdout.readline()
            if line.strip() == "ready":
                break
            if not line or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{name} (pid {proc.pid}) never got ready: {proc.stderr.read()[-2000:]}")


def finish(procs: dict[str, subprocess.Popen], timeout: float = 120) -> dict[str, tuple[dict, str]]:
    """Each child's printed result and its stderr; a child still running at the deadline fails the test, named."""
    out, deadline = {}, time.monotonic() + timeout
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"{name} (pid {proc.pid}) is stuck: still running after {timeout:.0f} s")
        assert proc.returncode == 0, f"{name} (pid {proc.pid}) failed:\n{stderr[-3000:]}"
        out[name] = (json.loads(stdout.strip().splitlines()[-1]), stderr)
    return out


@pytest.mark.timeout(300)
def test_two_processes_building_at_once_build_once(dataset, model_dir, tmp_path):
    go = tmp_path / "go"
    procs = {f"builder {k}": start_child(dataset, model_dir, tmp_path / "cache", go, 0.4) for k in (1, 2)}
    wait_ready(procs)
    go.touch()  # both call open_cache now; the build takes over a second, so one waits for the other
    results = finish(procs)
    (a, err_a), (b, err_b) = results.values()
    assert sorted([a["built"], b["built"]]) == [False, True]  # exactly one built
    assert a["key"] == b["key"] and a["n"] == b["n"] == 6 and a["sums"] == b["sums"]  # both read the same samples
    waiter_err = err_b if a["built"] else err_a
    assert "waiting for another process building" in waiter_err  # they did overlap: one waited on the lock
    assert len(log_lines(tmp_path / "cache", "start")) == len(log_lines(tmp_path / "cache", "commit")) == 1
    builder = a if a["built"] else b
    assert json.loads((tmp_path / "cache" / a["key"] / MANIFEST).read_text())["build"]["pid"] == builder["pid"]


@pytest.mark.timeout(300)
def test_a_build_killed_midway_is_rebuilt_not_read(dataset, model_dir, tmp_path):
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    convs, ctx = inputs(dataset, model_dir)
    key = cache_key(convs, ctx, tokenizer_dir=model_dir).digest
    proc = start_child(dataset, model_dir, cache_dir, go, 1.0)
    wait_ready({"builder": proc})
    go.touch()
    leftover = cache_dir / f".build-{key}-{proc.pid}"
    deadline = time.monotonic() + 120
    while not list(leftover.glob("shard-*.safetensors")):  # killed once some shards are written
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"builder (pid {proc.pid}) wrote no shard in time: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert leftover.exists() and not (cache_dir / key).exists()
    # Even a folder under the final name holding those shards but no manifest is not a cache.
    shutil.copytree(leftover, cache_dir / key)
    with pytest.raises(CacheError, match="no manifest.json"):
        read_cache(cache_dir / key)

    cache = open_cache(cache_dir, convs, ctx, tokenizer_dir=model_dir, progress=False)
    assert cache.built and not leftover.exists()
    assert_same(all_samples(cache), [process_sample(c, ctx).to_dict() for c in convs[:6]])
    starts = log_lines(cache_dir, "start")
    assert len(starts) == 2 and "no manifest.json" in starts[-1] and len(log_lines(cache_dir, "commit")) == 1
