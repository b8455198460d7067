"""The hot ops behind one signature each, with the backend passed in as a value.

    attention(q, k, v, segments, *, causal, scale=None)   q (N, H, D), k / v (N, Hkv, D)
    apply_rope(x, cos, sin)                                 x (N, H, D), cos / sin (N, D)
    rms_norm(x, weight, eps)
    swiglu(gate, up)

`resolve(name, device)` picks an `Ops` bundle once per run (`auto` goes by device type); model
functions receive it as the keyword `ops` and never consult a global. `ref` is the oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from omnicore.ops import cpu, ref
from omnicore.ops.segments import LengthBucket, Segments

__all__ = ["Ops", "REF", "CPU", "BACKEND_NAMES", "resolve", "Segments", "LengthBucket"]


@attrs.frozen
class Ops:
    """A backend: one implementation per hot op, all with the reference signatures."""

    name: str
    attention: Callable[..., torch.Tensor]
    apply_rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


REF = Ops(name="ref", attention=ref.attention, apply_rope=ref.apply_rope, rms_norm=ref.rms_norm, swiglu=ref.swiglu)
# SDPA-based; runs on any device torch supports, so it is also the fallback for `auto`.
CPU = Ops(name="cpu", attention=cpu.attention, apply_rope=cpu.apply_rope, rms_norm=cpu.rms_norm, swiglu=cpu.swiglu)

BACKEND_NAMES = ("auto", "cpu", "ref")


def resolve(name: str = "auto", device: torch.device | str | None = None) -> Ops:
    """The backend called `name`; `auto` chooses by device type (the SDPA backend everywhere today)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"ops.backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    if name == "ref":
        return REF
    return CPU
