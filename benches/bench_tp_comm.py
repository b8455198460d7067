"""Bytes communicated per training step per rank under TP = 2, against Megatron's analytic count.

Analytic (no sequence parallelism), per step, for fp32 activations of N tokens:
  text: each layer all-reduces its (N, C) attention and MLP outputs forward and the gradients at
        its two column-parallel inputs backward: 4 N C values per layer; the vocab-parallel
        embedding all-reduces (N, C) forward; the head all-reduces the (K, C) input gradient of
        the K target rows backward and three (K,) vectors in the vocab-parallel cross-entropy;
  vision / audio: 4 x tokens x width per block the same way (merger: the (N/4, 4W) gradient at fc1's
        input backward and its (N/4, out) output forward; the audio projection is replicated);
  runtime: GQA kv copies summed when TP exceeds the kv heads (none at TP 2), one scalar (norm).
Measured by counting every tensor handed to torch.distributed collectives in a real TP = 2 step
(tiny and medium configs). Any byte beyond the analytic count is a defect to explain.

    pytest benches/bench_tp_comm.py -s
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "train"), str(ROOT / "benches"), str(ROOT / "tests")]

from common import write_record  # noqa: E402
from dist_launch import launch  # noqa: E402

WORKER = ROOT / "benches" / "tp_comm_worker.py"


@pytest.mark.parametrize("config", ["tiny", "medium"])
def test_tp2_bytes_match_the_analytic_count(tmp_path, config):
    launch(2, [str(WORKER), json.dumps({"config": config, "out": str(tmp_path)})], tmp_path / "logs", timeout=600,
           extra_paths=[str(ROOT / "benches")])  # fmt: skip
    result = json.loads((tmp_path / "result.json").read_text())
    write_record(f"tp_comm_{config}", result)
    print(f"\n{config}: measured {result['measured'] / 2**20:.2f} MiB per rank per step, analytic {result['analytic'] / 2**20:.2f} MiB "
          f"(ratio {result['measured'] / result['analytic']:.4f}); by kind: {result['by_kind']}")  # fmt: skip
    assert result["measured"] == pytest.approx(result["analytic"], rel=1e-3)
