"""Benchmark options: `--bench-quick` keeps the correctness checks and times only a few rounds (CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", help="correctness plus a short timing only")


@pytest.fixture
def bench_rounds(request) -> int:
    return 2 if request.config.getoption("--bench-quick") else 15
