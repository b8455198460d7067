"""Pipeline stages as pure functions (one process, no communication): running the stages of a plan one
after the other, with only the carry (detached at every boundary, as a send would) and the inputs'
metadata (`inputs_meta` / `inputs_from_meta`, what later stages rebuild their inputs from) passed on,
gives the whole model's losses and gradients, for every placement rule: encoder-only first stages,
encoders split over stages, encoder inputs travelling past stages that do not use them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp"))

from tp_worker import CASES, TINY  # noqa: E402

from hf_reference import build_batch  # noqa: E402
from omnicore.layout import Layout, stage_of  # noqa: E402
from omnicore.models.thinker import (  # noqa: E402
    head_token_losses,
    init_thinker,
    inputs_from_meta,
    inputs_meta,
    prepare_inputs,
    stage_forward,
    thinker_token_losses,
    tower_depths,
)
from omnicore.ops import CPU  # noqa: E402

# TINY: text 3 layers, vision 4 blocks, audio 2 layers.
PLANS = {
    "llm-split": dict(llm_pp_layers=(1, 2)),
    "encoder-only-first": dict(llm_pp_layers=(0, 3), vit_pp_layers=(4, 0), audio_pp_layers=(2, 0)),
    "encoders-split": dict(llm_pp_layers=(0, 0, 3), vit_pp_layers=(2, 2, 0), audio_pp_layers=(0, 2, 0)),
    "four-uneven": dict(llm_pp_layers=(0, 0, 1, 2), vit_pp_layers=(2, 2, 0, 0), audio_pp_layers=(0, 1, 1, 0)),
    "features-travel": dict(llm_pp_layers=(0, 0, 1, 2), vit_pp_layers=(4, 0, 0, 0), audio_pp_layers=(0, 2, 0, 0)),
}


def _chain(params, stages, batch):
    """Losses and the carries' gradients flowing back, stage by stage, like the pipeline does."""
    first = prepare_inputs(TINY, batch)
    meta = inputs_meta(first)
    outs, ins = [], []
    carry: dict = {}
    for st in stages:
        mine = {k: v for k, v in params.items() if stage_of(k, stages) == st.index}
        inputs = first if st.index == 0 else inputs_from_meta(TINY, {k: v.clone() for k, v in meta.items()})
        carry = {k: v.detach().requires_grad_(v.is_floating_point() and v.requires_grad) for k, v in carry.items()}
        ins.append(carry)
        out = stage_forward(mine, TINY, st, inputs, carry, ops=CPU)
        outs.append(out)
        carry = out
    losses, _ = head_token_losses({k: v for k, v in params.items() if stage_of(k, stages) == stages[-1].index}, TINY, inputs, outs[-1]["hidden"], ops=CPU)
    loss = losses.mean()
    loss.backward()
    for s in range(len(stages) - 2, -1, -1):
        sent = {k: v for k, v in outs[s].items() if v.requires_grad}
        got = ins[s + 1]
        assert set(sent) == {k for k, v in got.items() if v.requires_grad}
        torch.autograd.backward([sent[k] for k in sent], [got[k].grad for k in sent])
    return loss


@pytest.mark.parametrize("case", ["mixed", "audio", "video", "text"])
@pytest.mark.parametrize("plan", PLANS)
def test_stage_chain_equals_whole_model(plan, case):
    full = init_thinker(TINY, seed=5, std=0.2)
    stages = Layout(**PLANS[plan]).stages(tower_depths(TINY))
    batch = build_batch(TINY, CASES[case], seed=3)
    batch.pop("use_audio_in_video", None)

    ref = {k: v.clone().requires_grad_() for k, v in full.items()}
    losses, _ = thinker_token_losses(ref, TINY, batch, ops=CPU)
    ref_loss = losses.mean()
    ref_loss.backward()

    params = {k: v.clone().requires_grad_() for k, v in full.items()}
    loss = _chain(params, stages, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    for k, p in ref.items():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        got = params[k].grad if params[k].grad is not None else torch.zeros_like(p)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), k


def test_meta_round_trip_rebuilds_layouts():
    batch = build_batch(TINY, CASES["mixed"], seed=3)
    batch.pop("use_audio_in_video", None)
    inputs = prepare_inputs(TINY, batch)
    again = inputs_from_meta(TINY, inputs_meta(inputs))
    assert torch.equal(again.positions, inputs.positions) and torch.equal(again.targets, inputs.targets)
    for field in ("images", "videos", "audios"):
        a, b = getattr(inputs, field), getattr(again, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert b.values is None and torch.equal(a.slots, b.slots)
            assert a.items == b.items


def test_stages_after_the_merge_ignore_the_encoders():
    """Media finished and merged on stage 1 are nothing to stage 2 and 3 (no values passed on)."""
    stages = Layout(llm_pp_layers=(0, 1, 1, 1), vit_pp_layers=(4, 0, 0, 0), audio_pp_layers=(2, 0, 0, 0)).stages(tower_depths(TINY))
    batch = build_batch(TINY, CASES["mixed"], seed=3)
    batch.pop("use_audio_in_video", None)
    params = init_thinker(TINY, seed=5, std=0.2)
    carry, first = {}, prepare_inputs(TINY, batch)
    for st in stages:
        inputs = first if st.index == 0 else inputs_from_meta(TINY, inputs_meta(first))
        carry = stage_forward(params, TINY, st, inputs, carry, ops=CPU)
        assert set(carry) == ({"image_features", "video_features", "audio_features"} if st.index == 0 else {"hidden"}), st.index
