"""The README's main job: make the demo, train it with the launcher, ask the media questions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSS_THRESHOLD = 0.1  # the demo's stated goal for the final loss (README)


@pytest.mark.timeout(600)
def test_demo_trains_and_answers_from_the_media(tmp_path):
    demo = tmp_path / "demo"
    subprocess.run([sys.executable, "examples/make_demo.py", "--out", str(demo)], cwd=ROOT, check=True, timeout=120)
    assert sum(p.stat().st_size for p in demo.rglob("*") if p.is_file()) < 5 * 2**20
    overrides = [f"--model.load={demo / 'model'}", f"--data.config={demo / 'data.json'}", f"--checkpoint.save={demo / 'run'}",
                 f"--checkpoint.export_hf={demo / 'export'}", "--log.progress=false"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "omnicore_dist.launch", "examples/demo.toml", *overrides], cwd=ROOT, check=True, timeout=480)
    records = [json.loads(line) for line in (demo / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "step" in r]
    assert losses[-1] < LOSS_THRESHOLD < losses[0], losses[::20]
    assert (demo / "export" / "model.safetensors").exists() and (demo / "run" / "loss.png").exists()
    asked = subprocess.run([sys.executable, "examples/ask_demo.py", "--run", str(demo / "run"), "--demo", str(demo)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert asked.stdout.count("[ok]") == 4
