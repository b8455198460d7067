"""Several datasets -> one list of training conversations and one of validation conversations.

Order of operations (each deterministic, none depends on Python's `random`):
1. each dataset keeps its first `max_samples` records (LLaMA-Factory's per-dataset cap);
2. the concatenation of those records keeps its first `DataConfig.max_samples` (MindSpeed-MM's cap);
3. records are validated (`formats.parse_record`); bad ones are dropped and counted;
4. each dataset gives `ceil(val_ratio * n)` conversations to validation, chosen by a seeded hash of
   (file, record index), so the split is stable when other datasets are added or reordered;
5. each dataset's training part is weighted: weight 2 repeats it twice, 0.5 keeps a hashed half.
Separate validation files (`val_datasets`) are appended to the validation part, capped by `val_max_samples`.
Shuffling is the loader's job; the lists here keep file order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import attrs

from omnicore.data.errors import DataStats
from omnicore.data.formats import Attr, Conversation, read_dataset

__all__ = ["DatasetSpec", "Conversations", "load_conversations", "split_validation", "weighted"]


def _weight(instance, attribute, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"DatasetSpec.weight must be a finite number >= 0, got {value!r}")


def _cap(instance, attribute, value) -> None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"{attribute.name} must be a count >= 0 or None, got {value!r}")


@attrs.frozen(kw_only=True)
class DatasetSpec:
    """One dataset file: its path, sampling weight, row cap and (optionally) its own column names."""

    path: Path = attrs.field(converter=Path)
    weight: float = attrs.field(default=1.0, validator=_weight)
    max_samples: int | None = attrs.field(default=None, validator=_cap)
    attr: Attr | None = None


@attrs.frozen(kw_only=True)
class Conversations:
    """The result of `load_conversations`: training and validation conversations and the counts."""

    train: tuple[Conversation, ...]
    val: tuple[Conversation, ...]
    stats: DataStats


def _rank(seed: int, purpose: str, conv: Conversation) -> str:
    return hashlib.sha256(f"{seed}\0{purpose}\0{conv.source}\0{conv.index}".encode()).hexdigest()


def _chosen(convs: Sequence[Conversation], k: int, seed: int, purpose: str) -> set[int]:
    order = sorted(range(len(convs)), key=lambda i: _rank(seed, purpose, convs[i]))
    return set(order[:k])


def split_validation(
    convs: Sequence[Conversation], ratio: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): `ceil(ratio * n)` conversations chosen by seeded hash go to val; order kept."""
    if not 0 <= ratio < 1:
        raise ValueError(f"validation ratio must be in [0, 1), got {ratio}")
    val = _chosen(convs, math.ceil(ratio * len(convs)), seed, "val") if ratio else set()
    return [c for i, c in enumerate(convs) if i not in val], [c for i, c in enumerate(convs) if i in val]


def weighted(convs: Sequence[Conversation], weight: float, seed: int) -> list[Conversation]:
    """`floor(weight)` full copies, then `round(frac * n)` conversations chosen by seeded hash."""
    whole, frac = divmod(weight, 1.0)
    extra = _chosen(convs, round(frac * len(convs)), seed, "weight")
    return list(convs) * int(whole) + [c for i, c in enumerate(convs) if i in extra]


def _read(
    spec: DatasetSpec, attr: Attr, budget: int | None, on_bad_sample: str
) -> tuple[list[Conversation], DataStats]:
    """Valid conversations of one file, read up to its own cap and the remaining global budget."""
    caps = [x for x in (spec.max_samples, budget) if x is not None]
    return read_dataset(spec.path, spec.attr or attr, max_rows=min(caps) if caps else None, on_bad_sample=on_bad_sample)


def load_conversations(
    datasets: Sequence[DatasetSpec],
    *,
    attr: Attr = Attr(),
    max_samples: int | None = None,
    val_ratio: float = 0.0,
    val_datasets: Sequence[DatasetSpec] = (),
    val_max_samples: int | None = None,
    seed: int = 0,
    on_bad_sample: str = "skip",
) -> Conversations:
    """Read, cap, validate, split and weight several datasets (see the module docstring for the order).

    `DataFormatError` for a damaged file; `BadSample` only when `on_bad_sample="error"`.
    """
    if on_bad_sample not in ("skip", "error"):
        raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
    stats, train, val = DataStats(), [], []
    budget = max_samples
    for spec in datasets:
        if budget == 0:
            break
        convs, read = _read(spec, attr, budget, on_bad_sample)
        stats = stats.merge(read)
        budget = None if budget is None else budget - read.counts["records"]
        part_train, part_val = split_validation(convs, val_ratio, seed)
        train += weighted(part_train, spec.weight, seed)
        val += part_val
    for spec in val_datasets:
        convs, read = _read(spec, attr, None, on_bad_sample)
        stats, val = stats.merge(read), val + convs
    val = val[:val_max_samples] if val_max_samples is not None else val
    stats.count("train conversations", len(train))
    stats.count("val conversations", len(val))
    return Conversations(train=tuple(train), val=tuple(val), stats=stats)
