"""Learning-rate schedules as pure functions of the optimizer step.

Semantics follow Megatron-LM's `OptimizerParamScheduler.get_lr` (which MindSpeed uses unchanged for
`--lr-warmup-iters`, `--lr-warmup-fraction`, `--lr-decay-style`, `--min-lr`), in iterations:
  - `step` counts optimizer steps already taken, so the first update uses `lr_at(s, 0)`; with warmup
    that is `warmup_init` (0 by default), as in Megatron and in HF's warmup schedules.
  - warmup, while step <= warmup:  warmup_init + (lr - warmup_init) * step / warmup
  - then constant: lr (min_lr is ignored, as in Megatron)
  - past decay_steps: min_lr
  - otherwise, ratio = (step - warmup) / (decay_steps - warmup):
      linear: min_lr + (lr - min_lr) * (1 - ratio)
      cosine: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * ratio))
`warmup_fraction` is a fraction of `decay_steps` and, like Megatron's, is not rounded to whole steps.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

__all__ = ["LRSchedule", "lr_at"]


@attrs.frozen(kw_only=True)
class LRSchedule:
    """Warmup then decay from `lr` to `min_lr` over `decay_steps` (Megatron's --lr-decay-iters,
    which defaults to --train-iters). Give at most one of `warmup_steps` / `warmup_fraction`."""

    lr: float
    decay_steps: int
    min_lr: float = 0.0
    style: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    warmup_init: float = 0.0  # Megatron's --lr-warmup-init

    def __attrs_post_init__(self) -> None:
        if self.style not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr decay style {self.style!r}: choose cosine, linear or constant")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr (got min_lr={self.min_lr}, lr={self.lr})")
        if not 0.0 <= self.warmup_init <= self.lr:
            raise ValueError(f"need 0 <= warmup_init <= lr (got warmup_init={self.warmup_init}, lr={self.lr})")
        if self.decay_steps <= 0:
            raise ValueError(f"decay_steps must be positive (got {self.decay_steps})")
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError("give lr warmup as steps or as a fraction, not both")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"bad warmup: steps={self.warmup_steps}, fraction={self.warmup_fraction} (need >= 0, < 1)")
        if self.warmup >= self.decay_steps:
            raise ValueError(f"warmup ({self.warmup} steps) must end before decay_steps ({self.decay_steps})")

    @property
    def warmup(self) -> float:
        """Warmup length in steps (fractional when given as a fraction)."""
        return self.warmup_fraction * self.decay_steps if self.warmup_fraction else float(self.warmup_steps)


def lr_at(schedule: LRSchedule, step: int) -> float:
    """The learning rate for the update that follows `step` completed optimizer steps."""
    s = schedule
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    warmup = s.warmup
    if warmup > 0 and step <= warmup:
        return s.warmup_init + (s.lr - s.warmup_init) * step / warmup
    if s.style == "constant":
        return s.lr
    if step > s.decay_steps:
        return s.min_lr
    ratio = (step - warmup) / (s.decay_steps - warmup)
    coeff = 1.0 - ratio if s.style == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return s.min_lr + (s.lr - s.min_lr) * coeff
