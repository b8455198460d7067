"""Fixtures for runtime tests: a tiny HF folder and processed samples of every modality."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    import omnicore
    from quickstart import write_hf_folder

    folder = tmp_path_factory.mktemp("tiny_hf") / "hf"
    write_hf_folder(folder, omnicore.TINY, seed=0)
    return folder


@pytest.fixture(scope="session")
def samples():
    """Eight processed samples: text, image, audio, video, audio-in-video, mixed."""
    from test_collate import SAMPLES, _sample

    return [_sample(p, i) for i, p in enumerate(SAMPLES + SAMPLES[:3])]


@pytest.fixture(scope="session")
def single(tiny_hf, tmp_path_factory):
    """train_worker's job in one process, ONE_PROCESS_STEPS steps: (losses, final weights), what the
    multi-process layouts (tests/train/test_dp.py, test_hetero_run.py, test_pp_run.py) are compared with."""
    import train_worker

    from omnicore.checkpoint.native import load_native
    from omnicore_dist.config import load_run_config
    from omnicore_dist.run import run

    base = tmp_path_factory.mktemp("one_process")
    (base / "run.toml").write_text(train_worker.CONFIG.format(hf=tiny_hf, iters=train_worker.ONE_PROCESS_STEPS))
    run(load_run_config(base / "run.toml"), base=base, samples=train_worker.samples())
    return train_worker.step_losses(base / "run"), load_native(base / "run")[1]
