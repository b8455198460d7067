"""Parallel layouts as pure data: tensor-parallel plans with shard / unshard, and pipeline stage plans.

A TP plan is an ordered table of (regex over native names, Split or None) declared next to each
tower's code; the first full match wins and a test checks that every parameter matches exactly
one rule. `Split(dim, units)` cuts a tensor along `dim` into equal blocks of whole units (heads,
or single rows / columns); dim 0 is column parallel (and vocab parallel for the embedding and
lm_head), dim 1 row parallel, None replicates. GQA k / v use `replicate_short`: when the TP size
exceeds the kv heads, rank r holds the one kv head its query heads read (a copy on tp / Hkv ranks).

A pipeline plan comes from per-tower layer counts per stage (`llm_pp_layers` etc., MindSpeed's
inputs); `stage_plan` validates them and says which parameters live on which stage. The trainer,
inference and the converter share these functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import attrs
import torch

__all__ = [
    "Split",
    "TPPlan",
    "LayoutError",
    "TOWERS",
    "tower_of",
    "rule_for",
    "shard_tensor",
    "piece_span",
    "unshard_tensors",
    "piece_ranks",
    "shard_shape",
    "shard",
    "unshard",
    "check_plan",
    "Stage",
    "stage_plan",
    "stage_of",
    "Layout",
    "parse_layer_list",
]

TOWERS = ("text", "vision", "audio")


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the setting and the broken rule."""


@attrs.frozen
class Split:
    """Shard along `dim` into equal blocks of whole `units` (None: every index is a unit).

    `unit_name` words error messages ("heads"); `replicate_short` lets the TP size exceed the
    units by giving each rank one unit (rank r gets unit r // (size / units)).
    """

    dim: int
    units: int | None = None
    unit_name: str = "rows"
    replicate_short: bool = False


TPPlan = tuple[tuple[str, "Split | None"], ...]


def tower_of(name: str) -> str:
    """The tower a native parameter belongs to (lm_head travels with the text tower)."""
    head = name.split(".", 1)[0]
    return "text" if head == "lm_head" else head


def rule_for(name: str, plan: TPPlan) -> Split | None:
    for pattern, rule in plan:
        if re.fullmatch(pattern, name):
            return rule
    raise KeyError(f"no tensor-parallel rule matches {name!r}")


def _blocks(split: Split, dim_size: int, size: int, name: str) -> tuple[int, int]:
    """(number of blocks the tensor is cut into, ranks per block)."""
    units = split.units or dim_size
    if size <= units:
        if units % size:
            raise LayoutError(f"{name}: {units} {split.unit_name} cannot be split evenly over tensor-parallel size {size}")
        return size, 1
    if not split.replicate_short or size % units:
        raise LayoutError(f"{name}: {units} {split.unit_name} cannot be split over tensor-parallel size {size}")
    return units, size // units


def shard_shape(shape: Sequence[int], split: Split | None, size: int, name: str = "tensor") -> tuple[int, ...]:
    shape = tuple(shape)
    if split is None:
        return shape
    blocks, _ = _blocks(split, shape[split.dim], size, name)
    return shape[: split.dim] + (shape[split.dim] // blocks,) + shape[split.dim + 1 :]


def piece_span(split: Split, dim_size: int, rank: int, size: int, name: str = "tensor") -> tuple[int, int]:
    """[start, stop) of rank `rank`'s piece along `split.dim` (of length `dim_size`) at TP size `size`."""
    blocks, per_block = _blocks(split, dim_size, size, name)
    length = dim_size // blocks
    start = rank // per_block * length
    return start, start + length


def shard_tensor(t: torch.Tensor, split: Split | None, rank: int, size: int, name: str = "tensor") -> torch.Tensor:
    """Rank `rank`'s piece of `t` (a view)."""
    if split is None:
        return t
    start, stop = piece_span(split, t.shape[split.dim], rank, size, name)
    return t.narrow(split.dim, start, stop - start)


def piece_ranks(split: Split | None, size: int) -> list[int]:
    """Ranks whose pieces, concatenated along `split.dim`, make the full tensor (one per replica set)."""
    if split is None:
        return [0]
    per_block = size // split.units if split.replicate_short and split.units and size > split.units else 1
    return list(range(0, size, per_block))


def unshard_tensors(pieces: Sequence[torch.Tensor], split: Split | None, name: str = "tensor") -> torch.Tensor:
    """Inverse of `shard_tensor` given every rank's piece, in rank order."""
    ranks = piece_ranks(split, len(pieces))
    return pieces[0] if split is None else torch.cat([pieces[r] for r in ranks], dim=split.dim)


def shard(params: Mapping[str, torch.Tensor], plan: TPPlan, rank: int, size: int) -> dict[str, torch.Tensor]:
    return {k: shard_tensor(v, rule_for(k, plan), rank, size, k) for k, v in params.items()}


def unshard(shards: Sequence[Mapping[str, torch.Tensor]], plan: TPPlan) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's shard dict (rank order)."""
    return {k: unshard_tensors([s[k] for s in shards], rule_for(k, plan), k) for k in shards[0]}


def check_plan(shapes: Mapping[str, Sequence[int]], plan: TPPlan, size: int) -> None:
    """Every name matches exactly one rule and every split divides: LayoutError naming the first failure."""
    for name, shape in shapes.items():
        matches = [p for p, _ in plan if re.fullmatch(p, name)]
        if len(matches) != 1:
            raise LayoutError(f"{name} matches {len(matches)} tensor-parallel rules ({matches}); exactly one expected")
        shard_shape(shape, rule_for(name, plan), size, name)


@attrs.frozen
class Stage:
    """What one pipeline stage holds: layer ranges per tower (global indices) and the extras."""

    index: int
    text_layers: range
    vision_blocks: range
    audio_layers: range
    text_embed: bool = False  # token embedding and the multimodal merge (the first LLM stage)
    text_head: bool = False  # final norm and lm_head (the last LLM stage)
    vision_stem: bool = False  # patch embed, with the first vision block
    vision_merger: bool = False  # merger, with the last vision block
    audio_stem: bool = False  # convs (and the unused bos/eos table), with the first audio layer
    audio_head: bool = False  # ln_post and projection, with the last audio layer

    @property
    def empty(self) -> bool:
        return not (self.text_layers or self.vision_blocks or self.audio_layers)


def _ranges(counts: Sequence[int]) -> list[range]:
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def _first(ranges: list[range]) -> int:
    return next(i for i, r in enumerate(ranges) if r)


def _last(ranges: list[range]) -> int:
    return max(i for i, r in enumerate(ranges) if r)


def stage_plan(
    depths: Mapping[str, int],
    llm_pp_layers: Sequence[int],
    vit_pp_layers: Sequence[int] | None = None,
    audio_pp_layers: Sequence[int] | None = None,
) -> tuple[Stage, ...]:
    """Validate per-tower layer counts per stage and place every parameter group.

    `depths` maps "text" / "vision" / "audio" to layer counts. Omitted encoder lists put the whole
    encoder on stage 0. Rules: one entry per stage in every list, non-negative, summing to the
    tower's depth; an encoder's last layer sits at or before the first stage with an LLM layer
    (inside a stage: vision, audio, merge, LLM); no stage is empty.
    """
    stages = len(llm_pp_layers)
    lists = {"llm_pp_layers": list(llm_pp_layers)}
    for key, given, tower in (("vit_pp_layers", vit_pp_layers, "vision"), ("audio_pp_layers", audio_pp_layers, "audio")):
        lists[key] = list(given) if given is not None else [depths[tower]] + [0] * (stages - 1)
    towers = {"llm_pp_layers": "text", "vit_pp_layers": "vision", "audio_pp_layers": "audio"}
    for key, counts in lists.items():
        tower = towers[key]
        if stages == 0 or len(counts) != stages:
            raise LayoutError(f"{key} {counts} has {len(counts)} entries; llm_pp_layers has {stages} (one per pipeline stage)")
        if any(n < 0 for n in counts):
            raise LayoutError(f"{key} {counts} has a negative layer count")
        if sum(counts) != depths[tower]:
            raise LayoutError(f"{key} {counts} sums to {sum(counts)}, but the {tower} tower has {depths[tower]} layers")
    text, vision, audio = (_ranges(lists[k]) for k in ("llm_pp_layers", "vit_pp_layers", "audio_pp_layers"))
    llm_start = _first(text)
    for key, ranges, label in (("vit_pp_layers", vision, "vision encoder"), ("audio_pp_layers", audio, "audio encoder")):
        end = _last(ranges)
        if end > llm_start:
            raise LayoutError(
                f"{key} {lists[key]} with llm_pp_layers {lists['llm_pp_layers']}: the {label} ends on stage {end} "
                f"but the LLM starts on stage {llm_start}; an encoder must finish at or before the stage where the LLM starts"
            )
    plan = tuple(
        Stage(
            index=s,
            text_layers=text[s],
            vision_blocks=vision[s],
            audio_layers=audio[s],
            text_embed=s == llm_start,
            text_head=s == _last(text),
            vision_stem=s == _first(vision),
            vision_merger=s == _last(vision),
            audio_stem=s == _first(audio),
            audio_head=s == _last(audio),
        )
        for s in range(stages)
    )
    empty = [st.index for st in plan if st.empty]
    if empty:
        raise LayoutError(f"pipeline stage(s) {empty} hold no layer of any tower: {lists}")
    return plan


_LAYER = re.compile(r"(text\.layers|vision\.blocks|audio\.layers)\.(\d+)\.")


def stage_of(name: str, stages: Sequence[Stage]) -> int:
    """The stage holding native parameter `name`."""
    m = _LAYER.match(name)
    if m:
        field = {"text.layers": "text_layers", "vision.blocks": "vision_blocks", "audio.layers": "audio_layers"}[m.group(1)]
        i = int(m.group(2))
        return next(st.index for st in stages if i in getattr(st, field))
    flag = {
        "text.embed.": "text_embed",
        "text.norm.": "text_head",
        "lm_head.": "text_head",
        "vision.patch_embed.": "vision_stem",
        "vision.merger.": "vision_merger",
        "audio.conv": "audio_stem",
        "audio.bos_eos.": "audio_stem",
        "audio.norm.": "audio_head",
        "audio.proj.": "audio_head",
    }
    for prefix, field in flag.items():
        if name.startswith(prefix):
            return next(st.index for st in stages if getattr(st, field))
    raise KeyError(f"no pipeline placement rule for {name!r}")


def parse_layer_list(value: str | Sequence[int] | None, flag: str) -> tuple[int, ...] | None:
    """Accept the recipe's spellings: `[[11,17]]`, `[11,17]`, `11,17`, `11 17`, or a sequence."""
    if value is None or not isinstance(value, str):
        return None if value is None else tuple(int(v) for v in value)
    text = value.strip()
    nested = re.fullmatch(r"\[\s*(\[.*\])\s*\]", text)
    if nested:
        inner = re.findall(r"\[([^\[\]]*)\]", nested.group(1))
        if len(inner) != 1:
            raise LayoutError(f"{flag} {value}: one list per virtual pipeline stage is not supported (virtual pipeline size must be 1)")
        text = inner[0]
    text = text.strip("[] ")
    try:
        return tuple(int(v) for v in re.split(r"[,\s]+", text) if v)
    except ValueError:
        raise LayoutError(f"{flag} {value!r}: expected layer counts such as [11,17] or 11,17") from None


@attrs.frozen(kw_only=True)
class Layout:
    """TP size per tower and per-tower pipeline layer counts (None: all on one stage)."""

    tp: int = 1
    vit_tp: int | None = None  # defaults to tp, as in the recipe
    audio_tp: int | None = None
    llm_pp_layers: tuple[int, ...] | None = None
    vit_pp_layers: tuple[int, ...] | None = None
    audio_pp_layers: tuple[int, ...] | None = None

    def tp_sizes(self) -> dict[str, int]:
        sizes = {"text": self.tp, "vision": self.vit_tp or self.tp, "audio": self.audio_tp or self.tp}
        for tower, size in sizes.items():
            if size < 1:
                raise LayoutError(f"tensor-parallel size of the {tower} tower must be >= 1, got {size}")
        return sizes

    def stages(self, depths: Mapping[str, int]) -> tuple[Stage, ...]:
        llm = self.llm_pp_layers or (depths["text"],)
        return stage_plan(depths, llm, self.vit_pp_layers, self.audio_pp_layers)

    def to_json(self, depths: Mapping[str, int]) -> dict:
        stages = self.stages(depths)
        return {
            "tp": self.tp_sizes(),
            "pp": {
                "llm_pp_layers": [len(s.text_layers) for s in stages],
                "vit_pp_layers": [len(s.vision_blocks) for s in stages],
                "audio_pp_layers": [len(s.audio_layers) for s in stages],
            },
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Layout:
        tp, pp = data["tp"], data["pp"]
        return cls(
            tp=tp["text"],
            vit_tp=tp["vision"],
            audio_tp=tp["audio"],
            llm_pp_layers=tuple(pp["llm_pp_layers"]),
            vit_pp_layers=tuple(pp["vit_pp_layers"]),
            audio_pp_layers=tuple(pp["audio_pp_layers"]),
        )
