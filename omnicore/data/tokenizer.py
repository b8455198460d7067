"""The tokenizer of an HF checkpoint folder, through the `tokenizers` library only (no transformers).

`tokenizer.json` is used when present; otherwise Qwen2's byte-level BPE is built from `vocab.json` +
`merges.txt` (NFC normaliser, Qwen2's pre-tokenisation regex, byte-level alphabet, no unknown token).
Added tokens (`tokenizer_config.json` `added_tokens_decoder`, or `tokenizer.json` `added_tokens`) keep
their declared ids, checked on load. Special tokens are always single ids (`split_special_tokens` false)
and nothing is prepended or appended (Qwen2 has no BOS). The checkpoint's Jinja chat template is never
read: `omnicore.data.template` renders conversations in Python.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from omnicore.config import ThinkerConfig

__all__ = [
    "TokenizerError",
    "Tokenizer",
    "SpecialIds",
    "load_tokenizer",
    "qwen2_bpe",
    "QWEN2_PATTERN",
    "SPECIAL_TOKENS",
]

# Qwen2's pre-tokenisation: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newline runs, trailing spaces. A fact of the published tokenizer, not a choice.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Field name of `SpecialIds` -> the token text of Qwen2.5-Omni's vocabulary.
SPECIAL_TOKENS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "image": "<|IMAGE|>",
    "video": "<|VIDEO|>",
    "audio": "<|AUDIO|>",
    "vision_bos": "<|vision_bos|>",
    "vision_eos": "<|vision_eos|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
}

# SpecialIds field -> TokenIds field of the thinker config that must agree with it.
_CONFIG_NAMES = {
    "image": "image",
    "video": "video",
    "audio": "audio",
    "vision_bos": "vision_start",
    "vision_eos": "vision_end",
    "audio_bos": "audio_start",
    "audio_eos": "audio_end",
}


class TokenizerError(ValueError):
    """A tokenizer folder omnicore cannot use; the message names the file and the token."""


@attrs.frozen(kw_only=True)
class SpecialIds:
    """Ids of the chat and media tokens the template emits."""

    im_start: int
    im_end: int
    image: int
    video: int
    audio: int
    vision_bos: int
    vision_eos: int
    audio_bos: int
    audio_eos: int


@attrs.frozen
class Tokenizer:
    """A loaded `tokenizers.Tokenizer` with the few operations the data pipeline needs."""

    backend: tokenizers.Tokenizer
    special: SpecialIds
    special_set: frozenset[int]  # every special added token: never allowed to come out of record text

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single ids."""
        return self.backend.encode(text, add_special_tokens=False).ids if text else []

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in `text`."""
        if not text:
            return [], []
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        found = self.backend.token_to_id(token)
        if found is None:
            raise TokenizerError(f"the tokenizer has no token {token!r}")
        return found

    def check_config(self, cfg: ThinkerConfig) -> None:
        """Raise if the tokenizer's media token ids differ from the model config's."""
        for ours, theirs in _CONFIG_NAMES.items():
            expected = getattr(cfg.tokens, theirs)
            got = getattr(self.special, ours)
            if expected is not None and expected != got:
                raise TokenizerError(
                    f"the tokenizer maps {SPECIAL_TOKENS[ours]} to {got} "
                    f"but the model config says {theirs} = {expected}"
                )


def qwen2_bpe(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> tokenizers.Tokenizer:
    """Qwen2's byte-level BPE (as its tokenizer.json describes it) from a vocabulary and merges."""
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=dict(vocab), merges=list(merges), unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            # The regex above already split words, so the byte-level step must not split again.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(path: Path) -> object:
    return _parse_json(_read_text(path), path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None


def _parse_json(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{number}: a merge is two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _declared_added(folder: Path) -> dict[int, tuple[str, bool]]:
    """id -> (token, special) from tokenizer_config.json's `added_tokens_decoder`, if any."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = _read_json(path)
    table = config.get("added_tokens_decoder", {}) if isinstance(config, dict) else {}
    try:
        return {int(i): (str(t["content"]), bool(t.get("special", True))) for i, t in table.items()}
    except (TypeError, ValueError, KeyError, AttributeError):
        raise TokenizerError(f"{path}: added_tokens_decoder must map ids to {{'content': ...}} objects") from None


def _add_tokens(tok: tokenizers.Tokenizer, declared: Mapping[int, tuple[str, bool]], where: Path) -> None:
    """Add the declared tokens in id order and check each lands on its declared id.

    `tokenizers` gives a new added token the next free id, so declared ids must continue the
    vocabulary without gaps (true of every Qwen checkpoint); anything else is refused, not renumbered.
    """
    for token_id, (text, special) in sorted(declared.items()):
        if tok.token_to_id(text) is None:
            added = AddedToken(text, special=special, normalized=False)
            tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        got = tok.token_to_id(text)
        if got != token_id:
            raise TokenizerError(f"{where}: added token {text!r} is declared as id {token_id} but loads as {got}")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of an HF checkpoint folder (`tokenizer.json`, or `vocab.json` + `merges.txt`)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        text = _read_text(path)
        spec = _parse_json(text, path)  # a clean error with line and column for a damaged file
        try:
            tok = tokenizers.Tokenizer.from_str(text)
            declared = {int(t["id"]): (str(t["content"]), bool(t.get("special"))) for t in spec.get("added_tokens", [])}
        except Exception as e:  # the Rust parser reports schema problems as plain Exceptions
            raise TokenizerError(f"{path}: not a tokenizers file ({e})") from None
        # Deserialising renumbers added tokens consecutively; check they kept their written ids.
        _add_tokens(tok, declared, path)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json")
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{folder / 'vocab.json'}: must map tokens to ids")
        tok = qwen2_bpe(vocab, _read_merges(folder / "merges.txt"))
    else:
        raise TokenizerError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
    _add_tokens(tok, _declared_added(folder), folder / "tokenizer_config.json")
    tok.encode_special_tokens = False  # special tokens are always single ids
    special = SpecialIds(**{name: _required(tok, text, folder) for name, text in SPECIAL_TOKENS.items()})
    every = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    return Tokenizer(tok, special, every | frozenset(attrs.astuple(special)))


def _required(tok: tokenizers.Tokenizer, text: str, folder: Path) -> int:
    found = tok.token_to_id(text)
    if found is None:
        raise TokenizerError(f"{folder}: the tokenizer has no {text} token (not a Qwen2.5-Omni tokenizer?)")
    return found
