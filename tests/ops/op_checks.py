"""Shared helpers for the op tests: seeded inputs, real rotary tables, and a diff report.

Tolerances: `report` fails when |got - want| > atol + rtol * |want| anywhere, and prints the max
and mean absolute difference. RTOL_BF16 = 2^-7 is one bf16 ulp relative to the value: two correct
bf16 results that round at different steps (a fused multiply-add versus a product rounded first)
differ by about that.
"""

from __future__ import annotations

import torch

__all__ = ["RTOL_BF16", "qkv", "rope_tables", "report"]

RTOL_BF16 = 2**-7


def qkv(n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q (n, heads, dim), k and v (n, kv_heads, dim), standard normal."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]


def rope_tables(n: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, dim) of random angles in the rotate-half layout (each half-angle used twice)."""
    angles = torch.rand(n, dim // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 100
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def report(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Assert got ~ want elementwise (|diff| <= atol + rtol * |want|); the message gives max / mean |diff|."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    assert bool((diff <= bound).all()), (
        f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol:.3g}, rtol {rtol:.3g})"
    )
