"""The decoding API's contracts: the caller's cache is written in place, positions continue by the rope
delta, capacity errors are clear; `validation_loss` is the token-weighted loss and changes nothing."""

from __future__ import annotations

import pytest
import torch
from hf_reference import Piece, build_batch

from omnicore.eval import validation_loss
from omnicore.generate import generate
from omnicore.models.decode import CacheFullError, allocate_cache, decode_step, prefill
from omnicore.models.thinker import prepare_inputs, thinker_logits, thinker_loss

VIDEO = [Piece("text", 2), Piece("video", grid=(3, 4, 4)), Piece("text", 2)]


def test_prefill_and_decode_write_the_callers_cache_in_place(hf_pair):
    cfg, _, params, _ = hf_pair("tiny_gqa")
    batch = build_batch(cfg, [VIDEO, [Piece("text", 4)]], seed=1)
    before = {k: v.clone() for k, v in params.items()}
    cache = allocate_cache(params, cfg, batch_size=2, capacity=64)
    pointers = [t.data_ptr() for t in cache.k + cache.v]
    logits = prefill(params, cfg, cache, batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert cache.lengths == lengths
    # Each row's next position is its length + its rope delta: non-zero after a video, zero for text.
    deltas = prepare_inputs(cfg, {k: v for k, v in batch.items() if k != "labels"}).rope_deltas.flatten()
    assert cache.rope_deltas.tolist() == deltas.tolist() and deltas[0] != 0 and deltas[1] == 0
    decode_step(params, cfg, cache, logits.argmax(-1))
    assert cache.lengths == [n + 1 for n in lengths]
    assert [t.data_ptr() for t in cache.k + cache.v] == pointers  # written into, never replaced
    assert all(bool(t[1, lengths[1] + 1 :].eq(0).all()) for t in cache.k)  # nothing past a row's tokens
    assert all(torch.equal(before[k], params[k]) for k in params)


def test_decoding_continues_positions_with_the_rope_delta(hf_pair):
    """A wrong decode position changes the logits: compare one cached step with a full forward."""
    cfg, _, params, _ = hf_pair("tiny_gqa")
    batch = build_batch(cfg, [VIDEO], seed=2)
    cache = allocate_cache(params, cfg, batch_size=1, capacity=40)
    token = prefill(params, cfg, cache, batch).argmax(-1)
    step = decode_step(params, cfg, cache, token)[0]
    media = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask", "input_ids")}
    full = thinker_logits(params, cfg, {"input_ids": torch.cat([batch["input_ids"], token[None]], 1)} | media)[0, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-4)
    cache.rope_deltas.zero_()  # as if positions simply counted tokens
    cache.lengths[0] -= 1
    wrong = decode_step(params, cfg, cache, token)[0]
    assert (wrong - full).abs().max() > 1e-2


def test_capacity_errors_are_clear(hf_pair):
    cfg, _, params, _ = hf_pair("tiny_gqa")
    batch = build_batch(cfg, [[Piece("text", 10)]], seed=3)
    with pytest.raises(CacheFullError, match="a prompt of 10 tokens does not fit the KV cache of 8"):
        prefill(params, cfg, allocate_cache(params, cfg, batch_size=1, capacity=8), batch)
    with pytest.raises(CacheFullError, match="needs 14 cache slots, the KV cache has 12"):
        generate(params, cfg, batch, max_new_tokens=5, cache=allocate_cache(params, cfg, batch_size=1, capacity=12))
    with pytest.raises(CacheFullError, match="exceeds the model's 12 positions"):
        generate(params, cfg, batch, max_new_tokens=5, max_positions=12)
    cache = allocate_cache(params, cfg, batch_size=1, capacity=10)
    token = prefill(params, cfg, cache, batch).argmax(-1)
    with pytest.raises(CacheFullError, match="full"):
        decode_step(params, cfg, cache, token)
    with pytest.raises(ValueError, match="allocated for 2"):
        prefill(params, cfg, allocate_cache(params, cfg, batch_size=2, capacity=16), batch)
    empty = build_batch(cfg, [[Piece("text", 3)], [Piece("text", 3)]], seed=4)
    empty["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="no tokens"):
        generate(params, cfg, empty, max_new_tokens=2)


def test_a_reused_cache_gives_the_same_tokens(hf_pair):
    cfg, _, params, _ = hf_pair("tiny_gqa")
    first, second = (build_batch(cfg, [[Piece("text", n)]], seed=n) for n in (9, 5))
    cache = allocate_cache(params, cfg, batch_size=1, capacity=32)
    assert generate(params, cfg, first, max_new_tokens=8, cache=cache) == generate(params, cfg, first, max_new_tokens=8)
    assert generate(params, cfg, second, max_new_tokens=8, cache=cache) == generate(params, cfg, second, max_new_tokens=8)


def test_validation_loss_is_the_token_weighted_loss_and_changes_nothing(hf_pair):
    cfg, _, params, _ = hf_pair("tiny_gqa")
    batches = [build_batch(cfg, [[Piece("text", 9)], [Piece("text", 2), Piece("image", grid=(1, 4, 4)), Piece("text", 5)]], seed=5),
               build_batch(cfg, [[Piece("text", 4)]], seed=6)]  # fmt: skip
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    result = validation_loss(leaves, cfg, batches)
    sums = [thinker_loss(params, cfg, b, reduction="sum").item() for b in batches]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert result.targets == sum(counts)
    assert result.total == pytest.approx(sum(sums), rel=1e-6)
    assert result.mean == pytest.approx(sum(sums) / sum(counts), rel=1e-6)
    assert result.mean != pytest.approx(sum(s / c for s, c in zip(sums, counts)) / 2, rel=1e-4)  # not a mean of means
    assert all(p.grad is None for p in leaves.values())


def test_given_position_ids_give_the_same_rope_deltas(hf_pair):
    """A batch that brings its own 3-D positions (as `Sample.batch()` does) decodes as one that does not."""
    cfg, _, params, _ = hf_pair("tiny_gqa")
    batch = {k: v for k, v in build_batch(cfg, [VIDEO, [Piece("text", 3)]], seed=8).items() if k != "labels"}
    inputs = prepare_inputs(cfg, batch)
    positions = torch.ones(3, *batch["input_ids"].shape, dtype=torch.long)
    positions[:, batch["attention_mask"].bool()] = inputs.positions
    with_positions = batch | {"position_ids": positions}
    cache = allocate_cache(params, cfg, batch_size=2, capacity=40)
    prefill(params, cfg, cache, with_positions)
    assert cache.rope_deltas.tolist() == inputs.rope_deltas.flatten().tolist()
    assert generate(params, cfg, with_positions, max_new_tokens=10) == generate(params, cfg, batch, max_new_tokens=10)
