"""Shared fixtures: tiny HF thinkers saved to disk once per session and loaded back with omnicore."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_reference.py

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """name -> (cfg, HF model, omnicore params loaded from the HF folder, folder); built lazily."""
    import omnicore
    from hf_reference import CONFIGS, hf_thinker

    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = hf_thinker(CONFIGS[name], folder)
            cfg, params = omnicore.load_hf(folder)
            assert cfg == CONFIGS[name]
            cache[name] = (cfg, model, params, folder)
        return cache[name]

    return get
