"""`data.micro_batch_tokens`: a token budget per micro-batch changes how a step's samples are grouped,
not what is learnt (the "token" loss: 1e-6 relative), and is shown in the plan."""

from __future__ import annotations

import json

import pytest

import omnicore_dist.run as run_module
from omnicore_dist.config import ConfigError, load_run_config
from omnicore_dist.run import run

TRAIN_STEP = run_module.train_step


def _run(base, hf, overrides, monkeypatch=None, *, dry_run=False):
    import train_worker

    base.mkdir(parents=True, exist_ok=True)
    (base / "run.toml").write_text(train_worker.CONFIG.format(hf=hf, iters=2))
    groups = []
    if monkeypatch is not None:  # record each step's micro-batch sizes (samples per micro-batch)
        def recording(params, grads, optimizer, cfg, micro, **kw):
            groups.append([int(mb["cu_seqlens"].numel()) - 1 for mb in micro])
            return TRAIN_STEP(params, grads, optimizer, cfg, micro, **kw)

        monkeypatch.setattr(run_module, "train_step", recording)
    run(load_run_config(base / "run.toml", overrides), base=base, samples=train_worker.samples(), dry_run=dry_run)
    rows = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()] if not dry_run else []
    return [r for r in rows if "loss" in r and "event" not in r], groups


def test_a_token_budget_groups_samples_and_learns_the_same(tiny_hf, tmp_path, monkeypatch):
    plain, plain_groups = _run(tmp_path / "plain", tiny_hf, [], monkeypatch)
    budget, budget_groups = _run(tmp_path / "budget", tiny_hf, ["--data.micro_batch_tokens=80"], monkeypatch)
    assert plain_groups == [[1, 1, 1, 1], [1, 1, 1, 1]]  # micro_batch_size 1
    assert budget_groups != plain_groups and all(sum(g) == 4 for g in budget_groups)
    assert any(n > 1 for g in budget_groups for n in g)  # samples packed together under the budget
    assert [r["tokens"] for r in budget] == [r["tokens"] for r in plain]
    assert [r["loss"] for r in budget] == pytest.approx([r["loss"] for r in plain], rel=1e-6)


def test_the_plan_names_the_budget_and_bad_budgets_are_errors(tiny_hf, tmp_path, capsys):
    _run(tmp_path / "plan", tiny_hf, ["--data.micro_batch_tokens=80"], dry_run=True)
    assert "in micro-batches of up to 80 tokens" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="data.micro_batch_tokens must be >= 0"):
        load_run_config(tmp_path / "plan" / "run.toml", ["--data.micro_batch_tokens=-1"])
