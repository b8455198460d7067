"""SIGKILL during a checkpoint save, of one rank and of all ranks, at instants spread over the whole
save window: no partial checkpoint is ever loaded, every restart resumes from the newest committed
checkpoint, and the run continues bit-identically to the uninterrupted one.

A 4-rank run (TP 2 x PP 2, gloo, CPU) saves every 2 steps. `kill_worker.py` turns every operation
of one save into a numbered event on each rank (files opened, each tensor appended, files fsynced,
the barriers and the gather, and rank 0's data.json / run_config.toml / hf copies, meta.json, the
folder rename and the tracker update); the uninterrupted reference run records them. An instant is
a plan "rank r SIGKILLs itself just before its n-th event E" for the victim ("one rank": rank 1 or
3 while files are written, rank 0 during the commit, which only rank 0 performs) or for every rank
("all ranks": each at the same point of its own part of the save; ranks whose part is over die at
the final barrier). Killing just before an operation is deterministic, whatever the timing.

The instants are chained on one run folder, alternating the two modes: each launch resumes from the
newest checkpoint left by the previous kill and is killed in its next save (step 4 first; then two
steps after the resume point), and a last launch finishes the run. So every launch both checks the
resume after the previous kill and is the next kill; leftovers accumulate (half-written `.tmp-*`
folders, a renamed step folder the tracker does not name yet, whose step is saved over again).

After each kill: every rank died (the victims by SIGKILL, the others failed in a collective, none
hung); the tracker names a checkpoint that verifies (NativeCheckpoint checks every file's sha256)
and is byte-identical to the uninterrupted run's checkpoint of that step; every `iter_*` folder
verifies and is byte-identical too; every folder holding a partial save is refused by the loader.
The next launch resumes ("resume" event) from the tracker's step, which is the newest committed
checkpoint (the previous one, or the killed save's when the kill came after the tracker moved).
Every step's loss and gradient norm, in every launch, is == the uninterrupted run's; the final
parameters are torch.equal. A summary line (with -s) gives the figures.

CI runs 3 instants per mode (the riskiest: mid-file, meta.json written but the folder not renamed
or not in place, folder renamed but tracker not moved or just moved). The full count, 20 instants
per mode spread over the whole window (before the first file, every rank's files, meta.json, the
rename, the tracker update, the final barrier):

    OMNICORE_FULL_FAULTS=1 python -m pytest tests/train/test_kill_during_save.py -p no:cacheprovider -s

(OMNICORE_KILL_INSTANTS=n: n spread instants per mode instead.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from dist_launch import start

from omnicore.checkpoint.commit import META, TRACKER, read_tracker
from omnicore.checkpoint.hf import CheckpointError
from omnicore.checkpoint.native import NativeCheckpoint, load_native

WORLD = 4
# TP 2 x PP 2, saving every 2 steps; a short collective timeout only as a backstop (the survivors of a
# killed peer fail at once: gloo sees its closed sockets)
OVERRIDES = ["--parallel.tp=2", "--parallel.llm_pp_layers=[1,2]", "--data.shuffle=true", "--checkpoint.save_interval=2", "--parallel.timeout_minutes=1"]
FIRST_KILL = 4  # the first killed save (step 2's checkpoint exists by then)
FULL = os.environ.get("OMNICORE_FULL_FAULTS") == "1"
N_SPREAD = int(os.environ.get("OMNICORE_KILL_INSTANTS") or (20 if FULL else 0))  # 0: CI's picked instants
N_PER_MODE = N_SPREAD or 3
ITERS = 2 * 2 * N_PER_MODE + FIRST_KILL + 2  # each kill's save is 2 steps past the last commit: room for every one to commit
LAUNCH_TIMEOUT = 240
SECONDS_PER_LAUNCH = 60  # CI machine: about 30 s per 4-rank launch (mostly imports); doubled


# -- instants -------------------------------------------------------------------------------------


def _occurrences(events: list[str]) -> list[tuple[str, int]]:
    """Each event as (name, n): its n-th occurrence in this rank's save."""
    seen: dict[str, int] = {}
    out = []
    for e in events:
        seen[e] = seen.get(e, 0) + 1
        out.append((e, seen[e]))
    return out


def _phases(trace: dict[int, list[str]]) -> dict[int, dict[str, list]]:
    """Per rank: `pre` (to the first barrier), `files` (its file events), `commit` (between the gather
    and the final barrier: rank 0's commit, nothing on the others), with the named events between."""
    out = {}
    for rank, events in trace.items():
        ev = _occurrences(events)
        b1, g, b2 = ev.index(("barrier", 1)), ev.index(("gather", 1)), ev.index(("barrier", 2))
        out[rank] = {"pre": ev[: b1 + 1], "files": ev[b1 + 1 : g], "commit": ev[g + 1 : b2]}
    return out


def _key_file_events(files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Per file: its creation, a tensor in the middle (a half-written file) and its fsync."""
    keys = []
    for i, (name, n) in enumerate(files):
        keys += [(name, n)] if name.startswith(("open ", "close ")) else []
        if name.startswith("open "):
            writes = [e for e in files[i + 1 :] if e[0].startswith("write " + name[len("open ") :] + " ")]
            keys.append(writes[len(writes) // 2])
    return keys


def _candidates(trace: dict[int, list[str]], mode: str) -> list[tuple[float, list[dict]]]:
    """The instants of one mode along the save window, as phases (weight, [plan, ...]); a plan maps
    rank -> (event, n)."""
    ph = _phases(trace)
    others = [r for r in trace if r != 0]
    if mode == "one":
        files = []
        for victim in (1, 3):
            keys = _key_file_events(ph[victim]["files"])
            files += [((i + 0.5) / len(keys), victim, e) for i, e in enumerate(keys)]
        return [
            (0.10, [{1: ("enter", 1)}, {0: ("stepwriter", 1)}, {3: ("barrier", 1)}]),
            (0.40, [{victim: e} for _, victim, e in sorted(files)]),
            (0.05, [{1: ("gather", 1)}]),
            (0.35, [{0: e} for e in ph[0]["commit"]]),
            (0.10, [{3: ("barrier", 2)}, {1: ("leave", 1)}]),
        ]
    positions = 12
    pre = [{r: ("enter", 1) for r in trace}, {0: ("stepwriter", 1), **{r: ("barrier", 1) for r in others}}, {r: ("barrier", 1) for r in trace}]
    return [
        (0.10, pre),
        (0.40, [{r: ph[r]["files"][int((j + 0.5) / positions * len(ph[r]["files"]))] for r in trace} for j in range(positions)]),
        (0.05, [{r: ("gather", 1) for r in trace}]),
        (0.35, [{0: e, **{r: ("barrier", 2) for r in others}} for e in ph[0]["commit"]]),
        (0.10, [{r: ("barrier", 2) for r in trace}, {r: ("leave", 1) for r in trace}]),
    ]


def _spread(phases: list[tuple[float, list]], n: int) -> list[dict]:
    """n instants at evenly spaced points of the window, each phase taking its weight's share."""
    picked = []
    for i in range(n):
        t = (i + 0.5) / n
        for k, (weight, plans) in enumerate(phases):
            if t < weight or k == len(phases) - 1:
                picked.append(plans[min(len(plans) - 1, int(t / weight * len(plans)))])
                break
            t -= weight
    return picked


def _ci_picks(trace: dict[int, list[str]], mode: str) -> list[dict]:
    """CI's three per mode: a half-written file; meta.json written but not in place (one) / complete
    folder not renamed (all); folder renamed but the tracker not moved (one) / just moved (all)."""
    others = [r for r in trace if r != 0]
    if mode == "one":
        files = _key_file_events(_phases(trace)[1]["files"])
        mid = next(e for e in files if e[0].startswith("write ") and "text-" in e[0])
        return [{1: mid}, {0: ("replace meta.json", 1)}, {0: ("replace latest_checkpointed_iteration.txt", 1)}]
    ph = _phases(trace)
    mid = {r: ph[r]["files"][len(ph[r]["files"]) // 2] for r in trace}
    return [mid, {0: ("rename .tmp-STEP STEP", 1), **{r: ("barrier", 2) for r in others}},
            {0: ("fsync-dir run", 2), **{r: ("barrier", 2) for r in others}}]  # fmt: skip


def _instants(trace: dict[int, list[str]]) -> list[tuple[str, dict]]:
    """Both modes' instants, alternating."""
    per_mode = {m: (_spread(_candidates(trace, m), N_SPREAD) if N_SPREAD else _ci_picks(trace, m)) for m in ("one", "all")}
    return [(m, per_mode[m][i]) for i in range(N_PER_MODE) for m in ("one", "all")]


# -- runs ------------------------------------------------------------------------------------------


def _job(hf: Path, base: Path, kill: dict) -> list[str]:
    job = {"hf": str(hf), "base": str(base), "iters": ITERS, "overrides": OVERRIDES, "kill": kill}
    return ["tests/train/kill_worker.py", json.dumps(job)]


def _run(args: list[str], logs: Path) -> tuple[list[int | None], str]:
    """Start the ranks, wait (at most LAUNCH_TIMEOUT), kill any still running; (exit codes, None for
    a rank that had to be killed; the logs' tails)."""
    procs = start(WORLD, args, logs)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    codes = []
    for p, out in procs:
        codes.append(p.poll())
        if p.poll() is None:
            p.kill()
        p.wait()
        out.close()
    tails = "\n".join(f"--- rank {r}\n" + (logs / f"rank{r}.log").read_text()[-2500:] for r in range(WORLD))
    return codes, tails


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _step_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r and "step" in r and "event" not in r]


def _check_steps(records: list[dict], reference: dict[int, dict], what: str) -> None:
    for r in _step_records(records):
        want = reference[r["step"]]
        assert (r["loss"], r["grad_norm"]) == (want["loss"], want["grad_norm"]), (
            f"{what}: step {r['step']} loss / grad_norm {r['loss']!r} / {r['grad_norm']!r}, uninterrupted {want['loss']!r} / {want['grad_norm']!r}")


@pytest.fixture(scope="module")
def reference(tiny_hf, tmp_path_factory):
    """The uninterrupted run (ITERS steps, a checkpoint every 2), with step 4's save traced."""
    base = tmp_path_factory.mktemp("uninterrupted")
    codes, tails = _run(_job(tiny_hf, base, {"step": FIRST_KILL, "trace": True}), base / "logs")
    assert codes == [0] * WORLD, tails
    run_dir = base / "run"
    steps = {r["step"]: r for r in _step_records(_records(run_dir))}
    assert sorted(steps) == list(range(1, ITERS + 1))
    trace = {r: json.loads((base / f"events-{r}.json").read_text()) for r in range(WORLD)}
    return {"run": run_dir, "steps": steps, "trace": trace}


def _files(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / f"iter_{step:07d}" / META).read_text())["files"]


def _scan(run_dir: Path, ref_run: Path) -> dict:
    """Every step folder after a kill: those the loader accepts must be byte-identical to the
    uninterrupted run's checkpoint of their step; the others must be refused."""
    found = {"complete": [], "refused": [], "partial_loadable": [], "broken_iter": []}
    for p in sorted(run_dir.iterdir()):
        if not p.is_dir() or not p.name.startswith(("iter_", ".tmp-", ".old-")):
            continue
        try:
            ck = NativeCheckpoint(p, verify="all")
        except CheckpointError as err:
            # A renamed iter_* folder is only ever a complete one (meta.json is written before the rename).
            found["broken_iter" if p.name.startswith("iter_") else "refused"].append(f"{p.name}: {err}")
            continue
        if ck.meta["files"] != _files(ref_run, int(ck.meta["iteration"])):
            found["partial_loadable"].append(p.name)
        elif p.name.startswith("iter_"):
            found["complete"].append(int(ck.meta["iteration"]))
    return found


@pytest.mark.slow
@pytest.mark.timeout(SECONDS_PER_LAUNCH * (2 * N_PER_MODE + 2) + 60)  # launches: the reference, 2 x N kills, the last
def test_kill_during_save_never_loads_a_partial_checkpoint_and_resumes_exactly(reference, tiny_hf, tmp_path):
    instants = _instants(reference["trace"])
    ref_run, ref_steps = reference["run"], reference["steps"]
    base = tmp_path / "job"
    run_dir = base / "run"
    tracker, lines = None, 0
    outcomes = []  # (mode, plan, killed save's step, tracker after the kill, resumed step)
    partial_loads, partial_left, untracked_complete = 0, 0, 0
    for i, (mode, plan) in enumerate(instants):
        kill_step = FIRST_KILL if tracker is None else int(tracker) + 2
        what = f"instant {i} ({mode}: {plan}) in the save of step {kill_step}"
        codes, tails = _run(_job(tiny_hf, base, {"step": kill_step, "at": {str(r): list(e) for r, e in plan.items()}}), tmp_path / f"logs{i}")
        assert None not in codes, f"{what}: ranks {[r for r, c in enumerate(codes) if c is None]} hung\n{tails}"
        assert all(codes[r] == -9 for r in plan), f"{what}: the victims did not die at their instant: exit codes {codes}\n{tails}"
        assert all(c != 0 for c in codes), f"{what}: a rank finished the run: exit codes {codes}\n{tails}"
        records = _records(run_dir)
        launch_records, lines = records[lines:], len(records)
        if tracker is not None:  # the killed launch itself resumed from the previous kill's checkpoint
            resumes = [r for r in launch_records if r.get("event") == "resume"]
            assert [(r["step"], Path(r["path"]).name, r["inexact"]) for r in resumes] == [(int(tracker), f"iter_{int(tracker):07d}", [])], what
            outcomes[-1][-1] = resumes[0]["step"]
        assert [r["step"] for r in _step_records(launch_records)] == list(range((int(tracker) if tracker else 0) + 1, kill_step + 1)), what
        _check_steps(launch_records, ref_steps, what)

        # (a) nothing partial is loadable; the tracker names the newest committed checkpoint, complete
        found = _scan(run_dir, ref_run)
        partial_loads += len(found["partial_loadable"]) + len(found["broken_iter"])
        assert not found["partial_loadable"] and not found["broken_iter"], f"{what}: {found}"
        partial_left += any(name.startswith(f".tmp-iter_{kill_step:07d}:") for name in found["refused"])
        tracker = read_tracker(run_dir)
        assert tracker in (str(kill_step - 2), str(kill_step)), f"{what}: tracker {tracker!r}"
        loaded = NativeCheckpoint(run_dir, verify="all")  # what a resume opens, every file checked
        assert loaded.meta["iteration"] == int(tracker) and loaded.meta["files"] == _files(ref_run, int(tracker)), what
        untracked_complete += max(found["complete"]) > int(tracker)
        outcomes.append([mode, plan, kill_step, int(tracker), None])

    # the last launch finishes the run
    codes, tails = _run(_job(tiny_hf, base, {"step": -1}), tmp_path / "logs-final")
    assert codes == [0] * WORLD, tails
    launch_records = _records(run_dir)[lines:]
    resumes = [r for r in launch_records if r.get("event") == "resume"]
    assert [(r["step"], r["inexact"]) for r in resumes] == [(int(tracker), [])]
    outcomes[-1][-1] = resumes[0]["step"]
    assert [r["step"] for r in _step_records(launch_records)] == list(range(int(tracker) + 1, ITERS + 1))
    _check_steps(launch_records, ref_steps, "the last launch")
    assert read_tracker(run_dir) == str(ITERS)
    final, want = load_native(run_dir)[1], load_native(ref_run)[1]
    assert final.keys() == want.keys()
    assert not [k for k in want if not torch.equal(final[k], want[k])], "final parameters differ from the uninterrupted run's"
    found = _scan(run_dir, ref_run)  # every checkpoint of the run, including those saved over, equals the uninterrupted run's
    assert not found["partial_loadable"] and not found["broken_iter"] and sorted(found["complete"]) == list(range(2, ITERS + 1, 2)), found

    resumed_ok = sum(o[4] == o[3] for o in outcomes)
    assert resumed_ok == len(outcomes) and partial_loads == 0
    lines_out = [(f"kill during save: {len(outcomes)} instants ({N_PER_MODE} per mode), partial loads {partial_loads}, "
                  f"correct resumes {resumed_ok}/{len(outcomes)}, losses and final parameters bit-identical")]  # fmt: skip
    for mode in ("one", "all"):
        mine = [o for o in outcomes if o[0] == mode]
        committed = sum(o[3] == o[2] for o in mine)
        lines_out.append(f"  {mode} rank(s): {len(mine)} kills, resumed from the previous checkpoint {len(mine) - committed}, "
                         f"from the killed save's {committed}")  # fmt: skip
    lines_out.append(f"  kills leaving a half-written .tmp folder: {partial_left}; leaving a complete step folder the tracker "
                     f"did not name yet (resumed from the previous one, saved over): {untracked_complete}")  # fmt: skip
    lines_out += [f"    {o[0]:3} step {o[2]:2} {o[1]} -> resumed from {o[4]}" for o in outcomes]
    print("\n" + "\n".join(lines_out))
    leftovers = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") or p.name.startswith(TRACKER + "."))
    print(f"  leftovers in the run folder after the last launch: {leftovers}")
