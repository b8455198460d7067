"""Conversion speed and memory against a plain copy of the same bytes, in one run.

The benchmark writes a synthetic HF checkpoint (>= 1 GB of bf16 weights, largest tensor 131 MB),
then alternates: a plain Python read + write + fsync copy of its shard files (the reference),
`hf-to-native --tp 2` and `native-to-hf` (each in a fresh process, timing only the conversion).
"cold" drops the inputs from the page cache first (posix_fadvise DONTNEED), "warm" reads them first.
Peak RSS is the kernel's high-water mark of the converting process (absolute, and its growth over
the post-import baseline). Goals: time <= 1.5x the copy, peak RSS <= 1.5x largest group + 500 MB.

    pytest benches/bench_convert.py -s                  # writes bench_results/convert.json
    pytest benches/bench_convert.py -s --bench-quick    # a ~100 MB checkpoint, one round (CI)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import write_record  # noqa: E402
from hf_reference import synthetic_hf_folder  # noqa: E402

from omnicore.config import AudioConfig, TextConfig, ThinkerConfig, TokenIds, VisionConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIME_RATIO_GOAL = 1.5  # conversion time / plain copy time, cold and warm
RSS_GOAL_FACTOR, RSS_GOAL_SLACK = 1.5, 500 * 2**20  # peak RSS <= factor x largest group + slack


def _config(vocab: int, hidden: int, layers: int, ffn: int) -> ThinkerConfig:
    return ThinkerConfig(
        text=TextConfig(vocab_size=vocab, hidden=hidden, n_layers=layers, n_heads=16, n_kv_heads=4, ffn=ffn,
                        rope_theta=1e6, rms_eps=1e-6, mrope_section=(hidden // 128, hidden * 3 // 256, hidden * 3 // 256)),
        vision=VisionConfig(depth=2, hidden=128, n_heads=2, ffn=256, in_channels=3, patch_size=14, temporal_patch_size=2,
                            spatial_merge_size=2, window_size=112, fullatt_blocks=(1,), out_hidden=hidden),
        audio=AudioConfig(n_mels=128, d_model=128, n_layers=2, n_heads=2, ffn=256, max_source_positions=1500, n_window=100, output_dim=hidden),
        tokens=TokenIds(audio=vocab - 10, audio_start=vocab - 9, audio_end=vocab - 8, vision_start=vocab - 7, vision_end=vocab - 6, image=vocab - 5, video=vocab - 4),
        position_id_per_seconds=25,
        seconds_per_chunk=2,
    )  # fmt: skip


FULL = _config(vocab=32000, hidden=2048, layers=8, ffn=5632)  # ~1.1 GB bf16, embed / lm_head 131 MB each
QUICK = _config(vocab=8000, hidden=1024, layers=4, ffn=2816)  # ~100 MB

_CONVERT = """
import json, re, sys, time
from omnicore_dist.convert import main
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here on excludes the imports
base = status("VmRSS")
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "base_rss": base, "peak_rss": status("VmHWM"), "code": code}))
"""


def _convert(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CONVERT, *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=1800)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, out.stderr
    return result


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors"))


def _drop_cache(paths: list[Path]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(8 * 2**20):
                pass


def _copy(files: list[Path], out: Path) -> float:
    """The reference: read + write + fsync the same bytes with plain Python."""
    out.mkdir(parents=True)
    start = time.perf_counter()
    for src in files:
        with open(src, "rb") as r, open(out / src.name, "wb") as w:
            while data := r.read(8 * 2**20):
                w.write(data)
            w.flush()
            os.fsync(w.fileno())
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def test_convert_vs_copy(tmp_path, request):
    quick = request.config.getoption("--bench-quick")
    cfg, rounds = (QUICK, 1) if quick else (FULL, 5)
    hf = tmp_path / "hf"
    total = synthetic_hf_folder(cfg, hf, dtype=torch.bfloat16, shard_bytes=512 * 2**20)
    largest = cfg.text.vocab_size * cfg.text.hidden * 2
    native = tmp_path / "native"
    _convert(["hf-to-native", "--hf-dir", str(hf), "--out-dir", str(native), "--tp", "2"])  # a source for native-to-hf

    results: dict[str, dict[str, list]] = {}
    for r in range(rounds):
        for cache in ("cold", "warm"):
            prepare = _drop_cache if cache == "cold" else _warm
            prepare(_files(hf))
            results.setdefault(f"copy/{cache}", {"seconds": []})["seconds"].append(_copy(_files(hf), tmp_path / "copy"))
            shutil.rmtree(tmp_path / "copy")
            prepare(_files(hf))
            run = _convert(["hf-to-native", "--hf-dir", str(hf), "--out-dir", str(tmp_path / "n"), "--tp", "2"])
            shutil.rmtree(tmp_path / "n")
            slot = results.setdefault(f"hf-to-native/{cache}", {"seconds": [], "peak_rss": [], "growth": []})
            slot["seconds"].append(run["seconds"])
            slot["peak_rss"].append(run["peak_rss"])
            slot["growth"].append(run["peak_rss"] - run["base_rss"])
            prepare(_files(native))
            run = _convert(["native-to-hf", "--native-dir", str(native), "--hf-dir", str(hf), "--out-dir", str(tmp_path / "e")])
            shutil.rmtree(tmp_path / "e")
            slot = results.setdefault(f"native-to-hf/{cache}", {"seconds": [], "peak_rss": [], "growth": []})
            slot["seconds"].append(run["seconds"])
            slot["peak_rss"].append(run["peak_rss"])
            slot["growth"].append(run["peak_rss"] - run["base_rss"])

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}
    record = {"bytes": total, "largest_tensor_bytes": largest, "rounds": rounds, "median": med, "ratios": {}}
    rss_goal = RSS_GOAL_FACTOR * largest + RSS_GOAL_SLACK
    for direction in ("hf-to-native", "native-to-hf"):
        for cache in ("cold", "warm"):
            key = f"{direction}/{cache}"
            ratio = med[key]["seconds"] / med[f"copy/{cache}"]["seconds"]
            record["ratios"][key] = ratio
            print(
                f"\n{key}: {med[key]['seconds']:.2f} s vs copy {med[f'copy/{cache}']['seconds']:.2f} s -> {ratio:.2f}x; "
                f"peak RSS {med[key]['peak_rss'] / 2**20:.0f} MiB (growth {med[key]['growth'] / 2**20:.0f} MiB; "
                f"goal {rss_goal / 2**20:.0f} MiB)"
            )
    record["rss_goal_bytes"] = rss_goal
    write_record("convert", record)
    if not quick:
        assert max(record["ratios"].values()) <= TIME_RATIO_GOAL, record["ratios"]
        assert max(med[k]["peak_rss"] for k in med if not k.startswith("copy")) <= rss_goal
