"""The whole thinker (HF `Qwen2_5OmniThinkerForConditionalGeneration`): encoders, merge, decoder, loss.

`prepare_inputs` turns a batch with the HF processor's key names (padded rows, or packed samples
with `cu_seqlens`) into `ThinkerInputs`: the valid tokens back to back, text segments, 3-D
positions, shifted targets, encoder layouts and placeholder slots. It runs once per batch on the
host and checks every count, so the model functions below do only tensor math. Padding never
reaches the model: padded rows are packed on the way in and logits are scattered back on the way out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from omnicore.comm import LOCAL, Comm
from omnicore.config import ThinkerConfig
from omnicore.layout import Stage, TPPlan
from omnicore.models.audio import (
    AudioLayout,
    audio_encoder,
    audio_head,
    audio_layers,
    audio_layout,
    audio_param_shapes,
    audio_stem,
    audio_tp_plan,
)
from omnicore.models.encoder_shares import media_shares
from omnicore.models.positions import MediaQueue, packed_positions
from omnicore.models.recompute import NO_RECOMPUTE, Recompute
from omnicore.models.text import mrope_tables, text_embed, text_head, text_layers, text_param_shapes, text_tp_plan
from omnicore.models.vision import (
    VisionLayout,
    vision_blocks,
    vision_encoder,
    vision_head,
    vision_layout,
    vision_param_shapes,
    vision_stem,
    vision_tp_plan,
)
from omnicore.ops import Ops, Segments, resolve
from omnicore.params import Params, Shapes, init_params, prefixed, select

__all__ = [
    "param_shapes",
    "tp_plans",
    "tower_depths",
    "init_thinker",
    "ThinkerInputs",
    "prepare_inputs",
    "embed_inputs",
    "whole_model_stage",
    "stage_forward",
    "inputs_meta",
    "inputs_from_meta",
    "thinker_hidden",
    "thinker_logits",
    "thinker_loss",
    "thinker_token_losses",
    "head_token_losses",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100


def param_shapes(cfg: ThinkerConfig) -> Shapes:
    """Every native parameter name of the thinker and its full (unsharded) shape."""
    return (
        prefixed(text_param_shapes(cfg.text), "text.")
        | {"lm_head.weight": (cfg.text.vocab_size, cfg.text.hidden)}
        | prefixed(vision_param_shapes(cfg.vision), "vision.")
        | prefixed(audio_param_shapes(cfg.audio), "audio.")
    )


def tp_plans(cfg: ThinkerConfig) -> dict[str, TPPlan]:
    """The tensor-parallel plan of each tower, over full native names."""
    return {"text": text_tp_plan(cfg.text), "vision": vision_tp_plan(cfg.vision), "audio": audio_tp_plan(cfg.audio)}


def tower_depths(cfg: ThinkerConfig) -> dict[str, int]:
    return {"text": cfg.text.n_layers, "vision": cfg.vision.depth, "audio": cfg.audio.n_layers}


def init_thinker(cfg: ThinkerConfig, *, seed: int, std: float = 0.02, dtype=torch.float32, device="cpu") -> Params:
    return init_params(param_shapes(cfg), seed=seed, std=std, dtype=dtype, device=device)


@attrs.frozen
class Media:
    """One encoder's input for a batch: its tensor, its layout and the token slots it fills."""

    values: torch.Tensor | None  # None on a pipeline stage after the first (the values travel in the carry)
    layout: VisionLayout | AudioLayout
    slots: torch.Tensor
    items: tuple = ()  # vision: each item's grid (t, h, w), to cut the batch into encoder-replica shares


@attrs.frozen
class ThinkerInputs:
    """A batch ready for the model (see module docstring). N = valid tokens of all samples.

    input_ids (N,), positions (3, N), segments: one per sample; targets (N,) the next token of
    each position within its sample or -100; rows (N,) where each token sits in the caller's
    (B, T) layout (None when the batch was packed); rope_deltas (B, 1) for decoding.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    segments: Segments
    batch_shape: tuple[int, int]
    rows: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    images: Media | None = None
    videos: Media | None = None
    audios: Media | None = None
    rope_deltas: torch.Tensor | None = None


def prepare_inputs(cfg: ThinkerConfig, batch: Mapping[str, Any]) -> ThinkerInputs:
    """Validate and lay out a batch dict (HF processor names, or packed with `cu_seqlens`)."""
    if "input_ids" not in batch:
        raise KeyError("batch has no input_ids")
    ids = batch["input_ids"]
    device = ids.device
    if batch.get("cu_seqlens") is not None:
        flat_ids = ids.reshape(-1)
        segments = Segments.from_cu_seqlens(batch["cu_seqlens"].to(device))
        if segments.total != flat_ids.numel():
            raise ValueError(f"cu_seqlens covers {segments.total} tokens but input_ids has {flat_ids.numel()}")
        batch_shape, rows, gather = (1, flat_ids.numel()), None, None
    else:
        ids = ids if ids.dim() == 2 else ids[None]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
        rows = mask.reshape(-1).nonzero().squeeze(1)
        flat_ids = ids.reshape(-1)[rows]
        segments = Segments.from_lengths(mask.sum(1).tolist(), device)
        batch_shape, gather = tuple(ids.shape), rows

    images = _vision_media(cfg, batch, flat_ids, "pixel_values", "image_grid_thw", cfg.tokens.image, "image")
    videos = _vision_media(cfg, batch, flat_ids, "pixel_values_videos", "video_grid_thw", cfg.tokens.video, "video")
    audios = _audio_media(cfg, batch, flat_ids)
    _check_audio_in_video(cfg, batch, flat_ids, segments)

    positions, deltas = _positions(cfg, batch, flat_ids, segments, gather, videos, audios)
    targets = None
    if batch.get("labels") is not None:
        labels = batch["labels"].to(device).reshape(-1)
        labels = labels if gather is None else labels[gather]
        targets = torch.roll(labels, -1)
        targets[segments.cu_seqlens[1:].long() - 1] = IGNORE_INDEX  # no target across samples
    return ThinkerInputs(
        input_ids=flat_ids,
        positions=positions,
        segments=segments,
        batch_shape=batch_shape,
        rows=rows,
        targets=targets,
        images=images,
        videos=videos,
        audios=audios,
        rope_deltas=deltas,
    )


def _slots(flat_ids: torch.Tensor, token: int, expected: int, what: str) -> torch.Tensor:
    slots = (flat_ids == token).nonzero().squeeze(1)
    if slots.numel() != expected:
        raise ValueError(
            f"placeholder count mismatch: the batch has {slots.numel()} {what} placeholder token(s) "
            f"but its {what} input produces {expected} feature(s)"
        )
    return slots


def _vision_media(cfg, batch, flat_ids, values_key, grid_key, token, what) -> Media | None:
    values = batch.get(values_key)
    if values is None:
        _slots(flat_ids, token, 0, what)
        return None
    if batch.get(grid_key) is None:
        raise KeyError(f"batch has {values_key} but no {grid_key}")
    layout = vision_layout(cfg.vision, batch[grid_key], device=flat_ids.device)
    grids = tuple(tuple(int(v) for v in g) for g in _rows(batch[grid_key]))
    return Media(values=values, layout=layout, slots=_slots(flat_ids, token, sum(layout.tokens_per_item), what), items=grids)


def _audio_clips(cfg: ThinkerConfig, batch: Mapping[str, Any]) -> tuple[torch.Tensor, list[int]] | None:
    """(n_mels, sum L) features of all clips back to back and each clip's mel frame count."""
    feats = batch.get("input_features")
    if feats is None:
        return None
    mask = batch.get("feature_attention_mask")
    if mask is not None:  # HF layout: (B, n_mels, T) padded, mask (B, T)
        mask = mask.to(feats.device).bool()
        return feats.transpose(1, 2)[mask].T, mask.sum(1).tolist()
    lengths = batch.get("audio_feature_lengths")
    if lengths is None or feats.dim() != 2:
        raise KeyError(
            "audio needs input_features (B, n_mels, T) with feature_attention_mask, "
            "or packed input_features (n_mels, sum T) with audio_feature_lengths"
        )
    return feats, [int(n) for n in lengths]


def _audio_media(cfg, batch, flat_ids) -> Media | None:
    clips = _audio_clips(cfg, batch)
    if clips is None:
        _slots(flat_ids, cfg.tokens.audio, 0, "audio")
        return None
    feats, frames = clips
    layout = audio_layout(cfg.audio, frames, device=flat_ids.device)
    return Media(values=feats, layout=layout, slots=_slots(flat_ids, cfg.tokens.audio, sum(layout.tokens_per_clip), "audio"))


def _check_audio_in_video(cfg, batch, flat_ids, segments) -> None:
    """HF's `use_audio_in_video` flag must agree with the token layout, which is what we follow."""
    flag = batch.get("use_audio_in_video")
    if flag is None or batch.get("video_grid_thw") is None:
        return
    n_videos = len(batch["video_grid_thw"])
    first_video = (flat_ids[1:] == cfg.tokens.video) & (flat_ids[:-1] != cfg.tokens.video)
    interleaved = int((first_video & (flat_ids[:-1] == cfg.tokens.audio_start)).sum())
    if bool(flag) and interleaved != n_videos:
        raise ValueError(f"use_audio_in_video=True but {n_videos - interleaved} of {n_videos} video(s) carry no interleaved audio")
    if not bool(flag) and interleaved:
        raise ValueError(f"use_audio_in_video=False but {interleaved} video(s) are laid out with interleaved audio")


def _positions(cfg, batch, flat_ids, segments, gather, videos, audios):
    """(3, N) positions: the caller's `position_ids` if given, else computed per sample."""
    given = batch.get("position_ids")
    if given is not None:
        flat = given.to(flat_ids.device).reshape(3, -1)
        return (flat if gather is None else flat[:, gather]), None
    spg = batch.get("video_second_per_grid")
    if videos is not None and spg is None:
        raise KeyError("batch has pixel_values_videos but no video_second_per_grid (2 / fps per video)")
    media = MediaQueue(
        image_grids=_rows(batch.get("image_grid_thw")),
        video_grids=_rows(batch.get("video_grid_thw")),
        video_seconds_per_grid=_rows(spg),
        audio_mel_frames=[] if audios is None else audios.layout.mel_frames,
    )
    return packed_positions(cfg, flat_ids, segments.cu_seqlens.tolist(), media)


def _rows(values) -> list:
    if values is None:
        return []
    return values.tolist() if torch.is_tensor(values) else list(values)


def embed_inputs(
    params: Params, cfg: ThinkerConfig, inputs: ThinkerInputs, *, ops: Ops, comm: Comm = LOCAL, recompute: Recompute = NO_RECOMPUTE
) -> torch.Tensor:
    """Token embeddings with every placeholder replaced by its encoder feature: (N, C).

    Each encoder runs as `comm.encoder(tower)` says: on the whole batch, or (hetero parallel) on this
    replica's share of the samples, the replicas' features gathered before the merge."""
    stage = attrs.evolve(whole_model_stage(cfg), text_layers=range(0))
    return stage_forward(params, cfg, stage, inputs, {}, ops=ops, comm=comm, recompute=recompute)["hidden"]


def _encode(params: Params, cfg: ThinkerConfig, tower: str, values, layout, *, ops: Ops, comm: Comm, recompute: Recompute) -> torch.Tensor:
    if tower == "audio":
        return audio_encoder(select(params, "audio."), cfg.audio, values, layout, ops=ops, comm=comm, recompute=recompute.audio)
    return vision_encoder(select(params, "vision."), cfg.vision, values, layout, ops=ops, comm=comm, recompute=recompute.vision)


# (carry name, ThinkerInputs field, tower) of every encoder input, in merge order.
_MEDIA = (("audio", "audios", "audio"), ("image", "images", "vision"), ("video", "videos", "vision"))


def whole_model_stage(cfg: ThinkerConfig) -> Stage:
    """The one stage of an unpipelined model: every layer and every extra."""
    return Stage(index=0, text_layers=range(cfg.text.n_layers), vision_blocks=range(cfg.vision.depth), audio_layers=range(cfg.audio.n_layers),
                 text_embed=True, text_head=True, vision_stem=True, vision_merger=True, audio_stem=True, audio_head=True)  # fmt: skip


def stage_forward(
    params: Params,
    cfg: ThinkerConfig,
    stage: Stage,
    inputs: ThinkerInputs,
    carry: Mapping[str, torch.Tensor],
    *,
    ops: Ops,
    comm: Comm = LOCAL,
    recompute: Recompute = NO_RECOMPUTE,
) -> dict[str, torch.Tensor]:
    """One pipeline stage (omnicore.layout.Stage): its encoder layers, the merge, its decoder layers.

    `carry` holds what earlier stages produced, by name, and the result is what later stages need:
    "<kind>_values" (an encoder's input, before the stage with its stem; kind audio / image / video),
    "<kind>_states" (an encoder part-way), "<kind>_features" (its output, waiting for the merge) and
    "hidden" (decoder states before the final norm, whole on every TP rank). The whole model is the
    one-stage case (`whole_model_stage`), so pipelined and plain runs share this code.
    """
    out: dict[str, torch.Tensor] = {}
    features: dict[str, torch.Tensor] = {}
    enc_comm = comm.replicated()
    for kind, field, tower in _MEDIA:
        media = getattr(inputs, field)
        if media is None or "hidden" in carry:  # no such media, or merged on an earlier stage
            continue
        done = _encoder_part(params, cfg, stage, kind, tower, media, carry, out, inputs, ops=ops, comm=enc_comm, recompute=recompute)
        if done is not None:
            features[kind] = done
    if stage.text_embed:
        x = text_embed(select(params, "text."), inputs.input_ids, comm=enc_comm)
        for kind, field, _ in _MEDIA:
            if kind in features:
                x = x.index_put((getattr(inputs, field).slots,), features[kind].to(x.dtype))
    elif "hidden" in carry:
        x = carry["hidden"]
    else:  # the LLM starts on a later stage
        out |= {f"{kind}_features": f for kind, f in features.items()}
        return out
    out["hidden"] = _decoder_layers(params, cfg, x, inputs, stage.text_layers, ops=ops, comm=comm, recompute=recompute) if stage.text_layers else x
    return out


def _encoder_part(params, cfg, stage, kind, tower, media, carry, out, inputs, *, ops, comm, recompute) -> torch.Tensor | None:
    """Run this stage's share of one encoder on one kind of media: its features when the encoder is
    finished here or before, else None (what a later stage continues from is put in `out`)."""
    if f"{kind}_features" in carry:
        return carry[f"{kind}_features"]
    vision = tower == "vision"
    stem, head = (stage.vision_stem, stage.vision_merger) if vision else (stage.audio_stem, stage.audio_head)
    layers = stage.vision_blocks if vision else stage.audio_layers
    values = media.values if media.values is not None else carry.get(f"{kind}_values")
    enc = comm.encoder(tower)
    if enc.dp_size > 1:  # hetero parallel: the whole encoder sits on this stage (checked by the runtime)
        if not (stem and head):
            raise ValueError(f"the {tower} encoder with encoder data-parallel replicas must sit on one pipeline stage")
        shares = media_shares(cfg, attrs.evolve(media, values=values), tower, inputs.segments.segment_ids(), len(inputs.segments.lengths), enc.dp_size)
        mine = shares[enc.dp_rank]
        # One dtype on every replica for the gather: the output projection's.
        proj = params["vision.merger.fc2.weight" if vision else "audio.proj.weight"]
        local = (_encode(params, cfg, tower, mine.values, mine.layout, ops=ops, comm=enc.comm, recompute=recompute).to(proj.dtype)
                 if mine.rows else proj.new_zeros(0, proj.shape[0]))  # fmt: skip
        return enc.gather_features(local, [s.rows for s in shares])
    if stem:
        p = select(params, "vision.") if vision else select(params, "audio.")
        x = vision_stem(p, cfg.vision, values, media.layout) if vision else audio_stem(p, cfg.audio, values, media.layout)
    elif f"{kind}_states" in carry:
        x = carry[f"{kind}_states"]
    else:  # the encoder starts on a later stage: pass its input on
        out[f"{kind}_values"] = values
        return None
    if vision:
        x = vision_blocks(select(params, "vision."), cfg.vision, x, media.layout, layers, ops=ops, comm=enc.comm, recompute=recompute.vision)
    else:
        x = audio_layers(select(params, "audio."), cfg.audio, x, media.layout, layers, ops=ops, comm=enc.comm, recompute=recompute.audio)
    if not head:
        out[f"{kind}_states"] = x
        return None
    if vision:
        return vision_head(select(params, "vision."), cfg.vision, x, media.layout, ops=ops, comm=enc.comm)
    return audio_head(select(params, "audio."), cfg.audio, x, media.layout)


def _decoder_layers(params, cfg, x, inputs, layers, *, ops, comm, recompute) -> torch.Tensor:
    """Decoder layers `layers` on (N, C), whole on every rank before and after.

    With sequence parallelism the layers see 1 / tp of the tokens: the sequence is padded to a
    multiple of tp with rows of an extra segment of their own (so they attend only to themselves
    and nothing attends to them), split, and joined again after the last layer.
    """
    positions, segments = inputs.positions, inputs.segments
    pad = -x.shape[0] % comm.tp_size if comm.sequence_parallel else 0
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        positions = torch.cat([positions, positions.new_zeros(3, pad)], dim=1)
        segments = Segments.from_lengths((*segments.lengths, pad), x.device)
    rope = mrope_tables(cfg.text, positions, x.dtype)
    x = comm.scatter_tokens(x)
    x = text_layers(select(params, "text."), cfg.text, x, rope, segments, layers, ops=ops, comm=comm, recompute=recompute.text)
    x = comm.gather_tokens(x)
    return x[: x.shape[0] - pad] if pad else x


def thinker_hidden(
    params: Params, cfg: ThinkerConfig, inputs: ThinkerInputs, *, ops: Ops, comm: Comm = LOCAL, recompute: Recompute = NO_RECOMPUTE
) -> torch.Tensor:
    """Decoder output before the final norm: (N, C), whole on every rank."""
    return stage_forward(params, cfg, whole_model_stage(cfg), inputs, {}, ops=ops, comm=comm, recompute=recompute)["hidden"]


def inputs_meta(inputs: ThinkerInputs) -> dict[str, torch.Tensor]:
    """What a later pipeline stage needs to rebuild `inputs` without the media values (small integer
    tensors): token ids, positions, sample bounds, targets, each medium's grids or mel lengths."""
    meta = {"input_ids": inputs.input_ids, "positions": inputs.positions, "cu_seqlens": inputs.segments.cu_seqlens}
    if inputs.targets is not None:
        meta["targets"] = inputs.targets
    for kind, field, _ in _MEDIA:
        media = getattr(inputs, field)
        if media is not None:
            sizes = media.layout.mel_frames if kind == "audio" else media.items
            meta[f"{kind}_sizes"] = torch.tensor(sizes, dtype=torch.int64).reshape(len(sizes), -1)
    return meta


def inputs_from_meta(cfg: ThinkerConfig, meta: Mapping[str, torch.Tensor]) -> ThinkerInputs:
    """Inverse of `inputs_meta`: the inputs with layouts and slots rebuilt and no media values."""
    ids = meta["input_ids"]
    media = {}
    for kind, field, tower in _MEDIA:
        sizes = meta.get(f"{kind}_sizes")
        if sizes is None:
            continue
        token = {"audio": cfg.tokens.audio, "image": cfg.tokens.image, "video": cfg.tokens.video}[kind]
        if tower == "audio":
            layout = audio_layout(cfg.audio, sizes[:, 0].tolist(), device=ids.device)
            media[field] = Media(values=None, layout=layout, slots=_slots(ids, token, sum(layout.tokens_per_clip), kind))
        else:
            grids = tuple(tuple(int(v) for v in g) for g in sizes.tolist())
            layout = vision_layout(cfg.vision, sizes, device=ids.device)
            media[field] = Media(values=None, layout=layout, slots=_slots(ids, token, sum(layout.tokens_per_item), kind), items=grids)
    segments = Segments.from_cu_seqlens(meta["cu_seqlens"])
    return ThinkerInputs(input_ids=ids, positions=meta["positions"], segments=segments, batch_shape=(1, ids.numel()),
                         targets=meta.get("targets"), **media)  # fmt: skip


def _as_inputs(cfg: ThinkerConfig, batch) -> ThinkerInputs:
    return batch if isinstance(batch, ThinkerInputs) else prepare_inputs(cfg, batch)


def thinker_logits(
    params: Params, cfg: ThinkerConfig, batch, *, ops: Ops | None = None, comm: Comm = LOCAL
) -> torch.Tensor:
    """Logits (B, T, V) in the caller's layout (zeros at padding); (1, N, V) for packed batches."""
    inputs = _as_inputs(cfg, batch)
    ops = ops or resolve("auto", inputs.input_ids.device)
    h = thinker_hidden(params, cfg, inputs, ops=ops, comm=comm)
    head = comm.replicated()
    logits = head.gather_vocab(text_head(select(params, "text."), cfg.text, h, params["lm_head.weight"], ops=ops, comm=head))
    if inputs.rows is None:
        return logits[None]
    b, t = inputs.batch_shape
    out = logits.new_zeros(b * t, logits.shape[-1]).index_put((inputs.rows,), logits)
    return out.view(b, t, -1)


def thinker_token_losses(
    params: Params,
    cfg: ThinkerConfig,
    batch,
    *,
    ops: Ops | None = None,
    comm: Comm = LOCAL,
    recompute: Recompute = NO_RECOMPUTE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (K,) in fp32 at every target (labels shifted within each sample,
    -100 ignored), and the sample each target belongs to (K,). Logits exist only at the targets."""
    inputs = _as_inputs(cfg, batch)
    if inputs.targets is None:
        raise KeyError("the batch has no labels")
    ops = ops or resolve("auto", inputs.input_ids.device)
    h = thinker_hidden(params, cfg, inputs, ops=ops, comm=comm, recompute=recompute)
    return head_token_losses(params, cfg, inputs, h, ops=ops, comm=comm)


def head_token_losses(
    params: Params, cfg: ThinkerConfig, inputs: ThinkerInputs, hidden: torch.Tensor, *, ops: Ops, comm: Comm = LOCAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """`thinker_token_losses` from the decoder output `hidden` (N, C): final norm, lm_head and
    cross-entropy at the targets only (the last pipeline stage's part)."""
    h = hidden
    keep = (inputs.targets != IGNORE_INDEX).nonzero().squeeze(1)
    head = comm.replicated()
    logits = text_head(select(params, "text."), cfg.text, h[keep], params["lm_head.weight"], ops=ops, comm=head)
    losses = head.vocab_cross_entropy(logits, inputs.targets[keep])
    return losses, inputs.segments.segment_ids()[keep]


def thinker_loss(
    params: Params,
    cfg: ThinkerConfig,
    batch,
    *,
    ops: Ops | None = None,
    comm: Comm = LOCAL,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy over the targets, "mean" (HF's) or "sum" (for losses normalised
    over a global batch). A batch with no target gives 0, still attached to the graph, rather than
    HF's NaN."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    losses, _ = thinker_token_losses(params, cfg, batch, ops=ops, comm=comm)
    total = losses.sum()
    return total if reduction == "sum" or losses.numel() == 0 else total / losses.numel()
