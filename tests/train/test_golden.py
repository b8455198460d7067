"""Golden loss: omnicore's train step equals transformers + torch.optim.AdamW (fp32) from the same
weights, batches and micro-batching: loss per step to 1e-5 relative; every parameter after the last
step within 2 % of one step's size (0.02 x lr), tight enough to catch a wrong learning rate, weight
decay group or skipped update, loose enough for Adam's amplification of rounding-level gradients."""

from __future__ import annotations

import re

import pytest
import torch
from hf_reference import Piece, build_batch, hf_kwargs

from omnicore.checkpoint.hf import hf_to_native
from omnicore.ops import CPU
from omnicore_dist.mesh import Mesh
from omnicore_dist.optim import AdamW
from omnicore_dist.train import GradBuffer, train_step

T, I, A, V = "text", "image", "audio", "video"
# Two micro-batches per step and every tower used in every step: torch.optim skips a parameter whose
# .grad is None, where omnicore (like Megatron) steps it with a zero gradient, so a step without
# images would move the vision tower by its momentum on our side only.
STEPS = [
    [[[Piece(T, 3), Piece(I, grid=(1, 4, 6)), Piece(T, 6)], [Piece(T, 9)]], [[Piece(T, 2), Piece(A, 120), Piece(V, grid=(2, 4, 4)), Piece(T, 5)]]],
    [[[Piece(V, grid=(2, 4, 4)), Piece(T, 7)]], [[Piece(T, 4), Piece(I, grid=(1, 4, 4)), Piece(T, 3)], [Piece(A, 60), Piece(T, 8)]]],
    [[[Piece(T, 12), Piece(I, grid=(1, 8, 4))]], [[Piece(T, 3), Piece(A, 250), Piece(T, 4)], [Piece(V, grid=(2, 4, 8)), Piece(T, 5)]]],
]
NO_DECAY = r"(\.bias|norm\.weight)$"
# eps 1e-5 (not 1e-8): some gradients (e.g. k bias, nearly softmax-invariant) are rounding noise,
# which Adam would blow up to full-size, implementation-dependent steps.
LR, WD, EPS = 2e-3, 0.1, 1e-5


def _n_targets(batch):
    labels = batch["labels"][:, 1:]
    return int((labels != -100).sum())


@pytest.mark.parametrize("reduction", ["token", "micro_batch"])
def test_train_steps_match_transformers_and_torch_adamw(hf_pair, reduction):
    cfg, model, params, _ = hf_pair("tiny_gqa")
    batches = [[build_batch(cfg, rows, seed=10 * s + m) for m, rows in enumerate(step)] for s, step in enumerate(STEPS)]

    leaves = {k: v.detach().clone().requires_grad_(k != "audio.bos_eos.weight") for k, v in params.items()}
    trainable = {k: v for k, v in leaves.items() if v.requires_grad}
    opt = AdamW(trainable, lr=LR, eps=EPS, weight_decay=WD, groups=[(NO_DECAY, None, 0.0)])
    grads = GradBuffer(trainable)
    ours = []
    for micro in batches:
        result = train_step(leaves, grads, opt, cfg, micro, lr=LR, mesh=Mesh(world=1, rank=0, dp=1, pp=1, tp=1), ops=CPU, loss_reduction=reduction)
        ours.append(result.loss)

    model = type(model)._from_config(model.config, attn_implementation="sdpa")
    model.load_state_dict(hf_pair("tiny_gqa")[1].state_dict())
    model.train()
    named = {n: p for n, p in model.named_parameters() if "audio_bos_eos" not in n}
    decay = [p for n, p in named.items() if not re.search(NO_DECAY, hf_to_native(n))]
    no_decay = [p for n, p in named.items() if re.search(NO_DECAY, hf_to_native(n))]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, eps=EPS)
    theirs = []
    for micro in batches:
        torch_opt.zero_grad()
        total = sum(_n_targets(b) for b in micro)
        step_loss = 0.0
        for b in micro:
            out = model(**hf_kwargs(b))
            share = out.loss * _n_targets(b) / total if reduction == "token" else out.loss / len(micro)
            share.backward()
            step_loss += share.item()
        torch_opt.step()
        theirs.append(step_loss)

    assert ours == pytest.approx(theirs, rel=1e-5), (ours, theirs)
    state = model.state_dict()
    for hf_name, ref in state.items():
        got = leaves[hf_to_native(hf_name)].detach()
        assert (got - ref).abs().max() <= 0.02 * LR, hf_name
