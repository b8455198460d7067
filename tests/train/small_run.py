"""One small in-process training run for the fault tests: two samples a step, tiny model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omnicore_dist.config import load_run_config
from omnicore_dist.run import run

CONFIG = """
[model]
load = "{load}"
[data]
global_batch_size = 2
micro_batch_size = 2
[train]
train_iters = {iters}
[checkpoint]
save = "run"
[log]
progress = false
"""


def small_run(base: Path, load: Path, iters: int, samples: Sequence | None, overrides: Sequence[str] = ()) -> dict:
    """Train `iters` steps from `load` into `base`/run (samples: the first two of `samples`, or the
    data config an override names)."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "run.toml").write_text(CONFIG.format(load=load, iters=iters))
    return run(load_run_config(base / "run.toml", list(overrides)), base=base, samples=samples[:2] if samples is not None else None)
