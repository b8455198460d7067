"""Tokenizer loading with `tokenizers` only: tokenizer.json and vocab.json + merges.txt give the same ids
as transformers' Qwen2TokenizerFast / Qwen2Tokenizer; special tokens are single ids; no BOS; bad folders
are clean `TokenizerError`s."""

from __future__ import annotations

import json
import shutil

import attrs
import pytest
from tiny_tokenizer import BASE_VOCAB, SPECIAL, write_tokenizer

from omnicore import TINY
from omnicore.data.tokenizer import TokenizerError, load_tokenizer

TEXTS = [
    "Hello world\n\n  New paragraph\twith tabs",
    "<|im_start|>user\nWhat animal<|IMAGE|> is that?<|im_end|>\n",
    "Ünïcödé café 日本語 🙂 don't I'LL 12345",
    "e\u0301 (a combining accent, NFC-normalised)",
    "   trailing spaces   ",
    "\r\n\r\nx\n",
    "",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return write_tokenizer(root / "json"), write_tokenizer(root / "vocab", layout="vocab")


def test_both_layouts_match_transformers(folders):
    from transformers import Qwen2Tokenizer, Qwen2TokenizerFast

    json_dir, vocab_dir = folders
    ours_json, ours_vocab = load_tokenizer(json_dir), load_tokenizer(vocab_dir)
    hf_fast, hf_slow = Qwen2TokenizerFast.from_pretrained(json_dir), Qwen2Tokenizer.from_pretrained(vocab_dir)
    for text in TEXTS:
        expected = hf_fast(text)["input_ids"]
        assert ours_json.encode(text) == expected, text
        assert ours_vocab.encode(text) == expected, text
        assert hf_slow(text)["input_ids"] == expected, text
    assert ours_json.decode(ours_json.encode(TEXTS[2])) == TEXTS[2]


def test_special_tokens_are_single_ids_without_bos(folders):
    tok = load_tokenizer(folders[0])
    for i, token in enumerate(SPECIAL):
        assert tok.encode(token) == [BASE_VOCAB + i]
    s = tok.special
    assert (s.audio, s.audio_bos, s.audio_eos, s.vision_bos, s.vision_eos, s.image, s.video) == tuple(range(500, 507))
    assert tok.encode("hi")[0] != tok.special.im_start  # nothing prepended
    assert set(range(500, 511)) <= tok.special_set
    tok.check_config(TINY)  # ids agree with the tiny model


def test_config_mismatch_is_named(folders):
    tok = load_tokenizer(folders[0])
    other = attrs.evolve(TINY, tokens=attrs.evolve(TINY.tokens, image=499))
    with pytest.raises(TokenizerError, match=r"<\|IMAGE\|> to 505 .* image = 499"):
        tok.check_config(other)


def test_bad_folders(tmp_path, folders):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(folders[0], broken)
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match="line 1, column"):
        load_tokenizer(broken)
    # An added token declared at an id it cannot have (a gap after the vocabulary) is refused.
    shifted = tmp_path / "shifted"
    shutil.copytree(folders[1], shifted)
    config = json.loads((shifted / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(int(k) + 3): v for k, v in config["added_tokens_decoder"].items()}
    (shifted / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="declared as id 503 but loads as 500"):
        load_tokenizer(shifted)
    merges = tmp_path / "merges"
    shutil.copytree(folders[1], merges)
    (merges / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="merges.txt:2"):
        load_tokenizer(merges)
