"""ZeRO-1: DP = 2 gloo ranks equal plain AdamW; saved shards resume exactly, reshard to DP 1 and 4, and
convert to and from the plain state losslessly.

Tolerances: across DP sizes the clip norm's partial sums are added in a different order, so parameters
and fp32 state agree to 1e-6 relative (bf16 parameters to one bf16 ulp, rtol 2**-7); a resume under
the same DP size repeats the same arithmetic and must be bit-identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from zero_cases import BF16, CLIP, HYPER, SCHEDULE, launch, load_shard, local_grads, make_params, reference, save_shard
from omnicore_dist.optim import (
    AdamW,
    OptimStateError,
    ZeroAdamW,
    clip_grad_norm_,
    plain_to_zero,
    reshard_zero,
    shard_bounds,
    zero_to_plain,
)
from omnicore_dist.schedule import lr_at

K = 3  # steps before the save; the run goes to 2 K
JOB = dict(mixed=True, start=0, stop=2 * K, clip=True, average=True, bucket_numel=64, load=None, save_at=[K, 2 * K], hang_rank=None)


def _close(found: dict, expected: dict, *, what: str) -> None:
    assert found.keys() == expected.keys(), what
    for name, ref in expected.items():
        ours = found[name]
        if ref.dtype == torch.bfloat16:
            torch.testing.assert_close(ours, ref, rtol=2**-7, atol=0, msg=lambda m: f"{what} {name}: {m}")
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what} {name}: {m}")


def _step_dir(root, step: int, world: int):
    """Saved params (checking every rank holds the same tensors) and the ranks' (state, meta)."""
    d = root / f"step{step}"
    params = [load_file(str(d / f"params-r{r}.safetensors")) for r in range(world)]
    for r in range(1, world):
        for name, p in params[0].items():
            assert torch.equal(params[r][name], p), f"rank {r} disagrees with rank 0 on {name}"
    shards = [load_shard(d / f"optim-dp{r:02d}.safetensors") for r in range(world)]
    norms = json.loads((d / "norms-r0.json").read_text())
    return params[0], shards, norms


def _resume_dir(tmp, params: dict, shards) -> str:
    tmp.mkdir(parents=True)
    save_file(params, str(tmp / "params.safetensors"))
    for state, meta in shards:
        save_shard(tmp / f"optim-dp{meta['dp_rank']:02d}.safetensors", state, meta)
    return str(tmp)


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_dp2")
    launch(2, dict(JOB, out=str(root)), root / "logs")
    return root


@pytest.fixture(scope="module")
def plain_run():
    """Plain AdamW over the same global gradients, snapshots after K and 2 K steps."""
    params = make_params(mixed=True)
    opt, norms_k = reference(params, 0, K, clip=True)
    snap_k = ({n: p.detach().clone() for n, p in params.items()}, {k: v.clone() for k, v in opt.state_dict().items()})
    _, norms_2k = reference(params, K, 2 * K, clip=True, opt=opt)
    return snap_k, (params, opt.state_dict()), norms_k + norms_2k


@pytest.mark.timeout(120)
def test_zero_dp2_equals_plain_adamw(dp2_run, plain_run):
    (params_k, state_k), (params_2k, state_2k), ref_norms = plain_run
    for step, ref_params, ref_state in ((K, params_k, state_k), (2 * K, params_2k, state_2k)):
        params, shards, norms = _step_dir(dp2_run, step, 2)
        _close(params, {n: p.detach() for n, p in ref_params.items()}, what=f"params after {step} steps")
        _close(zero_to_plain(shards), ref_state, what=f"optimizer state after {step} steps")
    assert {n for n, p in params.items() if p.dtype == torch.bfloat16} == BF16
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-6, atol=0)


@pytest.mark.timeout(120)
def test_zero_resume_same_dp_is_bit_identical(dp2_run, tmp_path):
    params, shards, _ = _step_dir(dp2_run, K, 2)
    out = tmp_path / "out"
    launch(2, dict(JOB, start=K, load=_resume_dir(tmp_path / "resume", params, shards), out=str(out), save_at=[2 * K]), tmp_path / "logs")
    resumed, resumed_shards, _ = _step_dir(out, 2 * K, 2)
    straight, straight_shards, _ = _step_dir(dp2_run, 2 * K, 2)
    for name, p in straight.items():
        assert torch.equal(resumed[name], p), name
    for (a, _), (b, _) in zip(resumed_shards, straight_shards):
        assert all(torch.equal(a[k], b[k]) for k in b), "optimizer state differs after an exact resume"


@pytest.mark.timeout(120)
def test_zero_reshard_to_dp1_continues(dp2_run):
    params, shards, _ = _step_dir(dp2_run, K, 2)
    params = {n: p.requires_grad_(n != "lm_head.weight") for n, p in params.items()}
    opt = ZeroAdamW(params, dp_group=None, average=True, **HYPER)
    ((state, meta),) = reshard_zero(shards, 1)
    opt.load_state_dict(state, meta)
    for t in range(K, 2 * K):
        g = opt.reduce_grads(local_grads(t, 0, 1))
        clip_grad_norm_(g, CLIP)
        opt.step(g, lr=lr_at(SCHEDULE, opt.num_steps))
    straight, straight_shards, _ = _step_dir(dp2_run, 2 * K, 2)
    _close({n: p.detach() for n, p in params.items()}, straight, what="DP 1 continuation")
    _close(zero_to_plain([(opt.state_dict(), opt.metadata())]), zero_to_plain(straight_shards), what="DP 1 continuation state")


@pytest.mark.slow  # four processes: ~6 s on an idle 2-core machine, 20 s under load
@pytest.mark.timeout(180)
def test_zero_reshard_to_dp4_continues(dp2_run, tmp_path):
    params, shards, _ = _step_dir(dp2_run, K, 2)
    four = reshard_zero(shards, 4)
    assert [m["params"]["audio.layers.0.attn.k.bias"]["end"] - m["params"]["audio.layers.0.attn.k.bias"]["begin"] for _, m in four] == [1, 1, 1, 0]
    out = tmp_path / "out"
    launch(4, dict(JOB, start=K, load=_resume_dir(tmp_path / "resume", params, four), out=str(out), save_at=[2 * K]), tmp_path / "logs")
    resumed, resumed_shards, _ = _step_dir(out, 2 * K, 4)
    straight, straight_shards, _ = _step_dir(dp2_run, 2 * K, 2)
    _close(resumed, straight, what="DP 4 continuation")
    _close(zero_to_plain(resumed_shards), zero_to_plain(straight_shards), what="DP 4 continuation state")


@pytest.mark.timeout(60)
def test_launcher_names_the_hung_rank(tmp_path):
    job = dict(JOB, stop=K, save_at=[], out=str(tmp_path), hang_rank=1)
    with pytest.raises(AssertionError, match=r"hung after 5 s: .*rank 1 \(last output: rank 1 sleeping before init\)") as err:
        launch(2, job, tmp_path / "logs", timeout=5)
    assert "rank 0 (last output: " in str(err.value)  # waiting for rank 1 in the rendezvous


# Pure parts: no process group.


@pytest.mark.parametrize("numel", [1, 3, 7, 8, 481])
@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_shard_bounds_partition_the_tensor(numel, dp):
    bounds = shard_bounds(numel, dp)
    assert len(bounds) == dp and bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    chunk = -(-numel // dp)
    assert all(hi - lo == chunk for lo, hi in bounds[: numel // chunk])  # equal chunks but the tail


@pytest.fixture
def plain_state():
    params = make_params(mixed=True)
    opt, _ = reference(params, 0, 2, clip=True)
    return {k: v.clone() for k, v in opt.state_dict().items()}


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_plain_zero_round_trip_is_exact(plain_state, dp):
    shards = [plain_to_zero(plain_state, dp, r) for r in range(dp)]
    assert {k for k in shards[0][0] if k.startswith("master.")} == {f"master.{n}" for n in BF16}
    back = zero_to_plain(shards)
    assert back.keys() == plain_state.keys()
    assert all(torch.equal(back[k], plain_state[k]) for k in plain_state)
    again = reshard_zero(shards, dp)
    assert all(torch.equal(a[k], b[k]) and ma == mb for (a, ma), (b, mb) in zip(again, shards) for k in a)


def test_plain_state_loads_into_zero_and_back(plain_state):
    params = make_params(mixed=True)
    ref = make_params(mixed=True)
    ref_opt = AdamW(ref, **HYPER)
    ref_opt.load_state_dict(plain_state)
    opt = ZeroAdamW(params, **HYPER)
    opt.load_state_dict(*plain_to_zero(plain_state, 1, 0))
    for t in range(2, 4):
        ref_opt.step(local_grads(t, 0, 1), lr=lr_at(SCHEDULE, ref_opt.num_steps))
        opt.step(opt.reduce_grads(local_grads(t, 0, 1)), lr=lr_at(SCHEDULE, opt.num_steps))
    _close({n: p.detach() for n, p in params.items()}, {n: p.detach() for n, p in ref.items()}, what="ZeRO from plain state")
    back = AdamW(make_params(mixed=True), **HYPER)
    back.load_state_dict(zero_to_plain([(opt.state_dict(), opt.metadata())]))
    _close(back.state_dict(), ref_opt.state_dict(), what="plain from ZeRO state")


def test_zero_to_plain_errors_name_rank_and_entry(plain_state):
    shards = [plain_to_zero(plain_state, 2, r) for r in range(2)]
    with pytest.raises(OptimStateError, match=r"ranks 0\.\.1 of 2 once each; got \['0/2'\]"):
        zero_to_plain(shards[:1])
    bad = dict(shards[1][0], **{"exp_avg.text.embed.weight": shards[1][0]["exp_avg.text.embed.weight"][:-1]})
    with pytest.raises(OptimStateError, match=r"DP rank 1.*exp_avg\.text\.embed\.weight"):
        zero_to_plain([shards[0], (bad, shards[1][1])])
    late = dict(shards[1][0], step=torch.tensor(7))
    with pytest.raises(OptimStateError, match="rank 1 is at step 7"):
        zero_to_plain([shards[0], (late, shards[1][1])])
    moved = json.loads(json.dumps(shards[1][1]))
    moved["params"]["text.embed.weight"]["begin"] += 1
    with pytest.raises(OptimStateError, match=r"rank 1: .*text\.embed\.weight"):
        zero_to_plain([shards[0], (shards[1][0], moved)])
    with pytest.raises(OptimStateError, match="unexpected entries momentum.x"):
        plain_to_zero(dict(plain_state, **{"momentum.x": torch.zeros(1)}), 2, 0)


def test_zero_load_rejects_another_ranks_shard(plain_state):
    opt = ZeroAdamW(make_params(mixed=True), **HYPER)
    state, meta = plain_to_zero(plain_state, 2, 1)
    with pytest.raises(OptimStateError, match=r"DP rank 1 of 2 given to rank 0 of 1: reshard it first"):
        opt.load_state_dict(state, meta)


def test_zero_dp1_matches_plain_bitwise():
    """DP 1 runs the same kernel on flat views of the same numbers: no reduction, no reordering."""
    a, b = make_params(mixed=True), make_params(mixed=True)
    plain, zero = AdamW(a, **HYPER), ZeroAdamW(b, **HYPER)
    for t in range(3):
        plain.step(local_grads(t, 0, 1), lr=lr_at(SCHEDULE, t))
        zero.step(zero.reduce_grads(local_grads(t, 0, 1)), lr=lr_at(SCHEDULE, t))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert b["lm_head.weight"].requires_grad is False and "exp_avg.lm_head.weight" not in zero.state_dict()

