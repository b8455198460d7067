"""The chat template's generation prompt: `<|im_start|>assistant\\n` after the last user turn, unlabelled.

Token ids equal transformers' `apply_chat_template(..., add_generation_prompt=True)` on the same
tokenizer and template; with media, the prompt is the full conversation's prefix; a prompt is
never truncated by rounds (that would drop the question).
"""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from data_files import write_image

from omnicore import TINY
from omnicore.data import (
    BadSample,
    LengthPolicy,
    MediaShapes,
    SampleContext,
    TemplateConfig,
    encode_conversation,
    process_sample,
)
from omnicore.data.formats import Conversation, Turn
from omnicore.data.template import IGNORE_INDEX
from omnicore.data.tokenizer import load_tokenizer

HISTORY = [("Name a prime number above 10.", "11 is prime."), ("And another?", "13.")]


def _conv(rounds, system=None, **media) -> Conversation:
    turns = tuple(t for q, a in rounds for t in (Turn("user", q), Turn("assistant", a)))
    return Conversation(id="c", source="/nowhere/data.json", index=0, system=system, turns=turns, **media)


@pytest.mark.parametrize("history", [0, 1, 2])
@pytest.mark.parametrize("system", [None, "Answer in one short sentence."])
def test_prompt_matches_transformers_add_generation_prompt(tiny_tokenizer_dir, history, system):
    from transformers import Qwen2TokenizerFast

    hf = Qwen2TokenizerFast.from_pretrained(tiny_tokenizer_dir)
    rounds = [*HISTORY[:history], ("What animal is on the sofa?", "")]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        m for q, a in rounds for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ][:-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    tok = load_tokenizer(tiny_tokenizer_dir)
    enc = encode_conversation(_conv(rounds, system), tok, MediaShapes(), TINY, TemplateConfig(), generation_prompt=True)
    assert list(enc.input_ids) == list(want)
    assert tok.decode(enc.input_ids).endswith("What animal is on the sofa?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_is_unlabelled_and_history_keeps_its_labels(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    rounds = [*HISTORY[:1], ("What animal is on the sofa?", "")]
    prompt = encode_conversation(_conv(rounds), tok, MediaShapes(), TINY, TemplateConfig(), generation_prompt=True)
    full = encode_conversation(_conv(rounds[:1]), tok, MediaShapes(), TINY, TemplateConfig())
    n = len(full.input_ids)
    assert prompt.input_ids[:n] == full.input_ids and prompt.labels[:n] == full.labels  # the history round as in training
    assert any(label != IGNORE_INDEX for label in full.labels)
    assert all(label == IGNORE_INDEX for label in prompt.labels[n:])  # the question and the generation prompt


def test_the_answer_to_generate_must_be_empty(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(ValueError, match="must be empty"):
        encode_conversation(_conv([("Hi", "Hello")]), tok, MediaShapes(), TINY, TemplateConfig(), generation_prompt=True)


def test_media_prompt_is_the_conversation_prefix_and_never_truncated(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    write_image(tmp_path / "a.png", 56, 84)
    rounds = [("<image>What is this?", "A cat."), ("<image>And this?", "")]
    conv = Conversation(id="c", source=str(tmp_path / "data.json"), index=0, images=("a.png", "a.png"),
                        turns=tuple(t for q, a in rounds for t in (Turn("user", q), Turn("assistant", a))))  # fmt: skip
    ctx = SampleContext(tokenizer=tok, model=TINY)
    prompt = process_sample(conv, ctx, generation_prompt=True)
    answered = process_sample(_with_answer(conv, "A dog."), ctx)
    n = len(prompt)
    assert torch.equal(prompt.input_ids, answered.input_ids[:n])
    assert torch.equal(prompt.positions, answered.positions[:, :n])
    assert torch.equal(prompt.media["image_grid_thw"], answered.media["image_grid_thw"])
    assert torch.equal(prompt.labels, answered.labels[:n])  # the first answer labelled, nothing after it
    assert bool((prompt.labels[-5:] == IGNORE_INDEX).all())
    # A training sample over the limit keeps its first round; a prompt is refused instead.
    short = SampleContext(tokenizer=tok, model=TINY, length=LengthPolicy(max_seq_len=n - 1, on_too_long="truncate"))
    assert len(process_sample(_with_answer(conv, "A dog."), short)) < n
    with pytest.raises(BadSample, match="over max_seq_len"):
        process_sample(conv, short, generation_prompt=True)


def _with_answer(conv: Conversation, answer: str) -> Conversation:
    return attrs.evolve(conv, turns=conv.turns[:-1] + (Turn("assistant", answer),))
