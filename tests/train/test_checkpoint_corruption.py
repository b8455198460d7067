"""Corrupt checkpoints are found when loaded, naming the file: a byte flipped in any file of a
training checkpoint (weights, optimizer, RNG, data position, run config, the copied HF files, and
meta.json itself), a truncated file, a deleted meta.json. Every file of the step is flipped (the
issue asks for 10 random files; all of them is stricter), at a seeded random offset. A default open
checks each file's sha256 when its bytes are first used, so the damage is found by whatever reads the
file (and only then: a weights-only load never hashes the optimizer state); verify="all" finds it on
open."""

from __future__ import annotations

import random
import shutil

import pytest
from small_run import small_run

from omnicore.checkpoint.hf import CheckpointError
from omnicore.checkpoint.native import NativeCheckpoint
from omnicore_dist.checkpointing import load_resume
from omnicore_dist.mesh import Mesh

MESH = Mesh(world=1, rank=0, dp=1, pp=1, tp=1)


@pytest.fixture(scope="module")
def step_folder(tiny_hf, samples, tmp_path_factory):
    base = tmp_path_factory.mktemp("corrupt")
    small_run(base, tiny_hf, 1, samples)
    return base / "run"


def _files(run_dir):
    step = run_dir / "iter_0000001"
    return sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())


def _damaged(run_dir, tmp_path, name, damage):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    damage(copy / "iter_0000001" / name)
    return copy


def _flip(path, rng=None):
    data = bytearray(path.read_bytes())
    i = (rng or random.Random(str(path.name))).randrange(len(data))
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_checkpoint_has_the_files_the_test_flips(step_folder):
    names = _files(step_folder)
    for expected in ("meta.json", "data.json", "run_config.toml", "optim-tp00-pp00.safetensors", "rng-tp00-pp00-dp00.safetensors",
                     "text-tp00-pp00.safetensors", "hf/config.json"):  # fmt: skip
        assert expected in names, names


def _weights(root):
    return NativeCheckpoint(root).params()


def _training_state(root):
    return load_resume(NativeCheckpoint(root), MESH, load_optim=True, load_rng=True)


def _side_files(root):
    return NativeCheckpoint(root).hf_files()


def _everything(root):
    ckpt = NativeCheckpoint(root)
    return ckpt.params(), load_resume(ckpt, MESH, load_optim=True, load_rng=True), ckpt.hf_files()


def _reader(name: str):
    """What reads this file of the step (the run config is a record for people: only verify="all")."""
    if name.startswith(("text-", "vision-", "audio-")):
        return _weights
    if name.startswith(("optim-", "rng-")) or name == "data.json":
        return _training_state
    if name.startswith("hf/"):
        return _side_files
    return _everything if name == "meta.json" else None


def test_a_flipped_byte_in_any_file_is_found_naming_the_file(step_folder, tmp_path):
    missed = []
    for k, name in enumerate(_files(step_folder)):
        damaged = _damaged(step_folder, tmp_path / str(k), name, _flip)
        reader = _reader(name)
        checks = [("verify='all'", lambda: NativeCheckpoint(damaged, verify="all"))] + ([(reader.__name__, lambda: reader(damaged))] if reader else [])
        for what, check in checks:
            try:
                check()
                missed.append(f"{name}: {what} loaded")
            except CheckpointError as err:
                if name.split("/")[-1] not in str(err):
                    missed.append(f"{name}: {what}: {err}")
    assert not missed


def test_a_weights_only_load_never_hashes_the_training_state(step_folder, tmp_path, monkeypatch):
    import omnicore.checkpoint.native as native

    hashed = []
    real = native.sha256_file
    monkeypatch.setattr(native, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    damaged = _damaged(step_folder, tmp_path, "optim-tp00-pp00.safetensors", _flip)
    ckpt = NativeCheckpoint(damaged)
    assert ckpt.params() and hashed and all(n.startswith(("text-", "vision-", "audio-")) for n in hashed), hashed
    count = len(hashed)
    ckpt.params()
    assert len(hashed) == count  # each file once
    with pytest.raises(CheckpointError, match="optim-tp00-pp00.safetensors: sha256 does not match"):
        load_resume(ckpt, MESH, load_optim=True, load_rng=True)


def test_a_flipped_tracker_is_found(step_folder, tmp_path):
    damaged = tmp_path / "run"
    shutil.copytree(step_folder, damaged)
    _flip(damaged / "latest_checkpointed_iteration.txt")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration.txt names iteration 0, but iter_0000000 does not exist.*iter_0000001"):
        NativeCheckpoint(damaged).params()


def test_a_truncated_file_and_a_missing_meta_are_found(step_folder, tmp_path):
    def truncate(path):
        path.write_bytes(path.read_bytes()[:-7])

    damaged = _damaged(step_folder, tmp_path / "t", "optim-tp00-pp00.safetensors", truncate)
    with pytest.raises(CheckpointError, match="optim-tp00-pp00.safetensors"):
        NativeCheckpoint(damaged)  # sizes are checked on open, for every file
    damaged = _damaged(step_folder, tmp_path / "m", "meta.json", lambda p: p.unlink())
    with pytest.raises(CheckpointError, match="meta.json"):
        NativeCheckpoint(damaged)


def test_a_rank_the_save_lacked_misses_its_rng_state_only_when_steps_draw_random_numbers(step_folder):
    new_rank = Mesh(world=2, rank=1, dp=2, pp=1, tp=1)  # DP rank 1: the one-process save has no RNG file for it
    ckpt = NativeCheckpoint(step_folder)
    assert load_resume(ckpt, MESH, load_optim=True, load_rng=True).rng is not None
    with_dropout = load_resume(ckpt, new_rank, load_optim=True, load_rng=True)
    assert with_dropout.rng is None and with_dropout.inexact == ("rng (no state for tensor / pipeline / data-parallel rank 0 / 0 / 1)",)
    without = load_resume(ckpt, new_rank, load_optim=True, load_rng=True, draws_random=False)
    assert without.rng is None and without.inexact == ()
