"""Parameters are flat dicts of tensors with dotted native names.

Model functions receive the *relative* slice they compute (`select(params, "text.layers.3.")`), so
one function serves every layer, pipeline stage and tensor-parallel shard. `init_params` is
generic over a shapes table (the model's `param_shapes(cfg)` is the single source of truth).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["Params", "Shapes", "select", "prefixed", "param_count", "init_params", "check_shapes"]

Params = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


def select(params: Mapping[str, torch.Tensor], prefix: str) -> Params:
    """The entries under `prefix`, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def prefixed(params: Mapping[str, torch.Tensor], prefix: str) -> Params:
    return {prefix + k: v for k, v in params.items()}


def param_count(shapes: Mapping[str, Iterable[int]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _is_norm_weight(name: str) -> bool:
    return name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]


def init_params(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Params:
    """Seeded init in table order: norm weights 1, biases 0, everything else N(0, std).

    The same seed gives the same tensors on every machine (a CPU generator draws every tensor, which
    is then moved), independent of device.
    """
    gen = torch.Generator().manual_seed(seed)
    out: Params = {}
    for name, shape in shapes.items():
        if _is_norm_weight(name):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * std
        out[name] = t.to(device=device, dtype=dtype)
    return out


def check_shapes(found: Mapping[str, Iterable[int]], expected: Mapping[str, Iterable[int]], *, source: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor of `found`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shape for {len(wrong)} tensor(s): {'; '.join(wrong)}")
    if problems:
        raise ValueError(f"{source}: " + " | ".join(problems))
