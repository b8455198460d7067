"""LoRA as pure functions: target names, init, the adapted view, merge, and parity with peft.

Reference: transformers 4.52.4's thinker wrapped by peft (test-only dependency) with the same
adapters copied in. Tolerances: gradients of every A and B max |diff| <= 1e-5 x their max |peft
grad|; logits max |diff| <= 1e-5 x max |logit| (fp32).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hf_reference import Piece, build_batch, hf_kwargs

import omnicore
from omnicore.checkpoint.lora_io import peft_module
from omnicore.config import TINY
from omnicore.lora import LoraError, LoraSpec, LoraWeight, adapted, adapter_shapes, init_adapters, lora_layers, merge
from omnicore.models.thinker import init_thinker

EVERY_TOWER = ("llm", "vision", "audio")
MIXED = [[Piece("text", 3), Piece("image", grid=(1, 4, 6)), Piece("text", 2), Piece("audio", 57), Piece("text", 4)], [Piece("text", 6)]]


def _random_b(adapters, seed=3, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * std if k.endswith("lora_B") else v.clone()) for k, v in adapters.items()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "targets, expect",
    [
        (["linear_qkv"], {"attn.q", "attn.k", "attn.v"}),
        (["linear_proj", "linear_fc2"], {"attn.o", "mlp.down", "mlp.fc2"}),
        (["linear_fc1"], {"mlp.gate", "mlp.up", "mlp.fc1"}),
        (["q_proj", "v_proj"], {"attn.q", "attn.v"}),
        (["o_proj", "gate_proj", "up_proj", "down_proj"], {"attn.o", "mlp.gate", "mlp.up", "mlp.down"}),
        (["fc1", "out_proj"], {"mlp.fc1", "attn.o"}),
        (["all"], {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "mlp.fc1", "mlp.fc2"}),
    ],
)
def test_target_names_of_every_vocabulary(targets, expect):
    layers = lora_layers(TINY, LoraSpec(targets=targets, r=2, alpha=4, towers=EVERY_TOWER))
    suffixes = {re.sub(r"^\w+\.(layers|blocks)\.\d+\.", "", n) for n in layers}
    assert suffixes == expect
    assert all(re.match(r"(text\.layers|vision\.blocks|audio\.layers)\.\d+\.", n) for n in layers)


def test_towers_restrict_and_default_to_the_llm():
    layers = lora_layers(TINY, LoraSpec(targets=["all"], r=2, alpha=4))
    assert layers and all(n.startswith("text.layers.") for n in layers)
    assert len(layers) == 7 * TINY.text.n_layers
    shapes = adapter_shapes(TINY, LoraSpec(targets=["q_proj"], r=3, alpha=4))
    c = TINY.text.hidden
    assert shapes["text.layers.0.attn.q.lora_A"] == (3, c) and shapes["text.layers.0.attn.q.lora_B"] == (c, 3)


def test_bad_settings_are_clear_errors():
    with pytest.raises(LoraError, match=r"unknown target module 'q_prj'.*did you mean 'q_proj'"):
        LoraSpec(targets=["q_prj"], r=4, alpha=8)
    with pytest.raises(LoraError, match=r"lora.r .*positive integer rank, got 0"):
        LoraSpec(targets=["all"], r=0, alpha=8)
    with pytest.raises(LoraError, match="unknown tower 'visoin'.*'vision'"):
        LoraSpec(targets=["all"], r=4, alpha=8, towers=["visoin"])
    with pytest.raises(LoraError, match="dropout"):
        LoraSpec(targets=["all"], r=4, alpha=8, dropout=1.0)
    with pytest.raises(LoraError, match="match no linear layer"):
        lora_layers(TINY, LoraSpec(targets=["fc1"], r=4, alpha=8))  # fc1 is audio-only
    base = init_thinker(TINY, seed=0)
    spec = LoraSpec(targets=["q_proj"], r=4, alpha=8)
    wrong = init_adapters(TINY, LoraSpec(targets=["q_proj"], r=4, alpha=8, towers=["vision"]), seed=0)
    wrong = {k.replace("vision.blocks", "text.layers"): v for k, v in wrong.items()}  # vision widths on text layers
    with pytest.raises(LoraError, match="do not fit the base weight"):
        adapted(base, wrong, spec)


def test_scaling_and_init():
    assert LoraSpec(targets=["all"], r=16, alpha=32).scale == 2.0
    assert LoraSpec(targets=["all"], r=16, alpha=32, rslora=True).scale == 8.0
    spec = LoraSpec(targets=["all"], r=4, alpha=8)
    a = init_adapters(TINY, spec, seed=0)
    assert all(v.dtype == torch.float32 for v in a.values())
    assert all(torch.count_nonzero(v) == 0 for k, v in a.items() if k.endswith("lora_B"))
    bound = 1 / TINY.text.hidden**0.5
    q = a["text.layers.0.attn.q.lora_A"]
    assert q.abs().max() <= bound and q.abs().max() > 0.9 * bound
    assert torch.equal(q, init_adapters(TINY, spec, seed=0)["text.layers.0.attn.q.lora_A"])


def test_b_zero_equals_the_base_model_exactly():
    cfg = TINY
    base = init_thinker(cfg, seed=0, std=0.25)
    spec = LoraSpec(targets=["all"], r=4, alpha=8, towers=EVERY_TOWER)
    batch = build_batch(cfg, MIXED, seed=1)
    ref = omnicore.thinker_logits(base, cfg, batch, ops=omnicore.ops.CPU)
    view = adapted(base, init_adapters(cfg, spec, seed=1), spec)
    assert isinstance(view["text.layers.0.attn.q.weight"], LoraWeight)
    assert torch.equal(omnicore.thinker_logits(view, cfg, batch, ops=omnicore.ops.CPU), ref)
    assert torch.equal(omnicore.thinker_loss(view, cfg, batch, ops=omnicore.ops.CPU), omnicore.thinker_loss(base, cfg, batch, ops=omnicore.ops.CPU))


def test_frozen_base_gets_no_gradient_and_bf16_base_trains_fp32_adapters():
    cfg = TINY
    base = {k: v.to(torch.bfloat16) for k, v in init_thinker(cfg, seed=0, std=0.25).items()}
    spec = LoraSpec(targets=["linear_qkv", "linear_fc2"], r=4, alpha=8)
    adapters = {k: v.requires_grad_() for k, v in _random_b(init_adapters(cfg, spec, seed=1)).items()}
    loss = omnicore.thinker_loss(adapted(base, adapters, spec, train=True), cfg, build_batch(cfg, [[Piece("text", 12)]]), ops=omnicore.ops.CPU)
    loss.backward()
    assert all(v.grad is None and not v.requires_grad for v in base.values())
    assert all(v.grad is not None and v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0 for v in adapters.values())


def test_dropout_only_in_training():
    cfg = TINY
    base = init_thinker(cfg, seed=0, std=0.25)
    spec = LoraSpec(targets=["all"], r=4, alpha=8, dropout=0.5)
    adapters = _random_b(init_adapters(cfg, spec, seed=1))
    batch = build_batch(cfg, [[Piece("text", 12)]])
    merged = omnicore.thinker_logits(merge(base, adapters, spec), cfg, batch, ops=omnicore.ops.CPU)
    evaluated = omnicore.thinker_logits(adapted(base, adapters, spec), cfg, batch, ops=omnicore.ops.CPU)
    assert _rel(evaluated, merged) < 1e-5
    torch.manual_seed(0)
    trained = omnicore.thinker_logits(adapted(base, adapters, spec, train=True), cfg, batch, ops=omnicore.ops.CPU)
    assert _rel(trained, merged) > 1e-3


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_adapter_inference(rslora):
    cfg = TINY
    base = init_thinker(cfg, seed=0, std=0.25)
    spec = LoraSpec(targets=["all"], r=4, alpha=8, rslora=rslora, towers=EVERY_TOWER)
    adapters = _random_b(init_adapters(cfg, spec, seed=1), std=0.05)
    batch = build_batch(cfg, MIXED, seed=2)
    valid = batch["attention_mask"].bool()
    adapter = omnicore.thinker_logits(adapted(base, adapters, spec), cfg, batch, ops=omnicore.ops.CPU)[valid]
    merged = omnicore.thinker_logits(merge(base, adapters, spec), cfg, batch, ops=omnicore.ops.CPU)[valid]
    plain = omnicore.thinker_logits(base, cfg, batch, ops=omnicore.ops.CPU)[valid]
    assert _rel(plain, merged) > 1e-2, "the adapters should change the logits"
    assert _rel(adapter, merged) <= 1e-5


def _peft_model(model, spec, layers):
    from peft import LoraConfig, get_peft_model

    names = [peft_module(layer) for layer in layers]
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, use_rslora=spec.rslora,
                        target_modules="(" + "|".join(re.escape(n) for n in names) + ")")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


@pytest.mark.parametrize("rslora", [False, True])
def test_gradients_of_a_and_b_match_peft(hf_pair, rslora):
    import copy

    # float64 on both sides, so the comparison sees the LoRA math and not fp32 rounding of the
    # attention kernels (the base model's own fp32 parity is tests/models/test_thinker_parity.py).
    cfg, hf_model, params, _ = hf_pair("tiny_gqa")
    params = {k: v.double() for k, v in params.items()}
    spec = LoraSpec(targets=["all"], r=4, alpha=8, rslora=rslora, towers=EVERY_TOWER)
    adapters = {k: v.double() for k, v in _random_b(init_adapters(cfg, spec, seed=5), std=0.05).items()}
    layers = list(lora_layers(cfg, spec))
    peft = _peft_model(copy.deepcopy(hf_model).double(), spec, layers)
    named = dict(peft.named_parameters())
    with torch.no_grad():
        for n, t in adapters.items():
            layer, half = n.rsplit(".", 1)
            named[f"base_model.model.{peft_module(layer)}.{half}.default.weight"].copy_(t)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in build_batch(cfg, MIXED, seed=4).items()}
    out = peft(**hf_kwargs(batch))
    out.loss.backward()

    leaves = {k: v.clone().requires_grad_() for k, v in adapters.items()}
    loss = omnicore.thinker_loss(adapted(params, leaves, spec, train=True), cfg, batch, ops=omnicore.ops.CPU)
    loss.backward()
    assert torch.allclose(loss, out.loss, rtol=1e-5, atol=0)
    bad = []
    for n, leaf in leaves.items():
        layer, half = n.rsplit(".", 1)
        ref = named[f"base_model.model.{peft_module(layer)}.{half}.default.weight"].grad
        err, top = (leaf.grad - ref).abs().max(), ref.abs().max()
        if not top > 0 or err > 1e-5 * top:
            bad.append(f"{n}: max diff {err:.3g}, max |grad| {top:.3g}")
    assert not bad, "adapter gradients differ from peft:\n" + "\n".join(bad)
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n), "peft trained a base weight"


def test_adapters_are_placed_on_their_layers_pipeline_stage():
    from omnicore.layout import stage_of, stage_plan
    from omnicore.lora import layer_of
    from omnicore.models.thinker import tower_depths

    cfg = TINY
    stages = stage_plan(tower_depths(cfg), [1, cfg.text.n_layers - 1], [cfg.vision.depth, 0], [cfg.audio.n_layers, 0])
    spec = LoraSpec(targets=["all"], r=2, alpha=4, towers=EVERY_TOWER)
    placed = {n: stage_of(n, stages) for n in adapter_shapes(cfg, spec)}
    assert all(s == stage_of(layer_of(n) + ".weight", stages) for n, s in placed.items())
    assert set(placed.values()) == {0, 1}
