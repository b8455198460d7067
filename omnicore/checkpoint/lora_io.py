"""LoRA adapters on disk: adapter-only checkpoints, the base they belong to, and the two exports.

An adapter checkpoint is a native step folder (`iter_*/`, same commit protocol) that holds
`lora-tpXX-ppYY.safetensors` (each TP rank's adapter pieces on each pipeline stage, omnicore.lora's names) plus the usual
optimizer / RNG / data files, and no model files. Its `meta.json` carries `lora`: the LoraSpec
and `base` = {path, sha256} of the base checkpoint it was trained on. The base's checksum is the
sha256 of its files' recorded sha256s (native) or of its safetensors files' bytes (HF folder), so
adapters are never silently applied to another base.
Exports: `export_merged_hf` folds the adapters into the base and writes a full HF Qwen2.5-Omni
folder through `native_to_hf` (talker kept, original dtypes); `write_peft_adapter` writes a PEFT
folder (`adapter_config.json` + `adapter_model.safetensors`) for the HF thinker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from omnicore.checkpoint.commit import META, TRACKER
from omnicore.checkpoint.convert import native_to_hf
from omnicore.checkpoint.hf import CheckpointError, load_hf
from omnicore.checkpoint.hf import native_to_hf as hf_name
from omnicore.checkpoint.native import DictSource, NativeCheckpoint, resolve_step, write_native
from omnicore.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter, sha256_file
from omnicore.config import ThinkerConfig
from omnicore.layout import Layout, tower_of, unshard_tensors
from omnicore.lora import LoraError, LoraSpec, adapter_rule, adapter_shapes, layer_of, merge
from omnicore.params import Params, check_shapes

__all__ = [
    "adapter_file",
    "base_fingerprint",
    "AdapterCheckpoint",
    "check_base",
    "peft_module",
    "write_peft_adapter",
    "read_peft_adapter",
    "load_base",
    "export_merged_hf",
    "adapter_merger",
]


def adapter_file(tp_rank: int, pp_rank: int = 0) -> str:
    """The adapter pieces of TP rank `tp_rank` on pipeline stage `pp_rank` in a step folder."""
    return f"lora-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def base_fingerprint(path: str | Path) -> dict[str, str]:
    """{path, sha256} identifying a base checkpoint: a native one by its recorded file checksums
    (no re-reading), an HF folder by the bytes of its safetensors files."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    if (path / TRACKER).exists() or (path / META).exists():
        step = resolve_step(path)
        files = json.loads((step / META).read_text())["files"]
        for name in sorted(files):
            if name.endswith(".safetensors") and not name.startswith(("optim-", "rng-")):
                digest.update(f"{name}:{files[name]['sha256']}\n".encode())
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: neither a native checkpoint nor an HF folder with safetensors files")
        for shard in shards:
            digest.update(f"{shard.name}:{sha256_file(shard)}\n".encode())
    return {"path": str(path), "sha256": digest.hexdigest()}


class AdapterCheckpoint:
    """A committed adapter checkpoint (`root` itself, its tracker's step, or `iteration`), its files
    verified against meta.json on open. `.path` and `.meta` serve the runtime's resume."""

    def __init__(self, root: str | Path, *, iteration: int | None = None):
        self.path = resolve_step(root, iteration)
        meta_file = self.path / META
        if not meta_file.exists():
            raise CheckpointError(f"{self.path}: no {META}; an interrupted save is not a checkpoint")
        self.meta = json.loads(meta_file.read_text())
        if "lora" not in self.meta:
            raise LoraError(f"{self.path} is not a LoRA adapter checkpoint (its meta.json has no 'lora' entry)")
        self.spec = LoraSpec.from_json(self.meta["lora"]["spec"])
        self.base = dict(self.meta["lora"]["base"])
        self.cfg = ThinkerConfig.from_hf(self.meta["hf_config"])
        self.tp = int(self.meta.get("tp_size", 1))
        self.pp = int(self.meta.get("pp_size", 1))
        for name, info in self.meta["files"].items():  # adapters, optimizer, RNG, data: all small
            path = self.path / name
            if not path.exists() or sha256_file(path) != info["sha256"]:
                raise CheckpointError(f"{path}: missing, or its sha256 differs from meta.json (corrupt or modified)")

    def verified(self, *names: str) -> list[Path]:
        """The paths of these files (all verified on open; NativeCheckpoint's reading interface)."""
        unknown = [n for n in names if n not in self.meta["files"]]
        if unknown:
            raise CheckpointError(f"{self.path / META} does not list {', '.join(unknown)}")
        return [self.path / n for n in names]

    def lists(self, name: str) -> bool:
        return name in self.meta["files"]

    def params(self) -> Params:
        """Full (unsharded) fp32 adapters, checked against the spec's shapes. A hetero-parallel
        encoder (a smaller TP size in meta.json's layout) is joined from its first replica's files."""
        from omnicore.models.thinker import tp_plans

        plans = tp_plans(self.cfg)
        sizes = self.meta.get("layout", {}).get("tp") or {}
        out = {}
        for stage in range(self.pp):
            files = [SafetensorsFile(self.path / adapter_file(r, stage)) for r in range(self.tp)]
            for n in files[0].keys():
                pieces = [f.read(n) for f in files[: int(sizes.get(tower_of(n), self.tp))]]
                out[n] = unshard_tensors(pieces, adapter_rule(n, plans), n)
        check_shapes({k: v.shape for k, v in out.items()}, adapter_shapes(self.cfg, self.spec), source=str(self.path))
        return out


def check_base(ckpt: AdapterCheckpoint, base: str | Path) -> None:
    """Raise LoraError unless `base` is the checkpoint the adapters were trained on."""
    found = base_fingerprint(base)
    if found["sha256"] != ckpt.base["sha256"]:
        raise LoraError(
            f"the adapters in {ckpt.path} were trained on base {ckpt.base['path']} (sha256 {ckpt.base['sha256'][:16]}...), "
            f"but the base given is {found['path']} (sha256 {found['sha256'][:16]}...): load the base they were trained on"
        )


def load_base(path: str | Path, *, dtype: torch.dtype | None = None) -> tuple[ThinkerConfig, Params]:
    """Full base parameters from an HF folder or a native checkpoint (stored dtypes by default)."""
    path = Path(path)
    if (path / TRACKER).exists() or (path / META).exists():
        ckpt = NativeCheckpoint(path)
        return ckpt.cfg, ckpt.params(dtype)
    return load_hf(path, dtype=dtype)


def peft_module(layer: str) -> str:
    """HF thinker module name of a native layer: `text.layers.0.attn.q` -> `model.layers.0.self_attn.q_proj`."""
    return hf_name(layer + ".weight")[: -len(".weight")]


def write_peft_adapter(folder: str | Path, adapters: Mapping[str, torch.Tensor], spec: LoraSpec, *, base_model: str = "") -> Path:
    """A PEFT LoRA folder for `Qwen2_5OmniThinkerForConditionalGeneration` (`adapters` full, not
    sharded). `target_modules` is a regex matching exactly the adapted modules (with or without
    the full model's `thinker.` prefix), so PEFT attaches adapters nowhere else."""
    folder = Path(folder)
    modules = list(dict.fromkeys(peft_module(layer_of(n)) for n in adapters))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": r"(thinker\.)?(" + "|".join(re.escape(m) for m in modules) + ")",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {f"base_model.model.{peft_module(layer_of(n))}.{n.rsplit('.', 1)[1]}.weight": t.detach().contiguous() for n, t in adapters.items()}
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with SafetensorsWriter(tmp / "adapter_model.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def read_peft_adapter(folder: str | Path, cfg: ThinkerConfig) -> tuple[LoraSpec, Params]:
    """The inverse of `write_peft_adapter` (for folders it wrote): spec and native-named adapters."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    table = {}
    for native in adapter_shapes(cfg, LoraSpec(targets=("all",), r=1, alpha=1, towers=("llm", "vision", "audio"))):
        layer, half = native.rsplit(".", 1)
        table[f"base_model.model.{peft_module(layer)}.{half}.weight"] = native
    unknown = [k for k in f.keys() if k not in table]
    if unknown:
        raise LoraError(f"{folder}: tensors that are not LoRA A / B of a thinker linear layer: {unknown[:5]}")
    params = {table[k]: f.read(k) for k in f.keys()}
    layers = {layer_of(n) for n in params}
    # A spec covering these layers (native names of their linears, their towers); merging uses the
    # adapters present, so a layer the spec would add but the folder lacks changes nothing.
    targets = sorted({layer.rsplit(".", 1)[1] for layer in layers})
    towers = sorted({"llm" if layer.startswith("text.") else layer.split(".", 1)[0] for layer in layers})
    spec = LoraSpec(targets=targets, r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                    rslora=bool(config.get("use_rslora", False)), towers=towers)  # fmt: skip
    return spec, params


def export_merged_hf(base: str | Path, hf_dir: str | Path, adapters: Mapping[str, torch.Tensor], spec: LoraSpec, out_dir: str | Path,
                     *, overwrite: bool = False) -> Path:  # fmt: skip
    """Merge full `adapters` into the base (`base`: HF folder or native checkpoint, in its stored
    dtypes) and write a complete HF Qwen2.5-Omni folder over the original `hf_dir`."""
    cfg, params = load_base(base)
    merged = merge(params, adapters, spec)
    del params
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.merged-native"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
        write_native(staging, cfg, hf_config, Layout(), DictSource(merged))
        return native_to_hf(staging, hf_dir, out_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def adapter_merger(adapters_dir: str | Path, base: str | Path):
    """For `omnicore.chat.load_model(adapters=...)`: a function merging the adapters of
    `adapters_dir` (an omnicore adapter checkpoint, whose recorded base must be `base`, or a PEFT
    folder written for the HF thinker) into the loaded base parameters (merged: inference runs at
    the base model's speed)."""
    adapters_dir = Path(adapters_dir)
    ckpt = None
    if not (adapters_dir / "adapter_config.json").exists():
        ckpt = AdapterCheckpoint(adapters_dir)
        check_base(ckpt, base)

    def apply(params: Params, cfg: ThinkerConfig) -> Params:
        if ckpt is not None:
            if ckpt.cfg != cfg:
                raise LoraError(f"the adapters in {ckpt.path} belong to a model whose config differs from {base}")
            spec, adapters = ckpt.spec, ckpt.params()
        else:
            spec, adapters = read_peft_adapter(adapters_dir, cfg)
        return merge(params, {k: v.to(next(iter(params.values())).device) for k, v in adapters.items()}, spec)

    return apply
