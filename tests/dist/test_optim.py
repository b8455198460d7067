"""AdamW over flat dicts against torch.optim.AdamW, grad-norm clipping against clip_grad_norm_, state I/O.

Tolerances: fp32 parameters and moments to 1e-6 relative (atol 1e-7 for values near zero); bf16
parameters: fp32 masters to 1e-6 relative of torch run on fp32 copies, the bf16 tensors within one
bf16 ulp of that run cast to bf16 (rtol 2**-7: an ulp is 2**-8..2**-7 of the value).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from zero_cases import HYPER, RULES, SCHEDULE, SHAPES, global_grads, make_params
from omnicore_dist.optim import AdamW, OptimStateError, clip_grad_norm_, group_fn
from omnicore_dist.schedule import lr_at

IMPLS = ["fused", "foreach"]


def _torch_adamw(ref: dict[str, torch.Tensor], opt: AdamW) -> torch.optim.AdamW:
    """torch AdamW with one param group per (lr multiplier, weight decay) our optimizer resolved."""
    groups: dict[tuple[float, float], list] = {}
    for name, key in opt.groups().items():
        groups.setdefault(key, []).append(ref[name])
    return torch.optim.AdamW([{"params": ps, "lr": opt.lr * s, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in groups.items()],
                             betas=HYPER["betas"], eps=HYPER["eps"])  # fmt: skip


def _run_both(params, ref, opt, steps: int) -> torch.optim.AdamW:
    topt = _torch_adamw(ref, opt)
    for t in range(steps):
        grads = global_grads(t)
        lr = lr_at(SCHEDULE, t)  # changes every step: warmup then cosine
        for g in topt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        for name, g in grads.items():
            ref[name].grad = g.clone()
        topt.step()
        opt.step(grads, lr=lr)
    return topt


def _fp32_copies(params):
    return {n: p.detach().float().clone().requires_grad_(p.requires_grad) for n, p in params.items()}


@pytest.mark.parametrize("impl", IMPLS)
def test_adamw_matches_torch_fp32(impl):
    params = make_params(mixed=False)
    ref = _fp32_copies(params)
    opt = AdamW(params, impl=impl, **HYPER)
    assert opt.fused == (impl == "fused")
    topt = _run_both(params, ref, opt, steps=6)
    state = opt.state_dict()
    assert int(state["step"]) == 6
    for name in opt.names:
        torch.testing.assert_close(params[name].detach(), ref[name].detach(), rtol=1e-6, atol=1e-7, msg=name)
        for kind in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[f"{kind}.{name}"], topt.state[ref[name]][kind], rtol=1e-6, atol=1e-10)
    moved = {n: not torch.equal(params[n], make_params(mixed=False)[n]) for n in params}
    assert moved == {n: n != "lm_head.weight" for n in params}  # frozen lm_head untouched


def test_param_groups_resolve_by_rules():
    resolve = group_fn(RULES, weight_decay=0.1)
    assert resolve("vision.blocks.0.attn.q.weight") == (0.1, 0.1)
    assert resolve("vision.blocks.0.norm1.weight") == (0.1, 0.0)  # both rules apply, each for its field
    assert resolve("text.layers.0.attn.q.bias") == (1.0, 0.0)
    assert resolve("text.layers.0.input_norm.weight") == (1.0, 0.0)
    assert resolve("text.layers.0.attn.q.weight") == (1.0, 0.1)
    assert group_fn(lambda n: (2.0, 0.5), weight_decay=0.1)("x") == (2.0, 0.5)
    opt = AdamW(make_params(mixed=False), **HYPER)
    assert len({v for v in opt.groups().values()}) == 4


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_master_weights_match_torch_on_fp32_copies(impl):
    params = make_params(mixed=False)
    params = {n: p.detach().bfloat16().requires_grad_(p.requires_grad) for n, p in params.items()}
    ref = _fp32_copies(params)  # exactly the bf16 values, in fp32
    hyper = dict(HYPER, lr=3e-4)  # updates below a bf16 ulp: only the fp32 master keeps them
    opt = AdamW(params, impl=impl, **hyper)
    topt = _torch_adamw(ref, opt)
    for t in range(5):
        grads = {n: g.bfloat16() for n, g in global_grads(t).items()}
        for name, g in grads.items():
            ref[name].grad = g.float()
        topt.step()
        opt.step(grads)
    state = opt.state_dict()
    for name in opt.names:
        master = state[f"master.{name}"]
        assert master.dtype == torch.float32 and state[f"exp_avg.{name}"].dtype == torch.float32
        torch.testing.assert_close(master, ref[name].detach(), rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(params[name].detach(), master.bfloat16()), name
        torch.testing.assert_close(params[name].detach(), ref[name].detach().bfloat16(), rtol=2**-7, atol=0, msg=name)
    q = "text.layers.0.attn.q.weight"
    assert not torch.equal(state[f"master.{q}"], params[q].detach().float())  # sub-ulp progress is kept


def test_fp32_params_have_no_master():
    params = make_params(mixed=True)
    state = AdamW(params, **HYPER).state_dict()
    masters = {k for k in state if k.startswith("master.")}
    assert masters == {"master.text.embed.weight", "master.vision.blocks.0.attn.q.weight"}


def test_frozen_params_hold_no_state_and_take_no_grads():
    params = make_params(mixed=False)
    params["text.layers.0.attn.q.bias"].requires_grad_(False)
    opt = AdamW(params, **HYPER)
    assert not any(k.endswith(("lm_head.weight", "attn.q.bias")) for k in opt.state_dict())
    assert set(opt.names) == set(SHAPES) - {"lm_head.weight", "text.layers.0.attn.q.bias"}
    grads = global_grads(0)
    with pytest.raises(OptimStateError, match=r"unexpected 1 tensor\(s\): text\.layers\.0\.attn\.q\.bias"):
        opt.step(grads)
    del grads["text.layers.0.attn.q.bias"]
    with pytest.raises(OptimStateError, match=r"missing 1 tensor\(s\): vision\.blocks\.0\.norm1\.weight"):
        opt.step({k: v for k, v in grads.items() if k != "vision.blocks.0.norm1.weight"})
    assert opt.num_steps == 0  # a rejected step changes nothing


def test_state_dict_errors_name_the_entries():
    opt = AdamW(make_params(mixed=True), **HYPER)
    good = {k: v.clone() for k, v in opt.state_dict().items()}
    missing = {k: v for k, v in good.items() if k != "exp_avg_sq.text.layers.0.attn.q.weight"}
    with pytest.raises(OptimStateError, match=r"missing 1 tensor\(s\): exp_avg_sq\.text\.layers\.0\.attn\.q\.weight"):
        opt.load_state_dict(missing)
    with pytest.raises(OptimStateError, match=r"unexpected 1 tensor\(s\): exp_avg\.lm_head\.weight"):
        opt.load_state_dict(dict(good, **{"exp_avg.lm_head.weight": torch.zeros(37, 16)}))
    with pytest.raises(OptimStateError, match=r"master\.text\.embed\.weight: expected \(37, 13\), found \(13, 37\)"):
        opt.load_state_dict(dict(good, **{"master.text.embed.weight": torch.zeros(13, 37)}))
    with pytest.raises(OptimStateError, match="'step' must be a non-negative integer"):
        opt.load_state_dict(dict(good, step=torch.tensor(2.5)))


@pytest.mark.parametrize("mixed", [False, True])
def test_state_saves_as_safetensors_and_resumes_exactly(tmp_path, mixed):
    straight = make_params(mixed)
    opt = AdamW(straight, **HYPER)
    for t in range(3):
        opt.step(global_grads(t), lr=lr_at(SCHEDULE, opt.num_steps))
    save_file({n: p.detach() for n, p in straight.items()}, str(tmp_path / "params.safetensors"))
    save_file(opt.state_dict(), str(tmp_path / "optim.safetensors"))
    for t in range(3, 6):
        opt.step(global_grads(t), lr=lr_at(SCHEDULE, opt.num_steps))

    resumed = {n: p.requires_grad_(n != "lm_head.weight") for n, p in load_file(str(tmp_path / "params.safetensors")).items()}
    opt2 = AdamW(resumed, **HYPER)
    opt2.load_state_dict(load_file(str(tmp_path / "optim.safetensors")))
    assert opt2.num_steps == 3
    for t in range(3, 6):
        opt2.step(global_grads(t), lr=lr_at(SCHEDULE, opt2.num_steps))
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)
    fresh = AdamW({n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in resumed.items()}, **HYPER)
    assert not torch.equal(fresh.state_dict()["exp_avg.text.embed.weight"], opt2.state_dict()["exp_avg.text.embed.weight"])


def test_load_copies_masters_into_the_model():
    params = make_params(mixed=True)
    opt = AdamW(params, **HYPER)
    state = {k: v.clone() for k, v in opt.state_dict().items()}
    state["master.text.embed.weight"] += 0.5
    opt.load_state_dict(state)
    assert torch.equal(params["text.embed.weight"].detach(), state["master.text.embed.weight"].bfloat16())


# Clipping


def _grads(dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(7)
    return {n: (torch.randn(s, generator=gen) * scale).to(dtype) for n, s in SHAPES.items()}


@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_matches_torch(max_norm):
    ours, ref = _grads(), _grads()
    tensors = [torch.zeros_like(g, requires_grad=True) for g in ref.values()]
    for t, g in zip(tensors, ref.values()):
        t.grad = g  # clip_grad_norm_ scales .grad in place
    expected = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    norm = clip_grad_norm_(ours, max_norm)
    assert norm.dtype == torch.float32 and norm.shape == ()
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-8, msg=name)
    if max_norm < 1:
        assert float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in ours.values()]))) == pytest.approx(max_norm, rel=1e-5)


def test_clip_accumulates_bf16_grads_in_fp32():
    grads = _grads(torch.bfloat16, scale=300.0)  # squares overflow bf16's precision but not fp32's
    exact = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads.values()]))
    norm = clip_grad_norm_(grads, None)
    assert norm.dtype == torch.float32
    assert float(norm) == pytest.approx(float(exact), rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_reports_nonfinite_and_leaves_grads(bad):
    grads = _grads()
    grads["text.layers.0.attn.q.bias"][3] = bad
    before = {n: g.clone() for n, g in grads.items()}
    norm = clip_grad_norm_(grads, 0.5)
    assert not torch.isfinite(norm)
    assert all(torch.equal(grads[n], before[n]) or n == "text.layers.0.attn.q.bias" for n in grads)
    assert torch.equal(grads["text.layers.0.attn.q.bias"].nan_to_num(), before["text.layers.0.attn.q.bias"].nan_to_num())


def test_clip_reduce_hook_sees_local_square_and_sets_total():
    grads, seen = _grads(), []
    local = float(clip_grad_norm_(_grads(), None))

    def two_ranks(sq):  # as if another model-parallel rank held an identical share
        seen.append(float(sq))
        return sq * 2

    norm = clip_grad_norm_(grads, local, reduce_sq=two_ranks)
    assert seen == [pytest.approx(local**2, rel=1e-6)]
    assert float(norm) == pytest.approx(local * 2**0.5, rel=1e-6)
    assert float(torch.linalg.vector_norm(grads["text.embed.weight"])) == pytest.approx(
        float(torch.linalg.vector_norm(_grads()["text.embed.weight"])) / 2**0.5, rel=1e-5)  # fmt: skip
    calls = []
    assert float(clip_grad_norm_({}, 1.0, reduce_sq=lambda sq: calls.append(sq) or sq + 4)) == 2.0
    assert len(calls) == 1  # a rank without gradients still joins the reduction
