"""The hot ops behind one signature each, with the backend passed in as a value.

    attention(q, k, v, segments, *, causal, scale=None)   q (N, H, D), k / v (N, Hkv, D)
    cached_attention(q, k, v, kv_lengths, *, scale=None)  q (B, S, H, D) over caches (B, L, Hkv, D)
    apply_rope(x, cos, sin)                                 x (N, H, D), cos / sin (N, D)
    rms_norm(x, weight, eps)
    swiglu(gate, up)

`resolve(name, device)` picks an `Ops` bundle once per run (`auto` goes by device type: npu,
cuda, else cpu); model functions receive it as the keyword `ops` and never consult a global.
`ref` is the oracle every backend is tested against. Optional kernels (torch_npu, flash-attn) are
imported by `resolve` and the functions that call them, never when this package is imported.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from omnicore.ops import cpu, cuda, npu, ref
from omnicore.ops.segments import LengthBucket, Segments

__all__ = ["Ops", "REF", "CPU", "CUDA", "CUDA_FLASH", "NPU", "BACKEND_NAMES", "resolve", "Segments", "LengthBucket"]


@attrs.frozen
class Ops:
    """A backend: one implementation per hot op, all with the reference signatures.

    `cached_attention` (decoding over a KV cache) defaults to the portable SDPA version, which runs
    on every device; bundles built before it existed keep working.
    """

    name: str
    attention: Callable[..., torch.Tensor]
    apply_rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    cached_attention: Callable[..., torch.Tensor] = cpu.cached_attention


REF = Ops(
    name="ref", attention=ref.attention, apply_rope=ref.apply_rope, rms_norm=ref.rms_norm, swiglu=ref.swiglu,
    cached_attention=ref.cached_attention,
)  # fmt: skip
# SDPA-based; runs on any device torch supports, so it is also the fallback for `auto`.
CPU = Ops(name="cpu", attention=cpu.attention, apply_rope=cpu.apply_rope, rms_norm=cpu.rms_norm, swiglu=cpu.swiglu)
CUDA = Ops(name="cuda", attention=cpu.attention, apply_rope=cpu.apply_rope, rms_norm=cuda.rms_norm, swiglu=cpu.swiglu)
CUDA_FLASH = attrs.evolve(CUDA, name="cuda+flash-attn", attention=cuda.attention)
# Decoding over a KV cache uses the portable SDPA path on NPU too (no incremental kernel wrapped yet).
NPU = Ops(name="npu", attention=npu.attention, apply_rope=npu.apply_rope, rms_norm=npu.rms_norm, swiglu=npu.swiglu)

BACKEND_NAMES = ("auto", "npu", "cuda", "cpu", "ref")


def resolve(name: str = "auto", device: torch.device | str | None = None) -> Ops:
    """The backend called `name`, once per run; `auto` picks by the device type of the tensors.

    `auto`: npu -> `npu`, cuda -> `cuda`, anything else (or no device) -> `cpu`. `npu` imports
    torch_npu here and fails with the install command when it is missing; `cuda` uses flash-attn's
    varlen kernel when it imports, the SDPA path otherwise (the name says which).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"ops.backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    if name == "auto":
        name = {"npu": "npu", "cuda": "cuda"}.get(_device_type(device), "cpu")
    if name == "npu":
        npu.require()
        return NPU
    if name == "cuda":
        return CUDA_FLASH if cuda.flash_attn_available() else CUDA
    return REF if name == "ref" else CPU


def _device_type(device: torch.device | str | None) -> str:
    # A string is read without torch.device(): "npu" only parses once torch_npu is loaded.
    if device is None:
        return "cpu"
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]
