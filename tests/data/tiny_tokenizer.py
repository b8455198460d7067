"""A tiny Qwen2-style byte-level BPE tokenizer made inside the tests, with TINY's special-token ids.

The BPE is trained on a few sentences with `tokenizers`, padded to exactly 500 entries, and the special
tokens are added after it in the order of `omnicore.TINY`'s ids (<|AUDIO|> = 500 ... <|VIDEO|> = 506),
then the chat tokens. `write_tokenizer` saves it as an HF folder (tokenizer.json + tokenizer_config.json
with the chat template of qwen2_5_omni.md section 5.1, written here), or as vocab.json + merges.txt.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from omnicore.data.tokenizer import QWEN2_PATTERN

BASE_VOCAB = 500
SPECIAL = (
    "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>",
)  # fmt: skip

CORPUS = [
    "You are a helpful assistant. What animal is on the sofa? A grey cat with white paws.",
    "Describe the image in detail, please. There are three bicycles leaning on the fence.",
    "What does the speaker announce? That the train to Lyon is delayed by 10 minutes.",
    "Name a prime number above 10. 11 is prime; so are 13, 17 and 19!",
    "Listen to this clip <audio> and tell me what instrument is playing: a solo violin.",
    "Hello world\n\nNew paragraph\twith tabs, CAPITALS and numbers 12345 and don't won't I'll.",
    "Ünïcödé tëxt: café, naïve, 日本語のテキスト, emoji 🙂 and symbols -> => <= ### ***.",
]

# The Qwen2.5-Omni chat template as qwen2_5_omni.md section 5.1 describes it (no vision/audio ids).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bare() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A trained byte-level BPE vocabulary of exactly BASE_VOCAB entries and its merges."""
    tok = _bare()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Unreachable fillers (no merge builds them) so the special tokens start at id 500.
    for i in range(BASE_VOCAB - len(vocab)):
        vocab[f"zzfill{i:03d}"] = len(vocab)
    assert len(vocab) == BASE_VOCAB
    return vocab, merges


def _config(special_ids: dict[str, int]) -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                     "special": True}
            for t, i in special_ids.items()
        },
        "extra_special_tokens": {
            "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
        },
        "chat_template": CHAT_TEMPLATE,
    }  # fmt: skip


def write_tokenizer(folder: Path, *, layout: str = "json") -> Path:
    """Save the tiny tokenizer into `folder` as tokenizer.json ("json") or vocab.json + merges.txt ("vocab")."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    special_ids = {t: BASE_VOCAB + i for i, t in enumerate(SPECIAL)}
    if layout == "json":
        tok = _bare()
        tok.model = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
        tok.add_special_tokens(list(SPECIAL))
        assert all(tok.token_to_id(t) == i for t, i in special_ids.items())
        tok.save(str(folder / "tokenizer.json"))
    else:
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(_config(special_ids), indent=1))
    return folder
