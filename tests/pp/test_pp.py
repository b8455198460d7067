"""Pipeline parallelism equals one process (gloo, spawned processes, timeouts): PP 2 and PP 4 with
uneven layer lists (encoder-only first stages, encoders split over stages), alone and with TP and DP,
over 3 steps of variable-length multimodal micro-batches (with TP: PP 1 at the same TP and DP, whose
sums run in the same order; Adam turns one process's other rounding into ~1e-5 after a step): the loss of every step, every gathered
gradient of every step (to 1e-5 relative: norm of the difference over the gradient's norm) and the
final weights. Each rank's recorded forward / backward order is exactly its schedule's, and a 1F1B
stage never holds more than (stages - stage) micro-batches in flight. GPipe gives the same numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "train"))
sys.path.insert(0, str(HERE.parents[0] / "tp"))
sys.path.insert(0, str(HERE))

from dist_launch import launch  # noqa: E402
from pp_worker import LR, MICRO, TINY, reference  # noqa: E402

from omnicore.models.thinker import init_thinker  # noqa: E402
from omnicore_dist.train import part_of  # noqa: E402

from omnicore_dist.pipeline import schedule_events  # noqa: E402

STEPS = 3
CASES = {  # name: (layout, tp, world, freeze)
    "pp2": (dict(llm_pp_layers=(1, 2)), 1, 2, ()),
    "pp2-encoders-first-frozen": (dict(llm_pp_layers=(0, 3), vit_pp_layers=(4, 0), audio_pp_layers=(2, 0)), 1, 2, ("vision", "audio")),
    "pp4-uneven": (dict(llm_pp_layers=(0, 0, 1, 2), vit_pp_layers=(2, 2, 0, 0), audio_pp_layers=(0, 1, 1, 0)), 1, 4, ()),
    "pp2-tp2": (dict(llm_pp_layers=(0, 3), vit_pp_layers=(2, 2), audio_pp_layers=(1, 1)), 2, 4, ()),
    "pp2-dp2": (dict(llm_pp_layers=(0, 3), vit_pp_layers=(4, 0), audio_pp_layers=(2, 0)), 1, 4, ()),
}
_REFS: dict = {}


def _reference(dp: int, freeze):
    key = (dp, freeze)
    if key not in _REFS:
        _REFS[key] = reference(STEPS, dp, freeze)
    return _REFS[key]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).norm() <= 1e-5 * max(float(want.norm()), 1e-6))


def _run(tmp_path, case: str, schedule: str):
    return _launch(tmp_path, *CASES[case], schedule)


def _launch(tmp_path, layout, tp, world, freeze, schedule):
    job = {"layout": layout, "tp": tp, "schedule": schedule, "steps": STEPS, "freeze": list(freeze), "out": str(tmp_path / schedule)}
    launch(world, ["tests/pp/pp_worker.py", json.dumps(job)], tmp_path / f"logs-{schedule}", timeout=400, extra_paths=[str(HERE), str(HERE.parents[0] / "tp")])
    stages = len(layout["llm_pp_layers"])
    merged: dict = {}
    for s in range(stages):
        merged |= load_file(str(tmp_path / schedule / f"stage{s}.safetensors"))
    traces = [json.loads((tmp_path / schedule / f"trace{r}.json").read_text()) for r in range(world)]
    return merged, traces


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES)
def test_pipeline_equals_one_process(tmp_path, case):
    layout, tp, world, freeze = CASES[case]
    stages = len(layout["llm_pp_layers"])
    dp = world // (tp * stages)
    if tp == 1:
        losses, grads, final = _reference(dp, tuple(freeze))
    else:  # TP's sums run in another order than one process's: compare with PP 1 at the same TP and DP
        ref, ref_traces = _launch(tmp_path / "pp1", dict(llm_pp_layers=(TINY.text.n_layers,)), tp, tp * dp, freeze, "1f1b")
        losses = [record["loss"] for record in ref_traces[0]["steps"]]
        grads = [{k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith(f"grad{step}.")} for step in range(STEPS)]
        final = {k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith("final.")}
    got, traces = _run(tmp_path, case, "1f1b")
    for trace in traces:
        for step, record in enumerate(trace["steps"]):
            assert record["loss"] == pytest.approx(losses[step], rel=1e-5), (trace["stage"], step)
            micro = len(MICRO[trace["dp_rank"] :: dp])
            assert [tuple(e) for e in record["events"]] == schedule_events("1f1b", stages, trace["stage"], micro)
            assert record["max_in_flight"] <= stages - trace["stage"]
    bad = []
    for step in range(STEPS):
        for name, want in grads[step].items():
            if not _close(got[f"grad{step}.{name}"], want):
                bad.append(f"step {step} {name}: |diff| {(got[f'grad{step}.{name}'] - want).norm():.3g} vs {want.norm():.3g}")
    for name, want in final.items():
        if (got[f"final.{name}"] - want).abs().max() > 0.02 * LR:  # within 2 % of one Adam step
            bad.append(f"final {name}: max |diff| {(got[f'final.{name}'] - want).abs().max():.3g}")
    assert not bad, "\n".join(bad[:20])
    init = init_thinker(TINY, seed=5, std=0.2)
    frozen = [n for n in final if part_of(n) in freeze]
    assert bool(frozen) == bool(freeze)
    assert all(torch.equal(got[f"final.{n}"], init[n]) for n in frozen)  # a frozen stage: no optimizer work at all


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpipe_and_1f1b_differ_in_order_and_agree_in_value(tmp_path):
    one, one_traces = _run(tmp_path, "pp4-uneven", "1f1b")
    gp, gp_traces = _run(tmp_path, "pp4-uneven", "gpipe")
    for trace in gp_traces:
        events = [tuple(e) for e in trace["steps"][0]["events"]]
        micro = len(MICRO)
        assert events == [("F", i) for i in range(micro)] + [("B", i) for i in range(micro)]
        assert trace["steps"][0]["max_in_flight"] == micro
    assert max(t["steps"][0]["max_in_flight"] for t in one_traces) == 4 < len(MICRO)
    for name, value in one.items():
        assert torch.equal(value, gp[name]), name
