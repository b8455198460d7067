"""Loading one TP rank's pieces: from a native checkpoint of any saved layout and from an HF folder,
bit-identical to cutting the full tensors (omnicore_dist.tp.shard_for_rank), and under the saved
TP sizes reading only the rank's own files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from omnicore.checkpoint.hf import CheckpointError, load_hf, params_to_hf
from omnicore.checkpoint.native import DictSource, NativeCheckpoint, write_native
from omnicore.checkpoint.pieces import RankPieces
from omnicore.checkpoint.safetensors_io import SafetensorsFile
from omnicore.config import TINY
from omnicore.layout import Layout
from omnicore.models.thinker import init_thinker
from omnicore_dist.tp import shard_for_rank, tower_sizes

SAVED = {"tp1": Layout(), "tp2": Layout(tp=2), "tp4_vit1_audio2": Layout(tp=4, vit_tp=1, audio_tp=2)}
# (LLM TP size, hetero encoder sizes); TINY's vision encoder has 2 heads, so at most TP 2
WANTED = {"tp1": (1, None), "tp2": (2, None), "tp4_encoders2": (4, {"vision": 2, "audio": 2}), "tp4_vit1_audio2": (4, {"vision": 1, "audio": 2}), "tp2_encoders1": (2, {"vision": 1, "audio": 1})}


@pytest.fixture(scope="module")
def full():
    return init_thinker(TINY, seed=4)


@pytest.fixture(scope="module")
def saved(full, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for name, layout in SAVED.items():
        write_native(root / name, TINY, TINY.to_hf(), layout, DictSource(full))
    return root


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        assert got[k].is_contiguous(), k


@pytest.mark.parametrize("wanted", WANTED)
@pytest.mark.parametrize("layout", SAVED)
def test_native_pieces_equal_cutting_the_full_tensors(full, saved, layout, wanted):
    size, tower_tp = WANTED[wanted]
    ckpt = NativeCheckpoint(saved / layout)
    for rank in range(size):
        pieces = RankPieces.of_model(TINY, rank, tower_sizes(size, tower_tp))
        _assert_same(ckpt.params(pieces=pieces), shard_for_rank(TINY, full, rank, size, tower_tp))
    bf16 = ckpt.params(torch.bfloat16, keep=lambda n: n.startswith("text.layers.1."), pieces=pieces)
    want = {k: v.to(torch.bfloat16) for k, v in shard_for_rank(TINY, full, size - 1, size, tower_tp).items() if k.startswith("text.layers.1.")}
    _assert_same(bf16, want)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_rank_reads_only_the_saved_pieces_holding_its_own(full, tmp_path):
    """Every file of saved TP rank 1 is damaged (same size, other bytes). Rank 0 still loads under the
    saved sizes and under finer ones (its pieces lie inside saved piece 0), since it never reads
    them; rank 1, or a rank wanting whole tensors, is stopped naming the file."""
    write_native(tmp_path, TINY, TINY.to_hf(), Layout(tp=2), DictSource(full))
    step = NativeCheckpoint(tmp_path).path
    for f in step.glob("*-tp01-*.safetensors"):
        _flip_a_byte(f)
    finer = {"vision": 2, "audio": 2}
    for size, tower_tp in ((2, None), (4, finer)):
        pieces = RankPieces.of_model(TINY, 0, tower_sizes(size, tower_tp))
        _assert_same(NativeCheckpoint(tmp_path).params(pieces=pieces), shard_for_rank(TINY, full, 0, size, tower_tp))
    for rank, size in ((1, 2), (0, 1)):
        with pytest.raises(CheckpointError, match=r"tp01-pp00\.safetensors: sha256 does not match"):
            NativeCheckpoint(tmp_path).params(pieces=RankPieces.of_model(TINY, rank, tower_sizes(size, None)))


@pytest.mark.parametrize("wanted", ["tp2", "tp4_vit1_audio2"])
def test_hf_folder_pieces_equal_cutting_the_full_tensors(full, tmp_path, wanted):
    save_file(params_to_hf(full), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    size, tower_tp = WANTED[wanted]
    for rank in range(size):
        _, got = load_hf(tmp_path, pieces=RankPieces.of_model(TINY, rank, tower_sizes(size, tower_tp)))
        _assert_same(got, shard_for_rank(TINY, full, rank, size, tower_tp))


def test_a_piece_along_dim_0_reads_only_its_rows(tmp_path, monkeypatch):
    t = torch.arange(48.0).view(6, 8)
    save_file({"w": t}, tmp_path / "one.safetensors")
    f = SafetensorsFile(tmp_path / "one.safetensors")
    assert torch.equal(f.read_span("w", 1, 2, 6), t[:, 2:6]) and f.read_span("w", 1, 2, 6).is_contiguous()
    monkeypatch.setattr(SafetensorsFile, "read", lambda *a: pytest.fail("a dim-0 piece read the whole tensor"))
    assert torch.equal(f.read_span("w", 0, 2, 4), t[2:4])
