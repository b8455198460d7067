"""The HF boundary: thinker tensor names <-> native names, and lazy reading of HF safetensors folders.

HF names appear only here. The table pairs HF prefixes with native prefixes; the tail (`weight` /
`bias`) is carried over and `{i}` is a layer index. Conversion is renaming only: omnicore keeps HF's
rotate-half rotary layout, separate q / k / v and the Conv3d kernel's 5-D shape, so tensors are
bit-identical on both sides. A full Omni checkpoint prefixes thinker tensors with `thinker.` (and
holds `talker.*` / `token2wav.*`, which the thinker ignores); transformers 4.52's thinker-only
`save_pretrained` writes them without the prefix. Both are read; pickles (`*.bin`) never are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from omnicore.checkpoint.pieces import RankPieces
from omnicore.checkpoint.safetensors_io import SafetensorsFile, SafetensorsFormatError
from omnicore.config import ThinkerConfig, load_config
from omnicore.models.thinker import param_shapes
from omnicore.params import Params, check_shapes

__all__ = [
    "HF_NAME_TABLE",
    "hf_to_native",
    "native_to_hf",
    "params_from_hf",
    "params_to_hf",
    "SafetensorsFolder",
    "load_hf",
    "CheckpointError",
    "THINKER_PREFIX",
    "map_thinker_keys",
]

THINKER_PREFIX = "thinker."

# (HF prefix, native prefix); `{i}` is a layer index.
HF_NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.", "text.embed."),
    ("model.layers.{i}.input_layernorm.", "text.layers.{i}.attn_norm."),
    ("model.layers.{i}.self_attn.q_proj.", "text.layers.{i}.attn.q."),
    ("model.layers.{i}.self_attn.k_proj.", "text.layers.{i}.attn.k."),
    ("model.layers.{i}.self_attn.v_proj.", "text.layers.{i}.attn.v."),
    ("model.layers.{i}.self_attn.o_proj.", "text.layers.{i}.attn.o."),
    ("model.layers.{i}.post_attention_layernorm.", "text.layers.{i}.mlp_norm."),
    ("model.layers.{i}.mlp.gate_proj.", "text.layers.{i}.mlp.gate."),
    ("model.layers.{i}.mlp.up_proj.", "text.layers.{i}.mlp.up."),
    ("model.layers.{i}.mlp.down_proj.", "text.layers.{i}.mlp.down."),
    ("model.norm.", "text.norm."),
    ("lm_head.", "lm_head."),
    ("visual.patch_embed.proj.", "vision.patch_embed."),
    ("visual.blocks.{i}.norm1.", "vision.blocks.{i}.attn_norm."),
    ("visual.blocks.{i}.attn.q.", "vision.blocks.{i}.attn.q."),
    ("visual.blocks.{i}.attn.k.", "vision.blocks.{i}.attn.k."),
    ("visual.blocks.{i}.attn.v.", "vision.blocks.{i}.attn.v."),
    ("visual.blocks.{i}.attn.proj.", "vision.blocks.{i}.attn.o."),
    ("visual.blocks.{i}.norm2.", "vision.blocks.{i}.mlp_norm."),
    ("visual.blocks.{i}.mlp.gate_proj.", "vision.blocks.{i}.mlp.gate."),
    ("visual.blocks.{i}.mlp.up_proj.", "vision.blocks.{i}.mlp.up."),
    ("visual.blocks.{i}.mlp.down_proj.", "vision.blocks.{i}.mlp.down."),
    ("visual.merger.ln_q.", "vision.merger.norm."),
    ("visual.merger.mlp.0.", "vision.merger.fc1."),
    ("visual.merger.mlp.2.", "vision.merger.fc2."),
    ("audio_tower.conv1.", "audio.conv1."),
    ("audio_tower.conv2.", "audio.conv2."),
    ("audio_tower.audio_bos_eos_token.", "audio.bos_eos."),
    ("audio_tower.layers.{i}.self_attn_layer_norm.", "audio.layers.{i}.attn_norm."),
    ("audio_tower.layers.{i}.self_attn.q_proj.", "audio.layers.{i}.attn.q."),
    ("audio_tower.layers.{i}.self_attn.k_proj.", "audio.layers.{i}.attn.k."),
    ("audio_tower.layers.{i}.self_attn.v_proj.", "audio.layers.{i}.attn.v."),
    ("audio_tower.layers.{i}.self_attn.out_proj.", "audio.layers.{i}.attn.o."),
    ("audio_tower.layers.{i}.final_layer_norm.", "audio.layers.{i}.mlp_norm."),
    ("audio_tower.layers.{i}.fc1.", "audio.layers.{i}.mlp.fc1."),
    ("audio_tower.layers.{i}.fc2.", "audio.layers.{i}.mlp.fc2."),
    ("audio_tower.ln_post.", "audio.norm."),
    ("audio_tower.proj.", "audio.proj."),
)

# Buffers some exporters write that the model recomputes; skipped on import, never written.
_DERIVED_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq|positional_embedding\.positional_embedding)$")


def _compile(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(r"\{i\}", r"(\d+)") + r"(weight|bias)$")


_TO_NATIVE = [(_compile(hf), native) for hf, native in HF_NAME_TABLE]
_TO_HF = [(_compile(native), hf) for hf, native in HF_NAME_TABLE]


def _rename(name: str, rules) -> str | None:
    for pattern, target in rules:
        m = pattern.match(name)
        if m:
            groups = m.groups()
            return (target.replace("{i}", groups[0]) if "{i}" in target else target) + groups[-1]
    return None


def hf_to_native(name: str) -> str | None:
    """Native name of an (unprefixed) HF thinker tensor name, or None if the table has no rule."""
    return _rename(name, _TO_NATIVE)


def native_to_hf(name: str) -> str:
    hf = _rename(name, _TO_HF)
    if hf is None:
        raise KeyError(f"no HF name for native tensor {name!r}")
    return hf


class CheckpointError(ValueError):
    """A checkpoint omnicore cannot load; the message names the file and the tensors at fault."""


def params_from_hf(state: Mapping[str, torch.Tensor], cfg: ThinkerConfig, *, source: str = "state dict") -> Params:
    """Rename an HF thinker state dict (with or without the `thinker.` prefix) and validate it."""
    names = map_thinker_keys(state.keys(), lambda k: tuple(state[k].shape), cfg, source)
    return {native: state[hf_name] for hf_name, native in names.items()}


def params_to_hf(params: Mapping[str, torch.Tensor], *, prefix: str = THINKER_PREFIX) -> dict[str, torch.Tensor]:
    return {prefix + native_to_hf(k): v for k, v in params.items()}


def _thinker_names(keys) -> dict[str, str]:
    """HF key -> key without the thinker prefix, for thinker tensors only (talker etc. dropped)."""
    keys = list(keys)
    if any(k.startswith(THINKER_PREFIX) for k in keys):
        keys = [k for k in keys if k.startswith(THINKER_PREFIX)]
        return {k: k[len(THINKER_PREFIX) :] for k in keys if not _DERIVED_BUFFERS.search(k)}
    return {k: k for k in keys if not _DERIVED_BUFFERS.search(k)}


def map_thinker_keys(keys, shape_of: Callable[[str], tuple[int, ...]], cfg: ThinkerConfig, source: str) -> dict[str, str]:
    """HF thinker key -> native name for the thinker tensors among `keys` (talker etc. ignored),
    after checking names and shapes (`shape_of(key)`) against `param_shapes(cfg)`."""
    names, unknown = {}, []
    for hf_name, short in _thinker_names(keys).items():
        native = hf_to_native(short)
        if native is None:
            unknown.append(hf_name)
        else:
            names[hf_name] = native
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} thinker tensor(s) omnicore does not know: {', '.join(sorted(unknown))}")
    try:
        check_shapes({n: shape_of(h) for h, n in names.items()}, param_shapes(cfg), source=source)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return names


class SafetensorsFolder:
    """Lazy view of an HF folder's safetensors: a single file or shards with an index.

    Headers are validated when a shard is first touched (a missing or truncated shard is an error
    naming it); tensors are read one at a time, so memory stays near the largest tensor.
    """

    INDEX = "model.safetensors.index.json"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / self.INDEX
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                self.index = json.loads(index.read_text())
                weight_map = self.index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
            self.files = {k: self.folder / f for k, f in weight_map.items()}
        elif single.exists():
            self.index = None
            self.files = dict.fromkeys(self.open_file(single).keys(), single)
        else:
            pickles = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded; re-save as safetensors)" if pickles else ""
            raise CheckpointError(f"{self.folder}: no model.safetensors or {self.INDEX}{hint}")
        self._open: dict[Path, SafetensorsFile] = {}

    def open_file(self, path: Path) -> SafetensorsFile:
        """A shard's validated header (CheckpointError naming a missing or broken shard)."""
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        try:
            return SafetensorsFile(path)
        except SafetensorsFormatError as err:
            raise CheckpointError(str(err)) from None

    def file(self, name: str) -> SafetensorsFile:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = self.open_file(path)
        if name not in self._open[path].tensors:
            raise CheckpointError(f"{path}: the index lists {name} in this file but it is not there")
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self.files)

    def shards(self) -> list[Path]:
        """Shard files in index order, each once."""
        return list(dict.fromkeys(self.files.values()))

    def get(self, name: str) -> torch.Tensor:
        return self.file(name).read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the data."""
        return self.file(name).tensors[name].shape


def load_hf(
    folder: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", keep: Callable[[str], bool] | None = None,
    pieces: RankPieces | None = None,
) -> tuple[ThinkerConfig, Params]:  # fmt: skip
    """(config, params) of the thinker in an HF Qwen2.5-Omni folder (full model or thinker-only).

    Every thinker tensor is used exactly once; unknown, missing or mis-shaped tensors are an error
    listing them. `dtype` None keeps the stored dtype; `keep` (native name -> bool) reads only the
    tensors it accepts (a pipeline stage's); `pieces` reads one TP rank's pieces instead of full tensors.
    """
    cfg = load_config(folder)
    store = SafetensorsFolder(folder)
    names = map_thinker_keys(store.keys(), store.shape, cfg, str(folder))
    params = {}
    for hf_name, native in names.items():
        if keep is not None and not keep(native):
            continue
        t = store.get(hf_name) if pieces is None else pieces.read(store.file(hf_name), hf_name, native)
        params[native] = t.to(device=device, dtype=dtype or t.dtype)
    return cfg, params
