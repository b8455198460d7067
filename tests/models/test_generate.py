"""Greedy decoding (no cache) equals transformers' generate on the tiny thinker: identical tokens."""

from __future__ import annotations

import pytest
import torch
from hf_reference import Piece, build_batch, hf_kwargs

from omnicore.generate import greedy_generate

T, I, A = "text", "image", "audio"
PROMPTS = {
    "text": [[Piece(T, 6)]],
    "image": [[Piece(T, 2), Piece(I, grid=(1, 4, 6)), Piece(T, 3)]],
    "audio": [[Piece(T, 2), Piece(A, 120), Piece(T, 2)]],
}


@pytest.mark.parametrize("kind", PROMPTS)
def test_greedy_tokens_match_transformers_generate(hf_pair, kind):
    cfg, model, params, _ = hf_pair("tiny_gqa")
    batch = build_batch(cfg, PROMPTS[kind], seed=7)
    prompt = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}
    ours = greedy_generate(params, cfg, prompt, max_new_tokens=12, stop_ids=set())
    kwargs = {k: v for k, v in hf_kwargs(batch).items() if k != "labels"}
    with torch.no_grad():
        theirs = model.generate(**kwargs, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, batch["input_ids"].shape[1] :].tolist()
    assert len(set(ours)) >= 3  # not one repeated token
