"""The native checkpoint format: one safetensors file per tower, TP rank and pipeline stage.

    <root>/latest_checkpointed_iteration.txt      "release" or the iteration (written last)
    <root>/release/ | iter_0000100/
        meta.json                                   format, HF config, layout, files with sha256
        text-tp00-pp00.safetensors ...              native names, global layer indices
        vision-tp00-pp00.safetensors ...            an encoder with a smaller TP is stored once per
        audio-tp00-pp00.safetensors ...             encoder rank, never copied into every LLM rank
        hf/                                         tokenizer / processor / config files of the source

`file_plan` says which tensors (and which shard of each) every file holds; writer and reader both
follow it, so a file holding anything else is detected. Loading under another layout goes through
the same shard / unshard functions (`NativeCheckpoint.read` gives full tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import attrs
import torch

from omnicore.checkpoint.commit import META, TRACKER, StepWriter, read_tracker, set_aside, step_dirname
from omnicore.checkpoint.hf import CheckpointError
from omnicore.checkpoint.pieces import RankPieces
from omnicore.checkpoint.safetensors_io import CHUNK_BYTES, SafetensorsFile, SafetensorsFormatError, SafetensorsWriter, sha256_file
from omnicore.config import ThinkerConfig
from omnicore.layout import (
    TOWERS,
    Layout,
    LayoutError,
    Split,
    check_plan,
    piece_ranks,
    piece_span,
    rule_for,
    shard_shape,
    shard_tensor,
    stage_of,
    tower_of,
    unshard_tensors,
)
from omnicore.models.thinker import param_shapes, tower_depths, tp_plans
from omnicore.params import Params

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FileSpec",
    "file_plan",
    "TensorSource",
    "DictSource",
    "write_native",
    "write_model_files",
    "write_rank_files",
    "native_meta",
    "NativeCheckpoint",
    "load_native",
    "resolve_step",
]

FORMAT = "omnicore-native"
FORMAT_VERSION = 1


@attrs.frozen
class FileSpec:
    """One native file: which tower / TP rank / stage, and its tensors with their full shapes."""

    name: str
    tower: str
    rank: int
    tp: int
    stage: int
    tensors: tuple[str, ...]


def file_plan(cfg: ThinkerConfig, layout: Layout) -> list[FileSpec]:
    """Every file of a checkpoint under `layout`, validated (LayoutError names the broken rule)."""
    shapes = param_shapes(cfg)
    tp = layout.tp_sizes()
    stages = layout.stages(tower_depths(cfg))
    plans = tp_plans(cfg)
    for tower, setting in zip(TOWERS, ("tp", "vit_tp", "audio_tp")):
        try:
            check_plan({k: v for k, v in shapes.items() if tower_of(k) == tower}, plans[tower], tp[tower])
        except LayoutError as err:
            raise LayoutError(f"{setting} = {tp[tower]}: {err}") from None
    groups: dict[tuple[str, int], list[str]] = {}
    for name in shapes:
        groups.setdefault((tower_of(name), stage_of(name, stages)), []).append(name)
    return [
        FileSpec(name=f"{tower}-tp{rank:02d}-pp{stage:02d}.safetensors", tower=tower, rank=rank, tp=tp[tower], stage=stage, tensors=tuple(names))
        for (tower, stage), names in sorted(groups.items(), key=lambda kv: (TOWERS.index(kv[0][0]), kv[0][1]))
        for rank in range(tp[tower])
    ]


def _rules(cfg: ThinkerConfig) -> Callable[[str], Split | None]:
    plans = tp_plans(cfg)
    return lambda name: rule_for(name, plans[tower_of(name)])


class TensorSource(Protocol):
    """Full (unsharded) tensors by native name; `dtype` must not read the data. `read` may fill
    `out` (contiguous, the tensor's dtype and shape) instead of allocating."""

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor: ...


@attrs.frozen
class DictSource:
    """Tensors already in memory (a trainer's parameters, a test's dict)."""

    params: Mapping[str, torch.Tensor]

    def dtype(self, name: str) -> torch.dtype:
        return self.params[name].dtype

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.params[name]


def write_native(
    root: str | Path,
    cfg: ThinkerConfig,
    hf_config: Mapping,
    layout: Layout,
    source: TensorSource,
    *,
    iteration: int | None = None,
    dtype: torch.dtype | None = None,
    copy_files: Mapping[str, Path] | None = None,
    meta: Mapping | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `source` under `layout` as a checkpoint step with the commit protocol.

    `dtype` None keeps each tensor's stored dtype; `copy_files` (name -> path) are copied byte for
    byte into `hf/`; `progress(bytes, tensors)` is called after each tensor.
    """
    file_plan(cfg, layout)  # validate the layout before anything is created
    with StepWriter(root, iteration=iteration, overwrite=overwrite) as step:
        write_model_files(step, cfg, layout, source, dtype=dtype, progress=progress)
        for name, path in (copy_files or {}).items():
            step.copy_in(path, f"hf/{name}")
        return step.commit(native_meta(cfg, hf_config, layout, meta))


def native_meta(cfg: ThinkerConfig, hf_config: Mapping, layout: Layout, extra: Mapping | None = None) -> dict:
    """meta.json content before the commit adds the iteration and the file list."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hf_config": dict(hf_config),
        "layout": layout.to_json(tower_depths(cfg)),
        **(extra or {}),
    }


def write_model_files(
    step: StepWriter,
    cfg: ThinkerConfig,
    layout: Layout,
    source: TensorSource,
    *,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """The model's safetensors files of `layout` into an open step.

    Files are written group by group ((tower, stage), all TP ranks at once): each tensor is read
    once and its pieces go to every rank's file before the next is read, so memory stays near one
    tensor.
    """
    specs = file_plan(cfg, layout)
    shapes = param_shapes(cfg)
    rule = _rules(cfg)
    # One reusable read buffer for the largest tensor: no allocation, page faults or allocator
    # growth per tensor.
    nbytes = {n: torch.Size(shapes[n]).numel() * _itemsize(source.dtype(n)) for n in shapes}
    scratch = torch.empty(max(nbytes.values()), dtype=torch.uint8)
    for group in _groups(specs):
        names = group[0].tensors
        dtypes = {n: dtype or source.dtype(n) for n in names}
        writers = [
            SafetensorsWriter(
                step.path / spec.name,
                {n: (dtypes[n], shard_shape(shapes[n], rule(n), spec.tp, n)) for n in names},
                {"format": FORMAT},
            )
            for spec in group
        ]
        try:
            for n in names:
                buf = scratch[: nbytes[n]].view(source.dtype(n)).view(shapes[n])
                full = source.read(n, out=buf).to(dtypes[n])
                for spec, writer in zip(group, writers):
                    writer.write(n, shard_tensor(full, rule(n), spec.rank, spec.tp, n))
                if progress:
                    progress(full.numel() * full.element_size(), 1)
                del full
            for spec, writer in zip(group, writers):
                writer.close()
                step.add(spec.name, writer.sha256, writer.nbytes)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise


def write_rank_files(folder: Path, cfg: ThinkerConfig, layout: Layout, local: Mapping[str, torch.Tensor], rank: int,
                     stage: int = 0) -> list[tuple[str, str, int]]:  # fmt: skip
    """The files of TP rank `rank` on pipeline stage `stage` from that rank's own pieces `local` (a
    trainer saving without gathering the model); returns (file name, sha256, bytes) for meta.json."""
    records = []
    for spec in file_plan(cfg, layout):
        if spec.rank != rank or spec.stage != stage:
            continue
        with SafetensorsWriter(folder / spec.name, {n: (local[n].dtype, tuple(local[n].shape)) for n in spec.tensors}, {"format": FORMAT}) as w:
            for n in spec.tensors:
                w.write(n, local[n])
        records.append((spec.name, w.sha256, w.nbytes))
    return records


def _groups(specs: list[FileSpec]) -> list[list[FileSpec]]:
    groups: dict[tuple[str, int], list[FileSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.tower, spec.stage), []).append(spec)
    return list(groups.values())


def resolve_step(root: str | Path, iteration: int | None = None) -> Path:
    """The step folder to load: `root` itself if it is one, else the tracker's (or `iteration`'s)."""
    root = Path(root)
    if (root / META).exists() or root.name == "release" or root.name.startswith("iter_"):
        return root
    if iteration is not None:
        return root / step_dirname(iteration)
    tracked = read_tracker(root)
    if tracked is None:
        raise CheckpointError(f"{root}: no {TRACKER} and no {META}: not a native checkpoint")
    try:
        step = root / ("release" if tracked == "release" else step_dirname(int(tracked)))
    except ValueError:
        raise CheckpointError(f"{root / TRACKER}: expected 'release' or an iteration number, found {tracked!r}") from None
    if not step.exists() and (set_aside(root, step.name) / META).exists():
        return set_aside(root, step.name)  # a kill while that step was being overwritten: it waits aside, whole
    if not step.exists():
        present = sorted(p.name for p in root.glob("iter_*") if (p / META).exists())
        raise CheckpointError(f"{root / TRACKER} names iteration {tracked}, but {step.name} does not exist (a damaged or edited "
                              f"tracker); complete checkpoints here: {', '.join(present) or 'none'}")  # fmt: skip
    return step


_VERIFY = ("used", "all", "none")


class NativeCheckpoint:
    """A committed step folder, checked on open: meta.json, every recorded file's presence and size,
    every weight file's tensor set and shapes against `file_plan`. Reads full tensors (unsharding)
    lazily.

    `verify` says which files' sha256 are checked against meta.json: "used" (default) each file the
    first time its bytes are read (through `read`, `params`, `chunks` or `verified`), so a weights-only
    load never hashes the optimizer state (several times the weights' bytes) and a pipeline stage
    only its own files; "all" every file on open (an integrity check of the whole step); "none" no
    file (tools that only read the layout).
    """

    def __init__(self, root: str | Path, *, iteration: int | None = None, verify: str = "used"):
        if verify not in _VERIFY:
            raise ValueError(f"verify must be one of {_VERIFY}, got {verify!r}")
        self.path = resolve_step(root, iteration)
        meta_file = self.path / META
        if not meta_file.exists():
            raise CheckpointError(f"{self.path}: no {META}; an interrupted save is not a checkpoint")
        try:
            self.meta = json.loads(meta_file.read_text())
            if self.meta.get("format") != FORMAT:
                raise CheckpointError(f"{meta_file}: format {self.meta.get('format')!r} is not {FORMAT!r}")
            if self.meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"{meta_file}: format version {self.meta.get('format_version')} is not supported ({FORMAT_VERSION})")
            self.cfg = ThinkerConfig.from_hf(self.meta["hf_config"])
            self.layout = Layout.from_json(self.meta["layout"])
            self._recorded: Mapping[str, Mapping] = self.meta["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{meta_file}: incomplete or malformed ({err!r})") from None
        self.specs = {s.name: s for s in file_plan(self.cfg, self.layout)}
        self.shapes = param_shapes(self.cfg)
        self._rule = _rules(self.cfg)
        missing = sorted(set(self.specs) - set(self._recorded))
        if missing:
            raise CheckpointError(f"{meta_file}: the layout needs {', '.join(missing)} but meta.json does not list them")
        for name, info in self._recorded.items():
            _check_size(self.path / name, info)
        self._hashed: set[str] = set() if verify != "none" else set(self._recorded)
        if verify == "all":
            self.verified(*self._recorded)
        self.files = {name: self._open(spec) for name, spec in self.specs.items()}
        self._where = {n: [s for s in self.specs.values() if n in s.tensors] for n in param_shapes(self.cfg)}

    def verified(self, *names: str) -> list[Path]:
        """The paths of these files of the step, each checked against meta.json's sha256 unless it
        already was (in parallel: sha256 releases the GIL). A file meta.json does not list is an error."""
        unknown = [n for n in names if n not in self._recorded]
        if unknown:
            raise CheckpointError(f"{self.path / META} does not list {', '.join(unknown)}")
        todo = sorted(set(names) - self._hashed)
        if todo:
            with ThreadPoolExecutor(max(1, min(4, len(todo), os.cpu_count() or 1))) as pool:
                list(pool.map(lambda name: _check_sha256(self.path / name, self._recorded[name]), todo))
            self._hashed.update(todo)
        return [self.path / n for n in names]

    def lists(self, name: str) -> bool:
        """Whether meta.json lists this file (optimizer, RNG and data files exist only in training saves)."""
        return name in self._recorded

    def _open(self, spec: FileSpec) -> SafetensorsFile:
        path = self.path / spec.name
        try:
            f = SafetensorsFile(path)
        except SafetensorsFormatError as err:
            raise CheckpointError(str(err)) from None
        if set(f.keys()) != set(spec.tensors):
            extra, lost = sorted(set(f.keys()) - set(spec.tensors)), sorted(set(spec.tensors) - set(f.keys()))
            raise CheckpointError(f"{path}: tensors differ from the layout (unexpected {extra}, missing {lost})")
        for n in spec.tensors:
            want = shard_shape(self.shapes[n], self._rule(n), spec.tp, n)
            if f.tensors[n].shape != want:
                raise CheckpointError(f"{path}: {n} has shape {f.tensors[n].shape}, the layout needs {want}")
        return f

    def names(self) -> list[str]:
        return list(self._where)

    def dtype(self, name: str) -> torch.dtype:
        return self.files[self._where[name][0].name].tensors[name].dtype

    def nbytes(self) -> int:
        """Bytes of all full (unsharded) tensors."""
        return sum(torch.Size(self.shapes[n]).numel() * _itemsize(self.dtype(n)) for n in self.names())

    def _pieces(self, name: str) -> list[SafetensorsFile]:
        """The files holding `name`, in TP-rank order."""
        return [self.files[s.name] for s in sorted(self._where[name], key=lambda s: s.rank)]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full tensor (TP pieces joined; pieces split along dim 0 are read straight into place)."""
        files = self._pieces(name)
        self.verified(*(f.path.name for f in files))
        split = self._rule(name)
        if split is None:
            return files[0].read(name) if out is None else files[0].read_into(name, out)
        if split.dim == 0:
            ranks = piece_ranks(split, len(files))
            rows = files[0].tensors[name].shape[0]
            shape = (rows * len(ranks), *files[0].tensors[name].shape[1:])
            full = torch.empty(shape, dtype=self.dtype(name)) if out is None else out
            for i, rank in enumerate(ranks):
                files[rank].read_into(name, full[i * rows : (i + 1) * rows])
            return full
        return unshard_tensors([f.read(name) for f in files], split, name)

    def chunks(self, name: str, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """The full tensor as row blocks of about CHUNK_BYTES, in row-major order, read straight
        from the piece files: memory stays at one block whatever the tensor's size."""
        files = self._pieces(name)
        self.verified(*(f.path.name for f in files))
        split = self._rule(name)
        info = files[0].tensors[name]
        if len(info.shape) == 0:
            yield files[0].read(name).to(dtype or info.dtype)
            return
        row = max(1, torch.Size(info.shape[1:]).numel() * _itemsize(info.dtype))
        ranks = piece_ranks(split, len(files))
        if split is not None and split.dim == 1:
            sources, join = [([files[r] for r in ranks], info.shape[0])], True  # blocks join the pieces' columns
        else:
            sources, join = [([files[r]], info.shape[0]) for r in ranks], False
        block = max(1, CHUNK_BYTES // (row * (len(ranks) if join else 1)))
        for group, rows in sources:
            for start in range(0, rows, block):
                parts = [f.read_rows(name, start, min(rows, start + block)) for f in group]
                out = torch.cat(parts, dim=1) if join else parts[0]
                yield out if dtype is None else out.to(dtype)

    def params(self, dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None,
               pieces: RankPieces | None = None) -> Params:  # fmt: skip
        """Full tensors (`keep`: only the names it accepts, e.g. one pipeline stage's), or with
        `pieces` one TP rank's pieces, one tensor at a time: each read (and hashed) from the one saved
        piece holding it where there is one (the rank's own file under the saved TP size), else cut
        from the full tensor."""
        names = [n for n in self.names() if keep is None or keep(n)]
        self.verified(*{s.name for n in names for s in self._sources(n, pieces)})  # all at once, in parallel
        return {n: self._piece(n, pieces).to(dtype or self.dtype(n)) for n in names}

    def _sources(self, name: str, pieces: RankPieces | None) -> list[FileSpec]:
        """The files `name`, or the rank's piece of it, is read from: the one saved piece that holds
        the rank's piece when there is one (always under the saved TP size, a coarser one or whole),
        else every piece."""
        specs = self._where[name]
        if pieces is None:
            return specs
        split, rank, size = pieces.where(name)
        if split is None:
            return specs[:1]
        n = self.shapes[name][split.dim]
        start, stop = piece_span(split, n, rank, size, name)
        holding = [s for s in specs if _contains(piece_span(split, n, s.rank, s.tp, name), (start, stop))]
        return holding[:1] or specs

    def _piece(self, name: str, pieces: RankPieces | None) -> torch.Tensor:
        """The full tensor, or the rank's piece: from the one saved piece holding it (only its bytes
        when it is cut along dim 0), else cut from the full tensor."""
        if pieces is None:
            return self.read(name)
        specs = self._sources(name, pieces)
        if len(specs) > 1:
            return pieces.cut(self.read(name), name)
        f, (split, rank, size) = self.files[specs[0].name], pieces.where(name)
        if split is None:
            return f.read(name)
        n = self.shapes[name][split.dim]
        (start, stop), (offset, end) = piece_span(split, n, rank, size, name), piece_span(split, n, specs[0].rank, specs[0].tp, name)
        if (start, stop) == (offset, end):  # saved at this size: the file holds exactly the piece
            return f.read(name)
        return f.read_span(name, split.dim, start - offset, stop - offset)

    def hf_files(self) -> dict[str, Path]:
        """Tokenizer / processor / config files copied from the HF source, by name (verified)."""
        folder = self.path / "hf"
        found = sorted(folder.iterdir()) if folder.is_dir() else []
        self.verified(*(f"hf/{p.name}" for p in found if self.lists(f"hf/{p.name}")))
        return {p.name: p for p in found}


def _contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_size(path: Path, info: Mapping) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: listed in meta.json but missing")
    if path.stat().st_size != info["bytes"]:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, meta.json records {info['bytes']} (truncated or replaced)")


def _check_sha256(path: Path, info: Mapping) -> None:
    if sha256_file(path) != info["sha256"]:
        raise CheckpointError(f"{path}: sha256 does not match meta.json (the file is corrupt)")


def load_native(root: str | Path, *, iteration: int | None = None, dtype: torch.dtype | None = None) -> tuple[ThinkerConfig, Params]:
    """(config, full params) of a native checkpoint of any layout, in one process."""
    ckpt = NativeCheckpoint(root, iteration=iteration)
    return ckpt.cfg, ckpt.params(dtype)
