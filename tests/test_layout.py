"""Layouts as data: TP plans cover every parameter once, shards are right (not merely self-inverse),
the TP math on shards reproduces the unsharded layers, and pipeline plans follow DESIGN.md section 5."""

from __future__ import annotations

import re

import pytest
import torch
from tp_emulation import run_tp

from omnicore.config import TINY, load_config
from omnicore.layout import (
    Layout,
    LayoutError,
    Split,
    check_plan,
    parse_layer_list,
    rule_for,
    shard,
    shard_tensor,
    stage_of,
    stage_plan,
    tower_of,
    unshard,
)
from omnicore.models.audio import audio_block, audio_layout
from omnicore.models.text import mrope_tables, text_block
from omnicore.models.thinker import init_thinker, param_shapes, tower_depths, tp_plans
from omnicore.models.vision import vision_block, vision_layout
from omnicore.ops import CPU, Segments
from omnicore.params import select
from test_config import PUBLISHED

CONFIGS = {"tiny": TINY, "7b": load_config(PUBLISHED["7b"][0]), "3b": load_config(PUBLISHED["3b"][0])}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_parameter_matches_exactly_one_rule(name):
    cfg = CONFIGS[name]
    plans = tp_plans(cfg)
    for param in param_shapes(cfg):
        matches = [p for p, _ in plans[tower_of(param)] if re.fullmatch(p, param)]
        assert len(matches) == 1, (param, matches)
    for tower, plan in plans.items():  # no dead rule
        for pattern, _ in plan:
            assert any(re.fullmatch(pattern, p) for p in param_shapes(cfg) if tower_of(p) == tower), pattern


@pytest.mark.parametrize("size", [1, 2, 4])
def test_shard_then_unshard_is_identity(size):
    params = init_thinker(TINY, seed=0)
    plans = tp_plans(TINY)
    for tower in ("text", "vision", "audio") if size <= 2 else ("text",):  # TINY encoders have 2 heads
        sub = {k: v for k, v in params.items() if tower_of(k) == tower}
        pieces = [shard(sub, plans[tower], r, size) for r in range(size)]
        back = unshard(pieces, plans[tower])
        assert all(torch.equal(back[k], sub[k]) for k in sub)


def test_shards_hold_the_expected_heads_rows_and_columns():
    """TINY text: 4 query heads, 2 kv heads, head_dim 16; at TP 4 each kv head sits on 2 ranks."""
    p = init_thinker(TINY, seed=1)
    plan = tp_plans(TINY)["text"]
    d = TINY.text.head_dim
    for rank in range(4):
        local = shard({k: v for k, v in p.items() if tower_of(k) == "text"}, plan, rank, 4)
        q, k, o = (f"text.layers.2.attn.{x}.weight" for x in "qko")
        assert torch.equal(local[q], p[q][rank * d : (rank + 1) * d])
        kv_head = rank // 2
        assert torch.equal(local[k], p[k][kv_head * d : (kv_head + 1) * d])
        assert torch.equal(local[o], p[o][:, rank * d : (rank + 1) * d])
        down = "text.layers.0.mlp.down.weight"
        assert torch.equal(local[down], p[down][:, rank * 32 : (rank + 1) * 32])
        assert torch.equal(local["lm_head.weight"], p["lm_head.weight"][rank * 128 : (rank + 1) * 128])
        assert local["text.norm.weight"] is p["text.norm.weight"]


def test_impossible_tp_sizes_name_the_tensor():
    shapes = {k: v for k, v in param_shapes(TINY).items() if tower_of(k) == "text"}
    with pytest.raises(LayoutError, match="text.embed.weight: 512 vocabulary rows cannot be split evenly over tensor-parallel size 3"):
        check_plan(shapes, tp_plans(TINY)["text"], 3)
    shapes = {k: v for k, v in shapes.items() if k.startswith("text.layers.")}
    with pytest.raises(LayoutError, match="4 query heads cannot be split evenly over tensor-parallel size 3"):
        check_plan(shapes, tp_plans(TINY)["text"], 3)
    with pytest.raises(LayoutError, match="2 kv heads cannot be split over tensor-parallel size 3"):
        shard_tensor(torch.zeros(32, 4), Split(0, 2, "kv heads", replicate_short=True), 0, 3, "k")
    with pytest.raises(KeyError, match="no tensor-parallel rule"):
        rule_for("text.layers.0.attn.qkv.weight", tp_plans(TINY)["text"])


@pytest.mark.parametrize("size", [2, 4])
def test_tp_math_on_shards_reproduces_text_block(size):
    """Column outputs stay local, row outputs are summed (ThreadComm): equal to the unsharded block."""
    params = init_thinker(TINY, seed=2, std=0.2)
    plan = tp_plans(TINY)["text"]
    x = torch.randn(11, TINY.text.hidden, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(11).expand(3, 11)
    rope = mrope_tables(TINY.text, positions, x.dtype)
    seg = Segments.from_lengths([5, 6])
    full = text_block(select(params, "text.layers.1."), TINY.text, x, rope, seg, ops=CPU)

    def rank_fn(rank, comm):
        local = shard({k: v for k, v in params.items() if k.startswith("text.layers.1.")}, plan, rank, size)
        return text_block(select(local, "text.layers.1."), TINY.text, x, rope, seg, ops=CPU, comm=comm)

    for out in run_tp(size, rank_fn):
        assert torch.allclose(out, full, atol=1e-5, rtol=0)


def test_tp_math_on_shards_reproduces_vision_and_audio_blocks():
    params = init_thinker(TINY, seed=3, std=0.2)
    plans = tp_plans(TINY)
    layout = vision_layout(TINY.vision, [(1, 4, 8)])
    xv = torch.randn(32, TINY.vision.hidden, generator=torch.Generator().manual_seed(1))
    full_v = vision_block(select(params, "vision.blocks.0."), TINY.vision, xv, layout, layout.windows, ops=CPU)
    audio = audio_layout(TINY.audio, [250])
    xa = torch.randn(125, TINY.audio.d_model, generator=torch.Generator().manual_seed(2))
    full_a = audio_block(select(params, "audio.layers.1."), TINY.audio, xa, audio.chunks, ops=CPU)

    def rank_fn(rank, comm):
        v = shard({k: w for k, w in params.items() if k.startswith("vision.blocks.0.")}, plans["vision"], rank, 2)
        a = shard({k: w for k, w in params.items() if k.startswith("audio.layers.1.")}, plans["audio"], rank, 2)
        out_v = vision_block(select(v, "vision.blocks.0."), TINY.vision, xv, layout, layout.windows, ops=CPU, comm=comm)
        out_a = audio_block(select(a, "audio.layers.1."), TINY.audio, xa, audio.chunks, ops=CPU, comm=comm)
        return out_v, out_a

    for out_v, out_a in run_tp(2, rank_fn):
        assert torch.allclose(out_v, full_v, atol=1e-5, rtol=0)
        assert torch.allclose(out_a, full_a, atol=1e-5, rtol=0)


def test_vocab_parallel_pieces_reproduce_embedding_and_logits():
    p = init_thinker(TINY, seed=4)
    plan = tp_plans(TINY)["text"]
    ids = torch.tensor([0, 7, 130, 300, 511])
    h = torch.randn(5, TINY.text.hidden)
    emb, logits = [], []
    for rank in range(4):
        e = shard_tensor(p["text.embed.weight"], rule_for("text.embed.weight", plan), rank, 4)
        lo = rank * e.shape[0]
        mine = (ids >= lo) & (ids < lo + e.shape[0])
        emb.append(torch.where(mine[:, None], e[(ids - lo).clamp(0, e.shape[0] - 1)], 0.0))
        logits.append(h @ shard_tensor(p["lm_head.weight"], rule_for("lm_head.weight", plan), rank, 4).T)
    assert torch.equal(sum(emb), p["text.embed.weight"][ids])
    assert torch.allclose(torch.cat(logits, -1), h @ p["lm_head.weight"].T)


SEVEN_B = tower_depths(CONFIGS["7b"])
SEED_LAYOUTS = [
    # (vision, audio, llm, valid?, message)
    ([32, 0, 0, 0], [32, 0, 0, 0], [1, 10, 10, 7], True, None),
    ([30, 2, 0, 0], [32, 0, 0, 0], [0, 11, 10, 7], True, None),  # frozen vision stage 0 only holds encoders
    ([30, 2, 0, 0], [32, 0, 0, 0], [1, 10, 10, 7], False, "vision encoder ends on stage 1 but the LLM starts on stage 0"),
    ([32, 0], [32, 0], [11, 17], True, None),  # the recipe's TP1 PP2
    ([32, 0, 0, 0], [0, 32, 0, 0], [0, 7, 12, 9], True, None),  # an encoder-only first stage
    ([32, 0], [32, 0], [11, 16], False, "sums to 27, but the text tower has 28 layers"),
    ([32, 0, 0], [32, 0], [11, 17], False, "has 3 entries; llm_pp_layers has 2"),
    ([16, 16], [32, 0], [0, 28], True, None),
    ([32, 0, 0], [32, 0, 0], [10, 0, 18], False, r"stage\(s\) \[1\] hold no layer"),
    ([32, 0], [32, 0], [-1, 29], False, "negative layer count"),
]


@pytest.mark.parametrize("vision,audio,llm,valid,message", SEED_LAYOUTS)
def test_seed_layouts(vision, audio, llm, valid, message):
    if not valid:
        with pytest.raises(LayoutError, match=message):
            stage_plan(SEVEN_B, llm, vision, audio)
        return
    stages = stage_plan(SEVEN_B, llm, vision, audio)
    names = param_shapes(CONFIGS["7b"])
    placed = {n: stage_of(n, stages) for n in names}  # every parameter on exactly one stage
    first_llm = next(i for i, n in enumerate(llm) if n)
    last_llm = max(i for i, n in enumerate(llm) if n)
    assert placed["text.embed.weight"] == first_llm
    assert placed["lm_head.weight"] == placed["text.norm.weight"] == last_llm
    assert placed["vision.patch_embed.weight"] == placed["vision.blocks.0.attn.q.weight"]
    assert placed["vision.merger.fc2.bias"] == placed["vision.blocks.31.mlp.down.bias"]
    assert placed["audio.conv1.weight"] == placed["audio.layers.0.attn.q.weight"]
    assert placed["audio.proj.weight"] == placed["audio.layers.31.attn.q.weight"]
    assert [sum(1 for n, s in placed.items() if s == i and n.startswith("text.layers.") and n.endswith("attn.q.weight")) for i in range(len(llm))] == llm


@pytest.mark.parametrize("text", ["[[11,17]]", "[11,17]", "11,17", "11 17", "[11, 17]", " [[11, 17]] "])
def test_recipe_spellings_of_layer_lists(text):
    assert parse_layer_list(text, "--llm-pp-layers") == (11, 17)


def test_layer_list_errors():
    with pytest.raises(LayoutError, match="virtual pipeline size must be 1"):
        parse_layer_list("[[5,6],[7,10]]", "--llm-pp-layers")
    with pytest.raises(LayoutError, match="expected layer counts"):
        parse_layer_list("eleven", "--llm-pp-layers")


def test_layout_json_round_trip_and_defaults():
    layout = Layout(tp=2, vit_tp=1, llm_pp_layers=(1, 2))
    assert layout.tp_sizes() == {"text": 2, "vision": 1, "audio": 2}
    data = layout.to_json(tower_depths(TINY))
    assert data["pp"] == {"llm_pp_layers": [1, 2], "vit_pp_layers": [4, 0], "audio_pp_layers": [2, 0]}
    assert Layout.from_json(data).to_json(tower_depths(TINY)) == data
