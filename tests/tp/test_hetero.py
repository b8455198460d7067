"""Hetero parallel (DESIGN.md section 5; gloo, spawned processes, timeouts): encoders at a smaller TP
than the LLM (vision / audio TP 1 under LLM TP 2 and 4, and vision TP 2 under LLM TP 4) equal one
process: loss, global gradient norm and every gathered gradient to 1e-5 relative (fp32), on
micro-batches where some encoder replicas get no media. The share rule itself is checked without
processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_launch import launch  # noqa: E402
from hetero_worker import TINY, batch, reference  # noqa: E402

from omnicore.layout import rule_for, shard_shape, tower_of  # noqa: E402
from omnicore.models.encoder_shares import media_shares  # noqa: E402
from omnicore.models.thinker import init_thinker, param_shapes, prepare_inputs, tp_plans  # noqa: E402
from omnicore_dist.tp import shard_for_rank  # noqa: E402


def _shares(case: str, replicas: int) -> dict[str, list[int]]:
    inputs = prepare_inputs(TINY, batch(case))
    ids, n = inputs.segments.segment_ids(), len(inputs.segments.lengths)
    out = {}
    for kind, tower, media in (("image", "vision", inputs.images), ("video", "vision", inputs.videos), ("audio", "audio", inputs.audios)):
        if media is not None:
            out[kind] = [s.rows for s in media_shares(TINY, media, tower, ids, n, replicas)]
    return out


def test_shares_follow_the_sample_rule():
    # mixed: samples 1 (image + audio) and 3 (video with its audio); 2 replicas: one media sample each
    assert _shares("mixed", 2) == {"image": [4, 0], "video": [0, 8], "audio": [22, 75]}
    assert _shares("mixed", 4) == {"image": [0, 4, 0, 0], "video": [0, 0, 0, 8], "audio": [0, 22, 0, 75]}
    # sparse: audio in sample 0 only, the image in sample 3 only
    assert _shares("sparse", 4) == {"image": [0, 0, 0, 6], "audio": [62, 0, 0, 0]}
    # 3 replicas over 4 samples (a token-budget micro-batch): runs of ceil(4 / 3) = 2 samples, the last replica idle
    assert _shares("sparse", 3) == {"image": [0, 6, 0], "audio": [62, 0, 0]}


@pytest.mark.parametrize("vit_tp", [1, 2])
def test_parameter_bytes_per_rank_follow_the_plan(vit_tp):
    """LLM TP 4: text pieces are a quarter (norms aside), an encoder at TP E holds its E-way pieces,
    the same on the 4 / E replicas of each piece."""
    full = init_thinker(TINY, seed=0)
    sizes = {"text": 4, "vision": vit_tp, "audio": 1}
    plans, shapes = tp_plans(TINY), param_shapes(TINY)
    ranks = [shard_for_rank(TINY, full, r, 4, sizes) for r in range(4)]
    for tower, size in sizes.items():
        names = [n for n in shapes if tower_of(n) == tower]
        planned = sum(torch.Size(shard_shape(shapes[n], rule_for(n, plans[tower]), size, n)).numel() for n in names) * 4
        whole = sum(full[n].numel() for n in names) * 4
        for r, local in enumerate(ranks):
            assert sum(local[n].numel() for n in names) * 4 == planned, (tower, r)
            assert all(torch.equal(local[n], ranks[r % size][n]) for n in names)  # replica r // size holds piece r % size
        assert planned == whole if size == 1 else whole / size <= planned < whole


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["mixed", "sparse"])
@pytest.mark.parametrize(("size", "vit_tp", "audio_tp"), [(2, 1, 1), (4, 1, 1), (4, 2, 1)], ids=["tp2-enc1", "tp4-enc1", "tp4-vit2-audio1"])
def test_hetero_equals_one_process(tmp_path, size, vit_tp, audio_tp, case):
    _check(tmp_path, case, size=size, vit_tp=vit_tp, audio_tp=audio_tp)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [2, 4])
def test_hetero_on_a_sample_count_the_replicas_do_not_divide(tmp_path, size):
    """Three samples (a token-budget micro-batch): 2 replicas take 2 + 1 samples, 4 take 1 + 1 + 1 + 0."""
    assert _shares("odd", size) == ({"image": [4, 6], "audio": [22, 0]} if size == 2 else {"image": [4, 0, 6, 0], "audio": [0, 22, 0, 0]})
    _check(tmp_path, "odd", size=size, vit_tp=1, audio_tp=1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hetero_with_sequence_parallel_equals_one_process(tmp_path):
    _check(tmp_path, "mixed", size=2, vit_tp=1, audio_tp=1, sequence_parallel=True)


def _check(tmp_path, case, **job):
    ref_loss, ref_grads, ref_norm = reference(case)
    launch(job["size"], ["tests/tp/hetero_worker.py", json.dumps({"case": case, "out": str(tmp_path)} | job)], tmp_path / "logs",
           extra_paths=[str(Path(__file__).resolve().parent)])  # fmt: skip
    got = load_file(str(tmp_path / "result.safetensors"))
    assert torch.allclose(got["loss"][0], ref_loss, rtol=1e-5, atol=0)
    assert float(got["norm"][0]) == pytest.approx(float(ref_norm), rel=1e-5)
    bad = []
    for name, ref in ref_grads.items():
        err, size_ = (got[name] - ref).norm(), ref.norm()
        if err > 1e-5 * max(size_, 1e-6):
            bad.append(f"{name}: |diff| {err:.3g} vs |grad| {size_:.3g}")
    assert not bad, "\n".join(bad)
