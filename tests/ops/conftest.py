"""Fixtures for the ops tests: the fake torch_npu module and the marker that labels its tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ops/fake_torch_npu.py

import fake_torch_npu  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "as_documented: kernel wrappers (torch_npu, flash-attn) checked against an emulation of the kernels' documented semantics; "
        "as documented, not run on hardware",
    )


@pytest.fixture
def fake_npu(monkeypatch):
    """A fresh emulated torch_npu in sys.modules (its `calls` list records every kernel call)."""
    module = fake_torch_npu.make()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module
