"""Fixtures of the dataset / template tests: the tiny tokenizer folder (with TINY's config.json) and media files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_tokenizer import write_tokenizer

from omnicore import TINY
from omnicore.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """An HF-style folder: the tiny tokenizer (tokenizer.json) and TINY's thinker config.json."""
    folder = write_tokenizer(tmp_path_factory.mktemp("tiny_model"))
    (folder / "config.json").write_text(json.dumps(TINY.to_hf()))
    return folder


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)
