"""Learning-rate schedules against closed forms (Megatron's OptimizerParamScheduler.get_lr semantics)."""

from __future__ import annotations

import math

import pytest

from omnicore_dist.schedule import LRSchedule, lr_at

LR, MIN = 1e-3, 1e-4


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_init(style):
    s = LRSchedule(lr=LR, min_lr=MIN, decay_steps=110, warmup_steps=10, style=style)
    assert lr_at(s, 0) == 0.0  # the first update of a warmed-up run uses warmup_init
    assert lr_at(s, 5) == pytest.approx(LR / 2, rel=1e-12)
    assert lr_at(s, 10) == pytest.approx(LR, rel=1e-12)  # warmup end: the peak
    s = LRSchedule(lr=LR, decay_steps=110, warmup_steps=10, warmup_init=2e-4, style=style)
    assert lr_at(s, 0) == pytest.approx(2e-4) and lr_at(s, 5) == pytest.approx(6e-4)


def test_cosine_midpoint_and_floor():
    s = LRSchedule(lr=LR, min_lr=MIN, decay_steps=110, warmup_steps=10)
    assert lr_at(s, 60) == pytest.approx((LR + MIN) / 2, rel=1e-12)  # half way through the decay
    ratio = 0.25
    assert lr_at(s, 35) == pytest.approx(MIN + (LR - MIN) * 0.5 * (1 + math.cos(math.pi * ratio)), rel=1e-12)
    assert lr_at(s, 110) == pytest.approx(MIN, rel=1e-12)
    assert lr_at(s, 111) == MIN and lr_at(s, 10**6) == MIN
    values = [lr_at(s, t) for t in range(10, 120)]
    assert all(a >= b for a, b in zip(values, values[1:])) and min(values) == MIN


def test_linear_and_constant():
    lin = LRSchedule(lr=LR, min_lr=MIN, decay_steps=110, warmup_steps=10, style="linear")
    assert lr_at(lin, 35) == pytest.approx(MIN + (LR - MIN) * 0.75, rel=1e-12)
    assert lr_at(lin, 60) == pytest.approx((LR + MIN) / 2, rel=1e-12)
    const = LRSchedule(lr=LR, min_lr=MIN, decay_steps=110, warmup_steps=10, style="constant")
    assert [lr_at(const, t) for t in (10, 60, 500)] == [LR, LR, LR]  # Megatron: constant ignores min_lr


def test_warmup_fraction_is_a_fraction_of_decay_steps():
    s = LRSchedule(lr=LR, decay_steps=55, warmup_fraction=0.1)
    assert s.warmup == pytest.approx(5.5)  # not rounded, as Megatron
    assert lr_at(s, 5) == pytest.approx(LR * 5 / 5.5, rel=1e-12)
    assert lr_at(s, 6) < LR  # already decaying
    no_warmup = LRSchedule(lr=LR, min_lr=MIN, decay_steps=10)
    assert lr_at(no_warmup, 0) == LR and lr_at(no_warmup, 10) == pytest.approx(MIN)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_steps=5, warmup_fraction=0.1), "not both"),
        (dict(warmup_steps=100), "must end before"),
        (dict(min_lr=2e-3), "min_lr <= lr"),
        (dict(style="step"), "choose cosine, linear or constant"),
        (dict(decay_steps=0), "decay_steps must be positive"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule(**{**dict(lr=LR, decay_steps=100), **kwargs})
