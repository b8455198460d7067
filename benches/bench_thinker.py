"""End-to-end thinker forward + backward: omnicore vs transformers, same weights, same batch, one process.

Workloads (batch 2 x 512 tokens, all labelled except media placeholders): text, image (each row an
image of 400 merged tokens) and audio (each row a 16 s clip, 400 tokens). The config is fixed below
(BENCH_CONFIG) so numbers compare across commits. Correctness is checked first (loss to 1e-5).

    pytest benches/bench_thinker.py -s                    # full run, writes bench_results/thinker.json
    pytest benches/bench_thinker.py -s --bench-quick      # correctness and a short timing (CI)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import alternate, ratio_summary, write_record  # noqa: E402
from hf_reference import Piece, build_batch, hf_kwargs  # noqa: E402

import omnicore  # noqa: E402
from omnicore.checkpoint.hf import params_to_hf  # noqa: E402
from omnicore.config import AudioConfig, TextConfig, ThinkerConfig, TokenIds, VisionConfig  # noqa: E402

BENCH_CONFIG = ThinkerConfig(
    text=TextConfig(
        vocab_size=4096, hidden=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn=704,
        rope_theta=1e6, rms_eps=1e-6, mrope_section=(8, 12, 12),
    ),
    vision=VisionConfig(
        depth=4, hidden=128, n_heads=2, ffn=256, in_channels=3, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, window_size=112, fullatt_blocks=(1, 3), out_hidden=256,
    ),
    audio=AudioConfig(
        n_mels=128, d_model=128, n_layers=4, n_heads=2, ffn=512, max_source_positions=1500,
        n_window=100, output_dim=256,
    ),
    tokens=TokenIds(audio=4000, audio_start=4001, audio_end=4002, vision_start=4003, vision_end=4004, image=4005, video=4006),
    position_id_per_seconds=25,
    seconds_per_chunk=2,
)  # fmt: skip

WORKLOADS = {
    "text": [[Piece("text", 512)], [Piece("text", 512)]],
    "image": [[Piece("text", 50), Piece("image", grid=(1, 40, 40)), Piece("text", 60)]] * 2,
    "audio": [[Piece("text", 50), Piece("audio", 1600), Piece("text", 60)]] * 2,
}


def hf_thinker(params, cfg: ThinkerConfig = BENCH_CONFIG):
    """transformers' thinker (SDPA attention) holding `params`, in training mode."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(Qwen2_5OmniThinkerConfig(**cfg.to_hf()), attn_implementation="sdpa")
    model.load_state_dict(params_to_hf(params, prefix=""), strict=False)
    return model.train()


@pytest.mark.parametrize("workload", WORKLOADS)
def test_thinker_step_vs_hf(workload, bench_rounds, benchmark):
    params = omnicore.init_thinker(BENCH_CONFIG, seed=0, std=0.05)
    model = hf_thinker(params)
    batch = build_batch(BENCH_CONFIG, WORKLOADS[workload], seed=1)
    tokens = int(batch["attention_mask"].sum())
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    ops = omnicore.ops.resolve("auto", "cpu")

    def omni_step():
        inputs = omnicore.prepare_inputs(BENCH_CONFIG, batch)  # per-step host work is part of the cost
        loss = omnicore.thinker_loss(leaves, BENCH_CONFIG, inputs, ops=ops)
        torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return loss

    def hf_step():
        model.zero_grad(set_to_none=True)
        loss = model(**hf_kwargs(batch)).loss
        loss.backward()
        return loss

    ref_loss, loss = hf_step().detach(), omni_step().detach()
    assert torch.allclose(loss, ref_loss, rtol=1e-5), f"loss {loss.item()} vs HF {ref_loss.item()}"

    times = alternate({"hf": hf_step, "omnicore": omni_step}, rounds=bench_rounds)
    summary = ratio_summary(times["hf"], times["omnicore"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    record = {
        "workload": workload,
        "tokens_per_step": tokens,
        "tokens_per_s": {k: tokens / t for k, t in med.items()},
        "speedup_vs_hf": summary,
        "rounds": bench_rounds,
    }
    benchmark.extra_info.update(record)
    benchmark.pedantic(omni_step, rounds=1, iterations=1)
    write_record(f"thinker_{workload}", record)
    print(
        f"\n{workload}: omnicore {record['tokens_per_s']['omnicore']:.0f} tok/s, HF {record['tokens_per_s']['hf']:.0f} tok/s, "
        f"speedup median {summary['median']:.3f} (min {summary['min']:.3f}, max {summary['max']:.3f}, IQR {summary['iqr']:.3f})"
    )
