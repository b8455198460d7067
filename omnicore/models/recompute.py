"""Activation recomputation as data: which layers of which tower recompute in the backward pass.

The runtime decides (`model.recompute` in the run config); the model functions only ask
`recompute.text` etc. whether to wrap a layer in `torch.utils.checkpoint` (non-reentrant, so the
layer may take keyword arguments and parameters that do not require gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
import torch.utils.checkpoint

__all__ = ["Recompute", "NO_RECOMPUTE", "run_layer"]


@attrs.frozen
class Recompute:
    """Global layer indices to recompute, per tower."""

    text: frozenset[int] = attrs.field(default=frozenset(), converter=frozenset)
    vision: frozenset[int] = attrs.field(default=frozenset(), converter=frozenset)
    audio: frozenset[int] = attrs.field(default=frozenset(), converter=frozenset)


NO_RECOMPUTE = Recompute()


def run_layer(fn: Callable[..., torch.Tensor], recompute: bool, *args, **kwargs) -> torch.Tensor:
    """`fn(*args, **kwargs)`, keeping only its inputs for backward when `recompute` is set."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
