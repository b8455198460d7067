"""Conversions between HF folders and native checkpoints, streaming tensor by tensor.

- `hf_to_native`: an HF Qwen2.5-Omni folder (full model or thinker-only) -> a native `release`
  checkpoint under any TP / PP layout; tokenizer, processor and config files travel along.
- `native_to_hf`: a native checkpoint (any layout; a release or a training save) overlaid on the
  original HF folder: thinker tensors replaced, talker / token2wav tensors copied byte for byte,
  shard files and `model.safetensors.index.json` laid out like the original, every other file
  (configs, tokenizer, `spk_dict.pt`, never unpickled) copied byte for byte; original dtypes by default.
- `reshard`: native -> native under a new layout, without HF in between.
All writes follow the commit protocol: nothing that looks like a checkpoint appears until it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from omnicore.checkpoint.commit import META, TRACKER, fsync_dir
from omnicore.checkpoint.hf import CheckpointError, SafetensorsFolder, map_thinker_keys
from omnicore.checkpoint.native import NativeCheckpoint, write_native
from omnicore.checkpoint.safetensors_io import SafetensorsWriter
from omnicore.config import load_config
from omnicore.layout import Layout

__all__ = ["HFSource", "hf_to_native", "native_to_hf", "reshard", "side_files", "export_nbytes", "DTYPE_CHOICES"]

DTYPE_CHOICES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

Progress = Callable[[int, int], None]


class HFSource:
    """Thinker tensors of an HF folder by native name (read lazily, one at a time)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.cfg = load_config(self.folder)
        self.store = SafetensorsFolder(self.folder)
        self.keys = {native: hf for hf, native in map_thinker_keys(self.store.keys(), self.store.shape, self.cfg, str(self.folder)).items()}

    def dtype(self, name: str) -> torch.dtype:
        key = self.keys[name]
        return self.store.file(key).tensors[key].dtype

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        key = self.keys[name]
        return self.store.get(key) if out is None else self.store.file(key).read_into(key, out)

    def nbytes(self) -> int:
        return sum(self.store.file(k).tensors[k].nbytes for k in self.keys.values())


def side_files(folder: Path) -> dict[str, Path]:
    """Top-level non-weight files of an HF folder (configs, tokenizer, processor, chat template)."""
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name != SafetensorsFolder.INDEX
    }


def _holds_native_checkpoint(root: Path) -> bool:
    return root.is_dir() and ((root / TRACKER).exists() or any((p / META).exists() for p in root.iterdir() if p.is_dir()))


def _refuse_existing(what: bool, out: Path, overwrite: bool) -> None:
    if what and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint; pass --overwrite to replace it")


def hf_to_native(
    hf_dir: str | Path,
    out_dir: str | Path,
    layout: Layout,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Convert an HF folder into `out_dir/release` under `layout`; returns the step folder."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    source = HFSource(hf_dir)
    _refuse_existing(_holds_native_checkpoint(out_dir), out_dir, overwrite)
    return write_native(
        out_dir,
        source.cfg,
        json.loads((hf_dir / "config.json").read_text()),
        layout,
        source,
        dtype=dtype,
        copy_files=side_files(hf_dir),
        meta={"kind": "release", "source": {"hf_dir": str(hf_dir.resolve())}, "lacks": ["optimizer", "rng", "data_position"]},
        overwrite=overwrite,
        progress=progress,
    )


def reshard(
    native_dir: str | Path,
    out_dir: str | Path,
    layout: Layout,
    *,
    iteration: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write the weights of a native checkpoint under a new layout as `out_dir/release`."""
    ckpt = NativeCheckpoint(native_dir, iteration=iteration)
    out_dir = Path(out_dir)
    _refuse_existing(_holds_native_checkpoint(out_dir), out_dir, overwrite)
    return write_native(
        out_dir,
        ckpt.cfg,
        ckpt.meta["hf_config"],
        layout,
        ckpt,
        copy_files=ckpt.hf_files(),
        meta={"kind": "release", "source": {"native_dir": str(ckpt.path.resolve())}, "lacks": ["optimizer", "rng", "data_position"]},
        overwrite=overwrite,
        progress=progress,
    )


def native_to_hf(
    native_dir: str | Path,
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    iteration: int | None = None,
    dtype: str = "original",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Overlay a native checkpoint's thinker on the original HF folder `hf_dir`, written to `out_dir`."""
    if dtype != "original" and dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be original, {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    ckpt = NativeCheckpoint(native_dir, iteration=iteration)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    original = HFSource(hf_dir)
    if original.cfg != ckpt.cfg:
        raise CheckpointError(f"{ckpt.path} was made from a model whose config differs from {hf_dir / 'config.json'}")
    _refuse_existing(out_dir.exists() and (any(out_dir.glob("*.safetensors")) or (out_dir / "config.json").exists()), out_dir, overwrite)
    thinker = {hf: native for native, hf in original.keys.items()}
    target = None if dtype == "original" else DTYPE_CHOICES[dtype]
    tmp = out_dir.parent / f".{out_dir.name}.tmp"  # a leftover of an interrupted export is discarded
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        total = 0
        for shard in original.store.shards():
            total += _write_shard(tmp / shard.name, original.store, shard, thinker, ckpt, target, progress)
        if original.store.index is not None:
            index = {**original.store.index, "metadata": {**original.store.index.get("metadata", {}), "total_size": total}}
            (tmp / SafetensorsFolder.INDEX).write_text(json.dumps(index, indent=2))
        _copy_tree_except_weights(hf_dir, tmp)
        _fsync_tree(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_nbytes(hf_dir: str | Path, dtype: str = "original") -> int:
    """Tensor bytes `native_to_hf` will write over the original folder `hf_dir` (for progress)."""
    original = HFSource(hf_dir)
    thinker = set(original.keys.values())
    total = 0
    for name in original.store.keys():
        info = original.store.file(name).tensors[name]
        if name in thinker and dtype != "original":
            total += info.nbytes // torch.empty((), dtype=info.dtype).element_size() * torch.empty((), dtype=DTYPE_CHOICES[dtype]).element_size()
        else:
            total += info.nbytes
    return total


def _write_shard(path: Path, store: SafetensorsFolder, shard: Path, thinker: dict[str, str], ckpt: NativeCheckpoint, target, progress) -> int:
    """One output shard with the original's tensors in the original order; returns its tensor bytes."""
    source = store.open_file(shard)
    names = sorted(source.tensors, key=lambda n: source.tensors[n].begin)
    entries = {
        n: ((target or source.tensors[n].dtype) if n in thinker else source.tensors[n].dtype, source.tensors[n].shape) for n in names
    }
    writer = SafetensorsWriter(path, entries, source.metadata, hash=False)  # HF folders carry no checksums
    data = 0
    try:
        for n in names:
            dtype, shape = entries[n]
            writer.write(n, ckpt.chunks(thinker[n], dtype) if n in thinker else source.raw_chunks(n))
            nbytes = torch.empty((), dtype=dtype).element_size() * int(torch.Size(shape).numel())
            data += nbytes
            if progress:
                progress(nbytes, 1)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return data


def _copy_tree_except_weights(src: Path, dst: Path) -> None:
    """Every file but the safetensors shards and their index, byte for byte (spk_dict.pt included)."""
    for p in sorted(src.iterdir()):
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        elif not (p.name.endswith(".safetensors") or p.name == SafetensorsFolder.INDEX):
            shutil.copyfile(p, dst / p.name)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)

