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
