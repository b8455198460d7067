"""Frozen model configs of the Qwen2.5-Omni thinker, built only from an HF `config.json`.

`ThinkerConfig.from_hf` accepts the full Omni config (`model_type` "qwen2_5_omni", thinker under
`thinker_config`) or a thinker-only one ("qwen2_5_omni_thinker"), in the 4.x (`rope_scaling`) or
5.x (`rope_parameters`) spelling. Structure and special token ids are never taken from class
defaults (the HF vision class defaults to hidden 3584, not 1280); a missing key is an error naming
its path. `to_hf` writes the thinker-only form back. Invariants are checked at construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "ConfigError",
    "TextConfig",
    "VisionConfig",
    "AudioConfig",
    "TokenIds",
    "ThinkerConfig",
    "load_config",
    "TINY",
]


class ConfigError(ValueError):
    """A config.json that omnicore cannot build the model from; the message names the key."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@attrs.frozen(kw_only=True)
class TextConfig:
    """The Qwen2 decoder of the thinker (GQA, q/k/v bias, SwiGLU, RMSNorm, 3-D M-RoPE)."""

    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    rope_theta: float
    rms_eps: float
    mrope_section: tuple[int, int, int] = attrs.field(converter=tuple)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def __attrs_post_init__(self) -> None:
        _check(
            self.n_heads > 0 and self.hidden % self.n_heads == 0,
            f"text_config: hidden_size {self.hidden} is not divisible by num_attention_heads {self.n_heads}",
        )
        _check(
            self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
            f"text_config: num_attention_heads {self.n_heads} is not a multiple of "
            f"num_key_value_heads {self.n_kv_heads}",
        )
        _check(
            len(self.mrope_section) == 3 and sum(self.mrope_section) * 2 == self.head_dim,
            f"text_config: mrope_section {list(self.mrope_section)} must have 3 entries summing to "
            f"head_dim / 2 = {self.head_dim // 2}",
        )


@attrs.frozen(kw_only=True)
class VisionConfig:
    """The windowed ViT with 2-D rotary and the 2x2 patch merger."""

    depth: int
    hidden: int
    n_heads: int
    ffn: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_blocks: tuple[int, ...] = attrs.field(converter=tuple)
    out_hidden: int
    rms_eps: float = 1e-6  # hard-coded in the HF vision modules

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values` (C * T * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (2x2 = 4)."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Merged tokens per window side (112 px / 2 / 14 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def __attrs_post_init__(self) -> None:
        _check(
            self.n_heads > 0 and self.hidden % self.n_heads == 0,
            f"vision_config: hidden_size {self.hidden} is not divisible by num_heads {self.n_heads}",
        )
        _check(
            self.head_dim % 4 == 0,
            f"vision_config: head_dim {self.head_dim} must be a multiple of 4 (2-D rotary splits it in quarters)",
        )
        _check(self.window_units > 0, f"vision_config: window_size {self.window_size} is smaller than one merged token")
        bad = [b for b in self.fullatt_blocks if not 0 <= b < self.depth]
        _check(not bad, f"vision_config: fullatt_block_indexes {bad} outside 0..{self.depth - 1}")


@attrs.frozen(kw_only=True)
class AudioConfig:
    """The Whisper-style audio encoder (per-chunk attention, pooling, projection)."""

    n_mels: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn: int
    max_source_positions: int
    n_window: int
    output_dim: int
    ln_eps: float = 1e-5  # nn.LayerNorm default, as in HF

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def chunk_frames(self) -> int:
        """Mel frames per attention chunk (2 * n_window = 200, i.e. 2 s)."""
        return 2 * self.n_window

    def __attrs_post_init__(self) -> None:
        _check(
            self.n_heads > 0 and self.d_model % self.n_heads == 0,
            f"audio_config: d_model {self.d_model} is not divisible by encoder_attention_heads {self.n_heads}",
        )
        _check(self.d_model % 2 == 0, f"audio_config: d_model {self.d_model} must be even (sinusoid positions)")
        chunk_positions = (self.chunk_frames - 1) // 2 + 1
        _check(
            chunk_positions <= self.max_source_positions,
            f"audio_config: a {self.chunk_frames}-frame chunk needs {chunk_positions} positions, "
            f"max_source_positions is {self.max_source_positions}",
        )


@attrs.frozen(kw_only=True)
class TokenIds:
    """Special token ids the model math depends on (read from config.json, never hard-coded)."""

    audio: int
    image: int
    video: int
    audio_start: int
    audio_end: int
    vision_start: int
    vision_end: int | None = None


@attrs.frozen(kw_only=True)
class ThinkerConfig:
    text: TextConfig
    vision: VisionConfig
    audio: AudioConfig
    tokens: TokenIds
    position_id_per_seconds: int
    seconds_per_chunk: float

    def __attrs_post_init__(self) -> None:
        _check(
            self.vision.out_hidden == self.text.hidden,
            f"vision_config.out_hidden_size {self.vision.out_hidden} != text hidden_size {self.text.hidden}",
        )
        _check(
            self.audio.output_dim == self.text.hidden,
            f"audio_config.output_dim {self.audio.output_dim} != text hidden_size {self.text.hidden}",
        )
        for name, value in attrs.asdict(self.tokens).items():
            _check(
                value is None or 0 <= value < self.text.vocab_size,
                f"token id {name} = {value} is outside the vocabulary (size {self.text.vocab_size})",
            )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ThinkerConfig:
        """Build from a parsed HF config.json (full Omni or thinker-only)."""
        thinker, where = (hf["thinker_config"], "thinker_config.") if "thinker_config" in hf else (hf, "")
        return cls(
            text=_text_from_hf(_section(thinker, "text_config", where), f"{where}text_config."),
            vision=_vision_from_hf(_section(thinker, "vision_config", where), f"{where}vision_config."),
            audio=_audio_from_hf(_section(thinker, "audio_config", where), f"{where}audio_config."),
            tokens=TokenIds(
                audio=_get(thinker, where, "audio_token_index", "audio_token_id"),
                image=_get(thinker, where, "image_token_index", "image_token_id"),
                video=_get(thinker, where, "video_token_index", "video_token_id"),
                audio_start=_get(thinker, where, "audio_start_token_id"),
                audio_end=_get(thinker, where, "audio_end_token_id"),
                vision_start=_get(thinker, where, "vision_start_token_id"),
                vision_end=thinker.get("vision_end_token_id"),
            ),
            position_id_per_seconds=_get(thinker, where, "position_id_per_seconds"),
            seconds_per_chunk=_get(thinker, where, "seconds_per_chunk"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The thinker-only HF config dict (model_type "qwen2_5_omni_thinker", 4.52 spelling)."""
        t, v, a, k = self.text, self.vision, self.audio, self.tokens
        out = {
            "model_type": "qwen2_5_omni_thinker",
            "architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"],
            "audio_token_index": k.audio,
            "image_token_index": k.image,
            "video_token_index": k.video,
            "audio_start_token_id": k.audio_start,
            "audio_end_token_id": k.audio_end,
            "vision_start_token_id": k.vision_start,
            "position_id_per_seconds": self.position_id_per_seconds,
            "seconds_per_chunk": self.seconds_per_chunk,
            "text_config": {
                "model_type": "qwen2_5_omni_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden,
                "num_hidden_layers": t.n_layers,
                "num_attention_heads": t.n_heads,
                "num_key_value_heads": t.n_kv_heads,
                "intermediate_size": t.ffn,
                "hidden_act": "silu",
                "rope_theta": t.rope_theta,
                "rms_norm_eps": t.rms_eps,
                "rope_scaling": {"mrope_section": list(t.mrope_section), "rope_type": "default", "type": "default"},
                "tie_word_embeddings": False,
            },
            "vision_config": {
                "model_type": "qwen2_5_omni_vision_encoder",
                "depth": v.depth,
                "hidden_size": v.hidden,
                "num_heads": v.n_heads,
                "intermediate_size": v.ffn,
                "hidden_act": "silu",
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_blocks),
                "out_hidden_size": v.out_hidden,
            },
            "audio_config": {
                "model_type": "qwen2_5_omni_audio_encoder",
                "num_mel_bins": a.n_mels,
                "d_model": a.d_model,
                "encoder_layers": a.n_layers,
                "encoder_attention_heads": a.n_heads,
                "encoder_ffn_dim": a.ffn,
                "activation_function": "gelu",
                "max_source_positions": a.max_source_positions,
                "n_window": a.n_window,
                "output_dim": a.output_dim,
            },
        }
        if k.vision_end is not None:
            out["vision_end_token_id"] = k.vision_end
        return out


_MISSING = object()


def _get(d: Mapping[str, Any], where: str, key: str, *aliases: str) -> Any:
    for name in (key, *aliases):
        value = d.get(name, _MISSING)
        if value is not _MISSING and value is not None:
            return value
    spelled = " / ".join(where + n for n in (key, *aliases))
    raise ConfigError(f"config.json has no {spelled}; it is required to build the model")


def _section(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = _get(d, where, key)
    _check(isinstance(value, Mapping), f"config.json: {where}{key} must be an object")
    return value


def _expect(d: Mapping[str, Any], where: str, key: str, supported: str) -> None:
    value = d.get(key, supported)
    _check(value == supported, f"config.json: {where}{key} = {value!r} is not supported (only {supported!r})")


def _text_from_hf(d: Mapping[str, Any], where: str) -> TextConfig:
    _expect(d, where, "hidden_act", "silu")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    _check("mrope_section" in rope, f"config.json: {where}rope_scaling.mrope_section is required (3-D M-RoPE)")
    theta = d.get("rope_theta", rope.get("rope_theta", _MISSING))
    _check(theta is not _MISSING, f"config.json has no {where}rope_theta")
    return TextConfig(
        vocab_size=_get(d, where, "vocab_size"),
        hidden=_get(d, where, "hidden_size"),
        n_layers=_get(d, where, "num_hidden_layers"),
        n_heads=_get(d, where, "num_attention_heads"),
        n_kv_heads=_get(d, where, "num_key_value_heads"),
        ffn=_get(d, where, "intermediate_size"),
        rope_theta=float(theta),
        rms_eps=float(_get(d, where, "rms_norm_eps")),
        mrope_section=rope["mrope_section"],
    )


def _vision_from_hf(d: Mapping[str, Any], where: str) -> VisionConfig:
    _expect(d, where, "hidden_act", "silu")
    return VisionConfig(
        depth=_get(d, where, "depth"),
        hidden=_get(d, where, "hidden_size"),
        n_heads=_get(d, where, "num_heads"),
        ffn=_get(d, where, "intermediate_size"),
        in_channels=_get(d, where, "in_channels", "in_chans"),
        patch_size=_get(d, where, "patch_size"),
        temporal_patch_size=_get(d, where, "temporal_patch_size"),
        spatial_merge_size=_get(d, where, "spatial_merge_size"),
        window_size=_get(d, where, "window_size"),
        fullatt_blocks=_get(d, where, "fullatt_block_indexes"),
        out_hidden=_get(d, where, "out_hidden_size"),
    )


def _audio_from_hf(d: Mapping[str, Any], where: str) -> AudioConfig:
    _expect(d, where, "activation_function", "gelu")
    return AudioConfig(
        n_mels=_get(d, where, "num_mel_bins"),
        d_model=_get(d, where, "d_model"),
        n_layers=_get(d, where, "encoder_layers"),
        n_heads=_get(d, where, "encoder_attention_heads"),
        ffn=_get(d, where, "encoder_ffn_dim"),
        max_source_positions=_get(d, where, "max_source_positions"),
        n_window=_get(d, where, "n_window"),
        output_dim=_get(d, where, "output_dim"),
    )


def load_config(path: str | Path) -> ThinkerConfig:
    """Read `config.json` from an HF checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        hf = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found (an HF checkpoint folder must hold config.json)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    try:
        return ThinkerConfig.from_hf(hf)
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None


# A small Omni-shaped model for tests and examples. Token ids sit at the top of a 512-token vocab,
# in the same order as the published ids (audio, audio bos/eos, vision bos/eos, image, video).
TINY = ThinkerConfig(
    text=TextConfig(
        vocab_size=512, hidden=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn=128,
        rope_theta=1e6, rms_eps=1e-6, mrope_section=(2, 3, 3),
    ),
    vision=VisionConfig(
        depth=4, hidden=32, n_heads=2, ffn=48, in_channels=3, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, window_size=112, fullatt_blocks=(1, 3), out_hidden=64,
    ),
    audio=AudioConfig(
        n_mels=128, d_model=32, n_layers=2, n_heads=2, ffn=64, max_source_positions=1500,
        n_window=100, output_dim=64,
    ),
    tokens=TokenIds(audio=500, audio_start=501, audio_end=502, vision_start=503, vision_end=504, image=505, video=506),
    position_id_per_seconds=25,
    seconds_per_chunk=2,
)  # fmt: skip
