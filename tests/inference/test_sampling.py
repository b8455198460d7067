"""Sampling: the distribution is as `Sampling` defines it, draws are reproducible, top-k 1 is greedy."""

from __future__ import annotations

import pytest
import torch
from hf_reference import Piece, build_batch

from omnicore.generate import GREEDY, Sampling, choose_next, generate, next_token_probs

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0], [0.0, 0.0, 0.1, -2.0, 1.5, 1.4]])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_scales_the_logits(temperature):
    probs = next_token_probs(LOGITS, Sampling(temperature=temperature))
    torch.testing.assert_close(probs, (LOGITS / temperature).softmax(-1))


def test_higher_temperature_flattens_the_distribution():
    entropy = [(-(p * p.log()).sum(-1)) for p in (next_token_probs(LOGITS, Sampling(temperature=t)) for t in (0.5, 1.0, 2.0))]
    assert bool((entropy[0] < entropy[1]).all() and (entropy[1] < entropy[2]).all())


def test_top_k_keeps_the_k_most_likely():
    probs = next_token_probs(LOGITS, Sampling(temperature=1.0, top_k=2))
    assert (probs[0] > 0).nonzero().flatten().tolist() == [0, 5]
    assert (probs[1] > 0).nonzero().flatten().tolist() == [4, 5]
    kept = LOGITS[0, [0, 5]].softmax(-1)
    torch.testing.assert_close(probs[0, [0, 5]], kept)


def test_top_p_keeps_the_smallest_set_reaching_p():
    full = LOGITS.softmax(-1)[0]  # token 5 ~0.57, token 0 ~0.21, token 1 ~0.08, ...
    probs = next_token_probs(LOGITS[:1], Sampling(temperature=1.0, top_p=0.7))[0]
    assert (probs > 0).nonzero().flatten().tolist() == [0, 5]  # 0.57 < 0.7 <= 0.57 + 0.21
    torch.testing.assert_close(probs[[0, 5]], full[[0, 5]] / full[[0, 5]].sum())
    tiny = next_token_probs(LOGITS[:1], Sampling(temperature=1.0, top_p=0.01))[0]
    assert (tiny > 0).nonzero().flatten().tolist() == [5]  # the most likely token always stays


def test_draws_follow_the_distribution():
    sampling = Sampling(temperature=1.5, top_k=4)
    probs = next_token_probs(LOGITS[:1], sampling)[0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([choose_next(LOGITS[:1], sampling, gen) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=LOGITS.shape[1]).float() / draws.numel()
    assert float((freq - probs).abs().max()) < 0.03, (freq, probs)
    assert bool((freq[probs == 0] == 0).all())


def test_greedy_takes_the_argmax():
    assert choose_next(LOGITS, GREEDY).tolist() == [5, 4]
    assert next_token_probs(LOGITS, GREEDY).argmax(-1).tolist() == [5, 4]


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="Sampling"):
        Sampling(**bad)


def _prompt(cfg):
    return build_batch(cfg, [[Piece("text", 5)], [Piece("text", 2), Piece("image", grid=(1, 4, 4)), Piece("text", 2)]], seed=3)


def test_sampling_with_a_fixed_generator_is_reproducible(hf_pair):
    cfg, _, params, _ = hf_pair("tiny_gqa")
    batch, sampling = _prompt(cfg), Sampling(temperature=1.0, top_p=0.95)

    def run(seed):
        return generate(params, cfg, batch, max_new_tokens=15, sampling=sampling, generator=torch.Generator().manual_seed(seed))

    first = run(1)
    assert run(1) == first
    assert run(2) != first  # the draws do depend on the generator
    assert first != generate(params, cfg, batch, max_new_tokens=15)  # ...and are not the greedy answer


def test_top_k_one_equals_greedy(hf_pair):
    cfg, _, params, _ = hf_pair("tiny_gqa")
    batch = _prompt(cfg)
    greedy = generate(params, cfg, batch, max_new_tokens=15)
    sampled = generate(params, cfg, batch, max_new_tokens=15, sampling=Sampling(temperature=5.0, top_k=1), generator=torch.Generator().manual_seed(0))
    assert sampled == greedy
