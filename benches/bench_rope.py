"""3-D mRoPE across every text layer: tables built once per batch (omnicore) vs transformers' per-layer path.

omnicore builds cos / sin (N, 128) once per batch (`mrope_tables`) and each of the 28 layers calls
`ops.apply_rope` on q (N, 28, 128) and k (N, 4, 128). The baseline, per layer, is transformers
4.52's `Qwen2_5OmniRotaryEmbedding` (angles of the three axes) plus `apply_multimodal_rotary_pos_emb`
(section selection, rotation of q and k in (B, H, T, D)), on the same q / k storage. transformers
itself builds the embedding once per forward and repeats only the selection and rotation per
layer; that variant is timed too and reported ("hf_embedding_once"), not gated.
Shapes: the 7B text config, one row of 1024 tokens (text, a 16 x 24 merged image grid, text) with
its real 3-D positions; and a tiny shape (4 / 2 heads x 16, 64 tokens, 2 layers). fp32 and bf16.
Correctness first: omnicore's q, k equal transformers' (fp32 atol 1e-5; bf16 atol 2e-2 + one ulp).
The gate (benches/thresholds.toml [rope]) applies to the 7B shape.

    python -m pytest benches/bench_rope.py -s -p no:cacheprovider                 # timed gate
    python -m pytest benches/bench_rope.py -s -p no:cacheprovider --bench-quick   # correctness (CI)
"""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from common import CONFIG_7B, alternate, check_close, gate, median, omni_7b, ratio_summary, thresholds, write_record

from omnicore import ops
from omnicore.models.text import mrope_tables

SHAPES = {"7b": dict(tokens=1024, tiny=False), "tiny": dict(tokens=64, tiny=True)}
GATED = ("7b",)


def _text_config(tiny: bool):
    cfg = omni_7b().text
    return attrs.evolve(cfg, hidden=64, n_heads=4, n_kv_heads=2, n_layers=2, mrope_section=(2, 3, 3)) if tiny else cfg


def _hf_path(cfg, tiny: bool):
    """transformers' rotary module and apply function for the same text config."""
    from transformers import Qwen2_5OmniThinkerConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniRotaryEmbedding,
        apply_multimodal_rotary_pos_emb,
    )

    text = Qwen2_5OmniThinkerConfig(**json.loads(CONFIG_7B.read_text())["thinker_config"]).text_config
    if tiny:
        text.hidden_size, text.num_attention_heads, text.num_key_value_heads = cfg.hidden, cfg.n_heads, cfg.n_kv_heads
        text.rope_scaling = {**text.rope_scaling, "mrope_section": list(cfg.mrope_section)}
    return Qwen2_5OmniRotaryEmbedding(text), apply_multimodal_rotary_pos_emb, list(cfg.mrope_section)


def _positions(n: int) -> torch.Tensor:
    """(3, n) t / h / w positions: text, then a 16 x 24 image (merged grid) at one time step, then text."""
    text = n // 10
    rows, cols = (16, 24) if n >= 1024 else (2, 3)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).reshape(2, -1)
    image = torch.cat((torch.zeros(1, rows * cols, dtype=torch.long), grid)) + text
    after = torch.arange(n - text - rows * cols) + text + max(rows, cols)
    return torch.cat((torch.arange(text).expand(3, -1), image, after.expand(3, -1)), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_mrope_tables_once_vs_hf_per_layer(shape, dtype, bench_rounds, benchmark, pytestconfig):
    tiny, n = SHAPES[shape]["tiny"], SHAPES[shape]["tokens"]
    cfg = _text_config(tiny)
    rotary, hf_apply, section = _hf_path(cfg, tiny)
    backend = ops.resolve("cpu")
    positions = _positions(n)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, cfg.n_heads, cfg.head_dim, generator=g).to(dtype)
    k = torch.randn(n, cfg.n_kv_heads, cfg.head_dim, generator=g).to(dtype)
    # transformers' layout after the projections: (B, T, H, D) viewed as (B, H, T, D), same storage.
    q_hf, k_hf = (t[None].transpose(1, 2) for t in (q, k))
    like, position_ids = torch.empty(0, dtype=dtype), positions[:, None, :]  # the module reads x's dtype only

    def omnicore_path():
        cos, sin = mrope_tables(cfg, positions, dtype)
        for _ in range(cfg.n_layers):
            out = backend.apply_rope(q, cos, sin), backend.apply_rope(k, cos, sin)
        return out

    def hf_path():
        for _ in range(cfg.n_layers):
            cos, sin = rotary(like, position_ids)
            out = hf_apply(q_hf, k_hf, cos, sin, section)
        return out

    def hf_embedding_once():
        cos, sin = rotary(like, position_ids)
        for _ in range(cfg.n_layers):
            out = hf_apply(q_hf, k_hf, cos, sin, section)
        return out

    atol, rtol = (1e-5, 0.0) if dtype == torch.float32 else (2e-2, 2**-7)
    got, want = omnicore_path(), hf_path()
    diffs = {
        name: check_close(a, b[0].transpose(0, 1), atol, rtol, what=f"rope {shape} {name} vs transformers")
        for name, a, b in zip(("q", "k"), got, want)
    }

    candidates = {"hf_per_layer": hf_path, "hf_embedding_once": hf_embedding_once, "omnicore": omnicore_path}
    times = alternate(candidates, rounds=bench_rounds)
    summary = ratio_summary(times["hf_per_layer"], times["omnicore"])
    record = {
        "shape": {"tokens": n, "layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim},
        "dtype": str(dtype),
        "backend": backend.name,
        "correctness": diffs,
        "seconds_median": {name: median(t) for name, t in times.items()},
        "tables_once_vs_hf_per_layer": summary,
        "vs_hf_embedding_once": ratio_summary(times["hf_embedding_once"], times["omnicore"]),
        "rounds": bench_rounds,
    }
    benchmark.extra_info.update(record)
    benchmark.pedantic(omnicore_path, rounds=1, iterations=1)
    write_record(f"rope_{shape}_{str(dtype).split('.')[-1]}", record)
    once = record["vs_hf_embedding_once"]["median"]
    print(
        f"\nrope {shape} {dtype}: omnicore {record['seconds_median']['omnicore'] * 1e3:.2f} ms per batch; vs transformers "
        f"per layer median {summary['median']:.2f}x (min {summary['min']:.2f}, max {summary['max']:.2f}, IQR {summary['iqr']:.2f}); "
        f"vs embedding once {once:.2f}x"
    )
    if shape in GATED:
        quick = pytestconfig.getoption("--bench-quick")
        gate(summary, thresholds("rope")["tables_once_vs_hf_per_layer"], quick=quick, what=f"rope {shape} {dtype}")
