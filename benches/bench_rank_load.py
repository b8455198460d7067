"""Loading one TP rank's weights: its own pieces (RankPieces) against reading the whole model and
cutting it (what every rank did before), in one run, each load in a fresh process.

TP rank 0 of LLM TP 4 with the encoders at TP 1 (hetero) loads from: a native checkpoint saved at
those sizes (its own files only), one saved at TP 2 (its pieces lie inside the saved pieces of rank
0: read from those files alone) and the HF folder (row-split pieces read as their own bytes). Warm
page cache; seconds and the peak RSS growth over the post-import baseline, each load in a fresh
process. The rank holds about a quarter of the text tower plus the encoders; the old path read and
held the whole model first.

    pytest benches/bench_rank_load.py -s                  # writes bench_results/rank_load.json
    pytest benches/bench_rank_load.py -s --bench-quick    # a ~100 MB checkpoint, one round (CI)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_convert import QUICK, _config, _convert, _files, _warm  # noqa: E402
from common import write_record  # noqa: E402
from hf_reference import synthetic_hf_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MID = _config(vocab=16000, hidden=2048, layers=6, ffn=5632)  # ~0.55 GB bf16
HETERO = ["--tp", "4", "--vit-tp", "1", "--audio-tp", "1"]
SOURCES = {"native saved at the run's sizes": HETERO, "native saved at TP 2": ["--tp", "2", "--vit-tp", "1", "--audio-tp", "1"], "hf folder": None}

_LOAD = """
import json, re, sys, time
from omnicore.checkpoint.hf import load_hf
from omnicore.checkpoint.native import NativeCheckpoint
from omnicore.checkpoint.pieces import RankPieces
from omnicore.config import load_config
from omnicore_dist.tp import shard_for_rank, tower_sizes
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
path, hf, how = sys.argv[1], sys.argv[2] == "hf", sys.argv[3]
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
start = time.perf_counter()
cfg = load_config(path) if hf else NativeCheckpoint(path).cfg
sizes = tower_sizes(4, {"vision": 1, "audio": 1})
if how == "pieces":
    pieces = RankPieces.of_model(cfg, 0, sizes)
    params = load_hf(path, pieces=pieces)[1] if hf else NativeCheckpoint(path).params(pieces=pieces)
else:
    params = shard_for_rank(cfg, load_hf(path)[1] if hf else NativeCheckpoint(path).params(), 0, 4, sizes)
seconds = time.perf_counter() - start
held = sum(v.numel() * v.element_size() for v in params.values())
print(json.dumps({"seconds": seconds, "growth": status("VmHWM") - base, "held": held}))
"""


def _load(path: Path, hf: bool, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path), "hf" if hf else "native", how], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=900)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rank_pieces_vs_whole_model_then_cut(tmp_path, request):
    quick = request.config.getoption("--bench-quick")
    cfg, rounds = (QUICK, 1) if quick else (MID, 3)
    hf = tmp_path / "hf"
    total = synthetic_hf_folder(cfg, hf, dtype=torch.bfloat16, shard_bytes=512 * 2**20)
    paths = {}
    for name, layout in SOURCES.items():
        paths[name] = hf if layout is None else tmp_path / name.replace(" ", "_").replace("'", "")
        if layout is not None:
            _convert(["hf-to-native", "--hf-dir", str(hf), "--out-dir", str(paths[name]), *layout])
    record = {"bytes": total, "rounds": rounds, "sources": {}}
    for name, path in paths.items():
        runs: dict[str, list[dict]] = {"pieces": [], "whole then cut": []}
        for r in range(rounds):
            for how in ("pieces", "whole then cut") if r % 2 == 0 else ("whole then cut", "pieces"):
                _warm(_files(path))
                runs[how].append(_load(path, path == hf, how))
        assert runs["pieces"][0]["held"] == runs["whole then cut"][0]["held"]  # the same pieces either way
        med = {how: {k: statistics.median(x[k] for x in rs) for k in ("seconds", "growth", "held")} for how, rs in runs.items()}
        ratios = {k: med["whole then cut"][k] / med["pieces"][k] for k in ("seconds", "growth")}
        record["sources"][name] = {"median": med, "whole_over_pieces": ratios}
        print(f"\n{name}: pieces {med['pieces']['seconds']:.2f} s, peak growth {med['pieces']['growth'] / 2**20:.0f} MiB; "
              f"whole then cut {med['whole then cut']['seconds']:.2f} s, {med['whole then cut']['growth'] / 2**20:.0f} MiB "
              f"-> {ratios['seconds']:.2f}x faster, {ratios['growth']:.2f}x less memory (rank holds {med['pieces']['held'] / 2**20:.0f} "
              f"of {total / 2**20:.0f} MiB)")  # fmt: skip
    write_record("rank_load", record)
