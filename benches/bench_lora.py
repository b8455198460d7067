"""LoRA training step: omnicore LoRA vs omnicore full fine-tuning vs transformers + peft, same
weights, data and adapter placement (r 16 on every linear of the LLM), alternating in one process;
optimizer state bytes, and (in subprocesses) peak RSS.

Workloads (global batch 2 x 512 text tokens, one micro-batch): tiny/text on the tiny bench config,
medium/text on bench_train's wider MEDIUM config. Gates (benches/thresholds.toml [lora]): LoRA
optimizer state <= 5% of full fine-tuning's (both); LoRA >= 1.3x transformers + peft on the tiny
config; LoRA step <= 0.7x the full step's time (full / LoRA >= 1 / 0.7) on the medium config, where
the linears' weight gradients LoRA skips are a real share of the step; on the tiny one (hidden 256)
attention, softmax and the vocabulary projection dominate both steps, and the ratio is reported only.

    pytest benches/bench_lora.py -s                  # writes bench_results/lora_*.json
    pytest benches/bench_lora.py -s --bench-quick    # correctness and a short timing (CI)
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_thinker import BENCH_CONFIG, hf_thinker  # noqa: E402
from bench_train import MEDIUM, packed  # noqa: E402
from common import alternate, gate, kernel_seconds, peak_rss, ratio_summary, thresholds, write_record  # noqa: E402
from hf_reference import Piece, build_batch, hf_kwargs  # noqa: E402

import omnicore  # noqa: E402
from omnicore.checkpoint.lora_io import peft_module  # noqa: E402
from omnicore.lora import LoraSpec, adapted, init_adapters, lora_layers  # noqa: E402
from omnicore.ops import resolve  # noqa: E402
from omnicore_dist.mesh import Mesh  # noqa: E402
from omnicore_dist.optim import AdamW  # noqa: E402
from omnicore_dist.train import GradBuffer, train_step  # noqa: E402

WORKLOADS = {
    "tiny/text": (BENCH_CONFIG, [[Piece("text", 512)], [Piece("text", 512)]]),
    "medium/text": (MEDIUM, [[Piece("text", 512)], [Piece("text", 512)]]),
}
SPEC = LoraSpec(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=16, alpha=32)
LR = 1e-4


def _state_bytes(state) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def _steps(name: str, which=("lora", "full", "peft")):
    """{candidate: step function} for a workload (only those in `which` are built, so a process's peak
    memory is its candidate's), and a function giving the optimizers' state bytes."""
    cfg, rows = WORKLOADS[name]
    params = omnicore.init_thinker(cfg, seed=0, std=0.02)
    batch = build_batch(cfg, rows, seed=1, padding="right")
    packed_batch = packed(batch)
    ops, mesh = resolve("auto", "cpu"), Mesh(world=1, rank=0, dp=1, pp=1, tp=1)
    adapters = {k: v.requires_grad_() for k, v in init_adapters(cfg, SPEC, seed=1).items()}
    steps, optimizers = {}, {}

    if "lora" in which:
        view = adapted({k: v.clone() for k, v in params.items()}, adapters, SPEC, train=True)  # frozen base
        lora_opt, lora_grads = AdamW(adapters, lr=LR, weight_decay=0.0), GradBuffer(adapters)
        steps["lora"] = lambda: train_step(view, lora_grads, lora_opt, cfg, [packed_batch], lr=LR, mesh=mesh, ops=ops).loss
        optimizers["lora"] = lora_opt

    if "full" in which:
        leaves = {k: v.clone().requires_grad_(k != "audio.bos_eos.weight") for k, v in params.items()}
        trainable = {k: v for k, v in leaves.items() if v.requires_grad}
        full_opt, full_grads = AdamW(trainable, lr=LR, weight_decay=0.0), GradBuffer(trainable)
        steps["full"] = lambda: train_step(leaves, full_grads, full_opt, cfg, [packed_batch], lr=LR, mesh=mesh, ops=ops).loss
        optimizers["full"] = full_opt

    if "peft" in which:
        from peft import LoraConfig, get_peft_model

        names = [peft_module(layer) for layer in lora_layers(cfg, SPEC)]
        config = LoraConfig(r=SPEC.r, lora_alpha=SPEC.alpha, lora_dropout=0.0, target_modules="(" + "|".join(re.escape(n) for n in names) + ")")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(hf_thinker(params, cfg), config).train()
        with torch.no_grad():  # the same A as omnicore's (B = 0 on both sides)
            named = dict(model.named_parameters())
            for n, t in adapters.items():
                layer, half = n.rsplit(".", 1)
                named[f"base_model.model.{peft_module(layer)}.{half}.default.weight"].copy_(t)
        torch_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0, fused=True)

        def peft_step():
            torch_opt.zero_grad(set_to_none=True)
            loss = model(**hf_kwargs(batch)).loss
            loss.backward()
            torch_opt.step()
            return loss.item()

        steps["peft"] = peft_step

    def optimizer_bytes():
        return {k: _state_bytes(o.state_dict()) for k, o in optimizers.items()}

    return steps, optimizer_bytes


def _peak_rss(name: str, which: str) -> int:
    return peak_rss(f"from bench_lora import _steps\nstep = _steps({name!r}, ({which!r},))[0][{which!r}]")


@pytest.mark.parametrize("name", WORKLOADS)
def test_lora_step_vs_full_and_peft(name, bench_rounds, request):
    quick = request.config.getoption("--bench-quick")
    steps, optimizer_bytes = _steps(name)
    lora_step, full_step, peft_step = steps["lora"], steps["full"], steps["peft"]
    first = {"lora": lora_step(), "full": full_step(), "peft": peft_step()}  # B = 0: all three are the base's loss
    assert first["lora"] == pytest.approx(first["full"], rel=1e-5) and first["lora"] == pytest.approx(first["peft"], rel=1e-4), first
    rounds = bench_rounds if name.startswith("tiny/") else min(bench_rounds, 7)  # a medium full step takes ~10 s on 2 cores
    times = alternate({"full": full_step, "peft": peft_step, "lora": lora_step}, rounds=rounds)
    vs_full, vs_peft = ratio_summary(times["full"], times["lora"]), ratio_summary(times["peft"], times["lora"])
    opt = optimizer_bytes()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    kernels = kernel_seconds(lora_step)  # see bench_train: the ceiling of any speedup with these kernels
    record = {
        "workload": name,
        "spec": SPEC.to_json(),
        "step_seconds": med,
        "lora_time_over_full": med["lora"] / med["full"],
        "full_over_lora": vs_full,
        "peft_over_lora": vs_peft,
        "optimizer_bytes": opt,
        "optimizer_fraction": opt["lora"] / opt["full"],
        "kernel_floor": {"seconds": kernels, "share_of_step": kernels / med["lora"], "ceiling_vs_peft": med["peft"] / kernels},
        "rounds": rounds,
    }
    if not quick:
        record["peak_rss"] = {which: _peak_rss(name, which) for which in ("lora", "full", "peft")}
    write_record("lora_" + name.replace("/", "_"), record)
    rss = record.get("peak_rss")
    print(f"\n{name}: LoRA step {med['lora'] * 1e3:.0f} ms, full {med['full'] * 1e3:.0f} ms (LoRA / full {record['lora_time_over_full']:.2f}), "
          f"peft {med['peft'] * 1e3:.0f} ms (x{vs_peft['median']:.2f}); optimizer state {opt['lora'] / 2**20:.2f} vs {opt['full'] / 2**20:.1f} MiB "
          f"({record['optimizer_fraction']:.2%}); kernels {record['kernel_floor']['share_of_step']:.0%} of the LoRA step, ceiling "
          f"x{record['kernel_floor']['ceiling_vs_peft']:.2f} vs peft" + (f"; peak RSS LoRA {rss['lora'] / 2**20:.0f}, full {rss['full'] / 2**20:.0f}, "
                                                      f"peft {rss['peft'] / 2**20:.0f} MiB" if rss else ""))  # fmt: skip
    limits = thresholds("lora")
    assert record["optimizer_fraction"] <= limits["optimizer_fraction"], record["optimizer_fraction"]
    if name.startswith("medium/"):  # where the linears dominate; on the tiny config attention and softmax do (reported)
        gate(vs_full, limits["full_over_lora"], quick=quick, what=f"{name}: full step / LoRA step")
    else:
        gate(vs_peft, limits["peft_over_lora"], quick=quick, what=f"{name}: transformers + peft / omnicore LoRA")
