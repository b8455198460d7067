"""The one commit protocol for everything omnicore saves (converter and trainer alike).

A step folder (`release/` or `iter_0000100/`) is built in a hidden temporary sibling; every file is
fsynced as it is finished; `meta.json`, listing each file with its size and sha256, is written last;
the folder is renamed into place and the parent fsynced; only then is the tracker
(`latest_checkpointed_iteration.txt`) replaced atomically. A folder without a complete meta.json is
therefore never a checkpoint, and a kill at any instant leaves the previous checkpoint the latest.
Multi-node saves assume a shared file system.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omnicore.checkpoint.safetensors_io import sha256_file

__all__ = ["TRACKER", "META", "step_dirname", "StepWriter", "write_durably", "fsync_dir", "read_tracker", "tidy", "set_aside"]

TRACKER = "latest_checkpointed_iteration.txt"
META = "meta.json"


def step_dirname(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the folder: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_tracker(root: Path) -> str | None:
    """"release" or the iteration number as text, or None when there is no tracker."""
    tracker = root / TRACKER
    return tracker.read_text().strip() if tracker.exists() else None


def set_aside(root: Path, name: str) -> Path:
    """Where an overwritten step folder waits while its replacement is renamed in."""
    return root / f".old-{name}"


def tidy(root: Path) -> None:
    """Finish or discard what an interrupted save left in `root` (one writer per root at a time).

    A kill between an overwrite's two renames leaves the tracked folder set aside: it is moved back
    (the previous checkpoint stays the latest). Set-aside copies of folders that were replaced, the
    temporary folders of interrupted saves and a tracker's temporary file are deleted."""
    tracked = read_tracker(root)
    tracked_name = "release" if tracked == "release" else step_dirname(int(tracked)) if tracked and tracked.isdigit() else None
    for old in root.glob(".old-*"):
        name = old.name[len(".old-") :]
        if name == tracked_name and not (root / name).exists() and (old / META).exists():
            os.rename(old, root / name)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in root.glob(f".{TRACKER}.tmp-*"):
        tmp.unlink(missing_ok=True)
    fsync_dir(root)


class StepWriter:
    """Build one step folder under `root` and commit it.

        with StepWriter(root, iteration=None, overwrite=False) as step:
            ... write files into step.path, call step.add(name, sha256, nbytes) for each ...
            step.commit(meta)          # meta.json last, rename, tracker
    Leaving the block without `commit` (an exception) removes the temporary folder.
    """

    def __init__(self, root: str | Path, *, iteration: int | None, overwrite: bool = False, update_tracker: bool = True):
        self.root = Path(root)
        self.name = step_dirname(iteration)
        self.iteration = iteration
        self.final = self.root / self.name
        self.update_tracker = update_tracker
        if (self.final / META).exists() and not overwrite:
            raise FileExistsError(f"{self.final} already holds a checkpoint; pass --overwrite to replace it")
        self.root.mkdir(parents=True, exist_ok=True)
        tidy(self.root)  # one writer per root: what interrupted saves left is repaired or discarded first
        self.path = self.root / f".tmp-{self.name}"
        self.path.mkdir()
        self.files: dict[str, dict[str, object]] = {}
        self.committed = False

    def add(self, name: str, sha256: str, nbytes: int) -> None:
        self.files[name] = {"sha256": sha256, "bytes": nbytes}

    def add_file(self, name: str) -> None:
        """fsync a file already written into the step folder and record its size and sha256."""
        target = self.path / name
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
        self.add(name, sha256_file(target), target.stat().st_size)

    def write_text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)
        self.add_file(name)

    def copy_in(self, source: Path, name: str) -> None:
        """Copy a file byte for byte (never parsed) into the step folder and record it."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        self.add_file(name)

    def commit(self, meta: dict) -> Path:
        meta = {**meta, "iteration": self.iteration, "files": dict(sorted(self.files.items()))}
        write_durably(self.path / META, json.dumps(meta, indent=2))
        fsync_dir(self.path)
        old = None
        if self.final.exists():  # --overwrite: move the old one aside first, delete it after
            old = set_aside(self.root, self.name)
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        fsync_dir(self.root)
        if self.update_tracker:
            write_durably(self.root / TRACKER, self.name if self.iteration is None else str(self.iteration))
        if old is not None:
            shutil.rmtree(old)
        self.committed = True
        return self.final

    def __enter__(self) -> StepWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
