"""Fixtures of the inference tests: the tiny tokenizer folder, and the trained demo (made once per session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # tiny_tokenizer.py, data_files.py

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tiny_tokenizer import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory) -> Path:
    """examples/make_demo.py's files, trained by the launcher with examples/demo.toml (as tests/test_demo.py)."""
    demo = tmp_path_factory.mktemp("demo") / "demo"
    subprocess.run([sys.executable, "examples/make_demo.py", "--out", str(demo)], cwd=ROOT, check=True, timeout=120)
    overrides = [f"--model.load={demo / 'model'}", f"--data.config={demo / 'data.json'}", f"--checkpoint.save={demo / 'run'}",
                 f"--checkpoint.export_hf={demo / 'export'}", "--log.progress=false"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "omnicore_dist.launch", "examples/demo.toml", *overrides], cwd=ROOT, check=True,
                   timeout=480, capture_output=True)  # fmt: skip
    return demo
