"""One rank of a training run for the multi-process tests: `train_worker.py JOB_JSON`.

JOB: hf (the HF folder), base (run base folder), overrides (run-config overrides), layout
("mixed": ranks alternate text-only and image + audio micro-batches), iters, stop_after (optional),
val (optional: validation every two steps on `val_samples`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from hf_reference import Piece
from omnicore_dist.config import load_run_config
from omnicore_dist.mesh import close_distributed
from omnicore_dist.run import run
from test_collate import _sample

T, I, A = "text", "image", "audio"
TEXT = [Piece(T, 7)]
MEDIA = [Piece(T, 2), Piece(I, grid=(1, 4, 6)), Piece(T, 3), Piece(A, 90), Piece(T, 4)]
# With shuffling off, global batch 4 and DP 2: step 1 gives rank 0 two text-only samples and rank 1
# two image + audio samples; step 2 the other way round.
MIXED = [TEXT, TEXT, MEDIA, MEDIA, MEDIA, MEDIA, TEXT, TEXT]

CONFIG = """
[model]
load = "{hf}"
[data]
global_batch_size = 4
micro_batch_size = 1
shuffle = false
[train]
train_iters = {iters}
lr = 2e-3
clip_grad = 1.0
[checkpoint]
save = "run"
[log]
progress = false
"""


# The one-process run that multi-process layouts are compared with (conftest's `single`): this many steps.
ONE_PROCESS_STEPS = 3
LR = 2e-3  # CONFIG's


def step_losses(run_dir: Path) -> list[float]:
    """The loss of every trained step, from the run's metrics.jsonl."""
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r and "step" in r]


def assert_within_one_adam_step(got: dict, want: dict) -> None:
    """Weights of two runs whose losses agree: within 2 % of one Adam step (sums in another order)."""
    for k, v in want.items():
        assert (got[k] - v).abs().max() <= 0.02 * LR, k


# Validation runs (tests/train/test_validation.py): five held-out samples, every two steps.
EVAL_OVERRIDES = ["--eval.interval=2", "--eval.iters=2"]


def samples() -> list:
    return [_sample(p, i) for i, p in enumerate(MIXED)]


def val_samples() -> list:
    return [_sample(p, 100 + i) for i, p in enumerate(MIXED[1:6])]


def main(job: dict) -> None:
    torch.set_num_threads(1)
    base = Path(job["base"])
    base.mkdir(parents=True, exist_ok=True)
    mine = base / f"run.toml.{os.environ.get('RANK', '0')}"  # every rank writes it: replace atomically, never read half
    mine.write_text(CONFIG.format(hf=job["hf"], iters=job["iters"]))
    os.replace(mine, base / "run.toml")
    validating = job.get("val", False)
    cfg = load_run_config(base / "run.toml", job["overrides"] + (EVAL_OVERRIDES if validating else []))
    run(cfg, base=base, samples=samples(), val_samples=val_samples() if validating else None, stop_after=job.get("stop_after"))
    close_distributed()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
