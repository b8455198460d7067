"""Conversion under stress: peak memory stays near the largest tensor, a kill mid-write leaves no checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hf_reference import synthetic_hf_folder

from omnicore.checkpoint.commit import META, TRACKER
from omnicore.checkpoint.native import NativeCheckpoint
from omnicore.config import AudioConfig, TextConfig, ThinkerConfig, TokenIds, VisionConfig

ROOT = Path(__file__).resolve().parents[2]

# About 125 MB of fp32 weights whose largest tensors (embedding, lm_head) are 16 MB each.
WIDE = ThinkerConfig(
    text=TextConfig(vocab_size=8192, hidden=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn=1536,
                    rope_theta=1e6, rms_eps=1e-6, mrope_section=(8, 12, 12)),
    vision=VisionConfig(depth=2, hidden=64, n_heads=2, ffn=96, in_channels=3, patch_size=14, temporal_patch_size=2,
                        spatial_merge_size=2, window_size=112, fullatt_blocks=(1,), out_hidden=512),
    audio=AudioConfig(n_mels=128, d_model=64, n_layers=2, n_heads=2, ffn=96, max_source_positions=1500, n_window=100, output_dim=512),
    tokens=TokenIds(audio=8100, audio_start=8101, audio_end=8102, vision_start=8103, vision_end=8104, image=8105, video=8106),
    position_id_per_seconds=25,
    seconds_per_chunk=2,
)  # fmt: skip
LARGEST = 8192 * 512 * 4
# Allowed growth of the peak resident set over the post-import baseline: 1.5 x the largest tensor
# group (the tensor being moved and a TP piece or dtype copy of it) plus a stated margin of 16 MiB
# (torch's first-use initialisation and allocator slack). The checkpoint itself is ~8x that tensor.
MARGIN = 16 * 2**20


@pytest.fixture(scope="module")
def wide_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide_hf")
    total = synthetic_hf_folder(WIDE, folder, dtype=__import__("torch").float32, shard_bytes=40 * 2**20)
    assert total > 6 * LARGEST
    return folder


_MEASURE = """
import re, sys
from omnicore_dist.convert import main
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
args = sys.argv[1:]
# A first conversion into a scratch folder warms the process up (torch's lazy initialisation, thread
# pools, allocator arenas), so what is measured below is what the second one adds.
warm = list(args)
warm[warm.index("--out-dir") + 1] += "_warm"
main(warm)
# VmHWM is the kernel's resident high-water mark (what ru_maxrss reports). Resetting it here (Linux
# clear_refs 5) makes it track the measured conversion alone; getrusage's own copy keeps the earlier
# peak, so it cannot be used after the reset.
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
code = main(args)
print("RSS", base, status("VmHWM"))
sys.exit(code)
"""


@pytest.mark.parametrize("direction", ["hf-to-native", "native-to-hf"])
def test_peak_memory_stays_near_the_largest_tensor(wide_hf, tmp_path, direction):
    native = tmp_path / "native"
    subprocess.run([sys.executable, "-m", "omnicore_dist.convert", "hf-to-native", "--hf-dir", str(wide_hf), "--out-dir", str(native), "--tp", "2"],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)  # fmt: skip
    args = (
        ["hf-to-native", "--hf-dir", str(wide_hf), "--out-dir", str(tmp_path / "n2"), "--tp", "2"]
        if direction == "hf-to-native"
        else ["native-to-hf", "--native-dir", str(native), "--hf-dir", str(wide_hf), "--out-dir", str(tmp_path / "hf2")]
    )
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], check=True, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    base, peak = (int(v) for v in out.split("RSS")[1].split())
    growth = peak - base
    assert growth <= 1.5 * LARGEST + MARGIN, f"peak RSS grew by {growth / 2**20:.1f} MiB (largest tensor {LARGEST / 2**20:.0f} MiB)"


def _looks_like_checkpoint(root: Path) -> bool:
    return root.exists() and ((root / TRACKER).exists() or any((p / META).exists() for p in root.iterdir() if p.is_dir()))


def test_kill_mid_write_leaves_no_checkpoint(wide_hf, tmp_path):
    """SIGKILL at several instants after the first file appears: never a checkpoint that is not complete."""
    cmd = [sys.executable, "-m", "omnicore_dist.convert", "hf-to-native", "--hf-dir", str(wide_hf), "--tp", "2"]
    hits = 0
    for i, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2)):
        out = tmp_path / f"killed{i}"
        proc = subprocess.Popen(cmd + ["--out-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (out / ".tmp-release").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        mid_write = (out / ".tmp-release").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if _looks_like_checkpoint(out):  # the conversion won the race: then it must be complete
            NativeCheckpoint(out)
        else:
            hits += mid_write
    assert hits >= 2, f"only {hits} kill(s) landed while files were being written"
    # A rerun into a killed folder discards the leftover and succeeds.
    subprocess.run(cmd + ["--out-dir", str(tmp_path / "killed0")], check=True, cwd=ROOT, capture_output=True, timeout=300)
    NativeCheckpoint(tmp_path / "killed0")
    assert not (tmp_path / "killed0" / ".tmp-release").exists()
