"""The README's quick start runs and learns (keeps the README true)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_loss_falls(tmp_path):
    out = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--steps", "20", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], out
    assert (tmp_path / "hf" / "model.safetensors").exists()
