"""What the optimizer files hold under hetero parallel: a hetero encoder's moments are saved once, by
the first replica of each piece (LLM TP 4, encoders TP 1 and 2), with plain AdamW and with ZeRO; every
rank gets its exact state back under the saved layout, and the states re-join to one process's."""

from __future__ import annotations

import pytest
import torch

from omnicore.config import TINY
from omnicore.layout import tower_of
from omnicore.models.thinker import init_thinker
from omnicore_dist.hetero import left_to_first_replica, own_state, reshard_state
from omnicore_dist.optim import AdamW, ZeroAdamW
from omnicore_dist.run import _optimizer_state, _plain_state
from omnicore_dist.tp import shard_for_rank, tower_sizes

SIZES = tower_sizes(4, {"vision": 1, "audio": 2})


def _trained(optimizer_class, params, grads):
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = optimizer_class(leaves, lr=1e-2)
    for _ in range(2):
        opt.step(opt.reduce_grads(grads) if optimizer_class is ZeroAdamW else grads)
    return opt


def _param(key: str) -> str:
    return key.split(".", 1)[1]


@pytest.mark.parametrize("optimizer_class", [AdamW, ZeroAdamW])
def test_hetero_encoder_moments_are_saved_once_and_come_back_exactly(optimizer_class):
    full = init_thinker(TINY, seed=1)
    grads = {k: torch.randn_like(v) for k, v in full.items()}
    ranks = {r: _trained(optimizer_class, shard_for_rank(TINY, full, r, 4, SIZES), shard_for_rank(TINY, grads, r, 4, SIZES)) for r in range(4)}
    saved = {r: _plain_state([_optimizer_state(opt, left_to_first_replica(r, SIZES))]) for r, opt in ranks.items()}

    for r, state in saved.items():  # rank r keeps a tower's entries only when it is that piece's first replica
        towers = {tower_of(_param(k)) for k in state if k != "step"}
        assert towers == {t for t, size in SIZES.items() if r < size}, r
    for r, opt in ranks.items():  # under the saved layout: the exact state each rank had
        plain = _plain_state([_optimizer_state(opt, lambda name: False)])
        got = own_state(saved, r, SIZES)
        assert got.keys() == plain.keys(), r
        assert all(torch.equal(got[k], plain[k]) for k in plain), r

    one = _plain_state([_optimizer_state(_trained(optimizer_class, full, grads), lambda name: False)])
    joined = reshard_state(TINY, [saved[r] for r in range(4)], SIZES, tower_sizes(1, None), 0)
    assert joined.keys() == one.keys()
    for k in one:  # elementwise AdamW on pieces equals it on the whole tensors
        assert torch.equal(joined[k], one[k]), k
