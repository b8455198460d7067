"""One rank of a kill-during-save run: `kill_worker.py JOB_JSON`, a train_worker job plus `kill` =
{"step": S, "at": {"<rank>": [EVENT, n], ...}, "trace": bool}.

Every I/O or collective operation of the checkpoint save of step S is an event, named as below
(`STEP` stands for the step folder's name, `iter_0000004`) and met by each rank in an order that
does not depend on the other ranks:

    enter                        save_training is called
    stepwriter                   (main rank) the temporary step folder .tmp-STEP is (re)created
    barrier                      the save's first and last barriers
    open F / write F T / close F a safetensors file is created (header), a tensor appended, fsynced
    gather                       the ranks' file checksums are gathered
    text F / copy F              (main rank) data.json, run_config.toml, the copied hf/ files
    commit, durable F, replace F, fsync-dir D, rename A B   (main rank) the commit protocol
    leave                        save_training has returned on this rank

A rank named in `at` SIGKILLs itself just before the n-th occurrence (1-based) of EVENT, so that
operation never starts: "write F T" leaves F with its header and the tensors before T, "rename
.tmp-STEP STEP" a complete temporary folder, "replace latest_checkpointed_iteration.txt" the renamed
step folder with the tracker still naming the previous step. With `trace`, every rank writes the
events of that save to `events-<rank>.json` in the base folder (to choose the instants from).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import train_worker

from omnicore.checkpoint import commit
from omnicore.checkpoint.safetensors_io import SafetensorsWriter
from omnicore_dist import checkpointing
from omnicore_dist import run as run_module


class _Events:
    def __init__(self, rank: int, kill: dict, base: Path):
        self.rank, self.step, self.trace, self.base = rank, int(kill["step"]), bool(kill.get("trace")), base
        self.at = tuple(kill.get("at", {}).get(str(rank), ("", 0)))
        self.armed = False
        self.seen: list[str] = []

    def __call__(self, what: str) -> None:
        if not self.armed:
            return
        what = re.sub(r"iter_\d{7}", "STEP", what)
        self.seen.append(what)
        if (what, self.seen.count(what)) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def _name(path) -> str:
    return Path(path).name


def install(events: _Events) -> None:
    """Wrap the save's operations so that each one is an event first."""

    def before(owner, attr: str, label):
        real = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            events(label(*args, **kwargs))
            return real(*args, **kwargs)

        setattr(owner, attr, wrapped)

    real_save = run_module.save_training

    def save_training(req, mesh):
        events.armed = req.step == events.step
        events("enter")
        out = real_save(req, mesh)
        events("leave")
        if events.armed and events.trace:
            Path(events.base, f"events-{events.rank}.json").write_text(json.dumps(events.seen))
        events.armed = False
        return out

    run_module.save_training = save_training
    before(checkpointing, "_barrier", lambda mesh: "barrier")
    before(checkpointing, "gather_lists", lambda records, mesh: "gather")
    before(commit.StepWriter, "__init__", lambda self, root, **kw: "stepwriter")
    before(commit.StepWriter, "write_text", lambda self, name, text: f"text {name}")
    before(commit.StepWriter, "copy_in", lambda self, source, name: f"copy {name}")
    before(commit.StepWriter, "commit", lambda self, meta: "commit")
    before(commit, "write_durably", lambda path, text: f"durable {_name(path)}")
    before(commit, "fsync_dir", lambda path: f"fsync-dir {_name(path)}")
    before(SafetensorsWriter, "__init__", lambda self, path, *a, **kw: f"open {_name(path)}")
    before(SafetensorsWriter, "write", lambda self, name, data: f"write {self.path.name} {name}")
    before(SafetensorsWriter, "close", lambda self: f"close {self.path.name}")

    class _Os:  # commit.py's `os`, with its renames as events
        def __getattr__(self, attr):
            return getattr(os, attr)

        def replace(self, src, dst):
            events(f"replace {_name(dst)}")
            return os.replace(src, dst)

        def rename(self, src, dst):
            events(f"rename {_name(src)} {_name(dst)}")
            return os.rename(src, dst)

    commit.os = _Os()


def main(job: dict) -> None:
    install(_Events(int(os.environ["RANK"]), job["kill"], Path(job["base"])))
    train_worker.main(job)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
