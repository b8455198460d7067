"""Incremental decoding of the thinker over a preallocated KV cache (HF `generate`'s cached path).

`prefill` runs a batch of prompts (with their media) once: `prepare_inputs` packs the rows' real
tokens back to back, `embed_inputs` merges the encoder features, and every decoder layer writes
its keys / values into the cache before attending within each prompt. `decode_step` then feeds
one new token per row: its keys / values go into slot `lengths[b]` of the row's cache and its
query attends over slots 0 .. lengths[b] (`ops.cached_attention`, bottom-right aligned causal).

Rows never hold padding: row b's cache keeps exactly its own tokens, so prompts of any lengths
(a left- or right-padded batch, or a packed one with `cu_seqlens`) decode side by side. Positions
continue after a multimodal prompt with the rope delta (qwen2_5_omni.md 3.5): the next token of
row b sits at lengths[b] + rope_deltas[b], the same on all three M-RoPE axes.

The cache is the caller's buffer (DESIGN.md section 11): these functions write into it in place
and never touch the parameters. Single process only (no `comm`): inference loads unsharded params.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from omnicore.config import ThinkerConfig
from omnicore.models.text import mrope_tables, text_block_rest, text_embed, text_head, text_qkv
from omnicore.models.thinker import ThinkerInputs, embed_inputs, prepare_inputs
from omnicore.ops import Ops, resolve
from omnicore.params import Params, select

__all__ = ["KVCache", "CacheFullError", "DecoderParams", "decoder_params", "allocate_cache", "prefill", "decode_step"]


class CacheFullError(ValueError):
    """A prompt or a new token that does not fit the KV cache (or the model's positions)."""


@attrs.define(eq=False)
class KVCache:
    """Keys and values of every decoder layer for B rows, plus each row's decoding state.

    k[i], v[i]: layer i's buffers (B, capacity, Hkv_local, D); slots 0 .. lengths[b] - 1 of row b
    hold its tokens, later slots are unused. rope_deltas (B,) int64: row b's next token sits at
    position lengths[b] + rope_deltas[b]. Written in place by `prefill` (which resets every row)
    and `decode_step`; reusable for the next batch of the same size.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: list[int]
    rope_deltas: torch.Tensor
    # cos / sin (P, D) of every position a decode step can reach (equal on the three axes), built by
    # `prefill` once instead of one small M-RoPE table per step.
    rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]


@attrs.frozen
class DecoderParams:
    """The decoder's weights split per layer once, so a decode step selects nothing (`decoder_params`)."""

    layers: tuple[Params, ...]
    text: Params
    lm_head: torch.Tensor


def decoder_params(params: Params | DecoderParams, cfg: ThinkerConfig) -> DecoderParams:
    """The text decoder's slice of `params`, layer by layer (views, no copies)."""
    if isinstance(params, DecoderParams):
        return params
    text = select(params, "text.")
    return DecoderParams(layers=tuple(select(text, f"layers.{i}.") for i in range(cfg.text.n_layers)), text=text, lm_head=params["lm_head.weight"])


def allocate_cache(
    params: Params,
    cfg: ThinkerConfig,
    *,
    batch_size: int,
    capacity: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache:
    """An empty cache for `batch_size` rows of up to `capacity` tokens each.

    Heads per layer are read from the k projection (local heads under a TP shard); dtype and
    device default to that weight's.
    """
    if batch_size < 1 or capacity < 1:
        raise ValueError(f"a KV cache needs batch_size >= 1 and capacity >= 1, got {batch_size} and {capacity}")
    weight = params["text.layers.0.attn.k.weight"]
    kv_heads, d = weight.shape[0] // cfg.text.head_dim, cfg.text.head_dim
    dtype, device = dtype or weight.dtype, device or weight.device

    def buffers() -> list[torch.Tensor]:
        return [torch.zeros(batch_size, capacity, kv_heads, d, dtype=dtype, device=device) for _ in range(cfg.text.n_layers)]

    return KVCache(k=buffers(), v=buffers(), lengths=[0] * batch_size, rope_deltas=torch.zeros(batch_size, dtype=torch.long, device=device))


def _deltas(inputs: ThinkerInputs) -> torch.Tensor:
    """(S,) rope delta per prompt: given by `prepare_inputs`, or from caller-supplied positions."""
    if inputs.rope_deltas is not None:
        return inputs.rope_deltas.reshape(-1)
    # position_ids came with the batch: delta = max position + 1 - tokens, per prompt.
    seg = inputs.segments.segment_ids()
    top = torch.full((len(inputs.segments.lengths),), -1, dtype=torch.long, device=seg.device)
    top = top.scatter_reduce(0, seg, inputs.positions.max(0).values.long(), reduce="amax")
    return top + 1 - torch.tensor(inputs.segments.lengths, device=seg.device)


@torch.no_grad()
def prefill(
    params: Params, cfg: ThinkerConfig, cache: KVCache, batch: Mapping[str, Any] | ThinkerInputs, *, ops: Ops | None = None
) -> torch.Tensor:
    """Run the prompts, fill the cache (every row reset), return each prompt's last logits (B, V).

    `batch` uses the thinker's key names: `input_ids` (B, T) with `attention_mask` (any padding
    side), or packed with `cu_seqlens`; media keys as for `prepare_inputs`. Labels are ignored.
    Raises `CacheFullError` when a prompt is longer than the cache and ValueError for an empty row.
    """
    inputs = batch if isinstance(batch, ThinkerInputs) else prepare_inputs(cfg, {k: v for k, v in batch.items() if k != "labels"})
    ops = ops or resolve("auto", inputs.input_ids.device)
    segments, rows = inputs.segments, len(inputs.segments.lengths)
    if inputs.rows is not None and rows != inputs.batch_shape[0]:
        raise ValueError(f"{inputs.batch_shape[0] - rows} prompt row(s) of the batch have no tokens")
    if rows != cache.batch_size:
        raise ValueError(f"the batch has {rows} prompt(s) but the KV cache was allocated for {cache.batch_size}")
    longest = segments.max_len
    if longest > cache.capacity:
        raise CacheFullError(f"a prompt of {longest} tokens does not fit the KV cache of {cache.capacity} tokens")
    x = embed_inputs(params, cfg, inputs, ops=ops)
    rope = mrope_tables(cfg.text, inputs.positions, x.dtype)
    # Cache slot of every packed token: (its prompt, its offset in the prompt).
    row = segments.segment_ids()
    slot = torch.arange(row.numel(), device=row.device) - segments.cu_seqlens.to(row.device).long()[row]
    for i in range(cfg.text.n_layers):
        layer = select(params, f"text.layers.{i}.")
        q, k, v = text_qkv(layer, cfg.text, x, rope, ops=ops)
        cache.k[i].index_put_((row, slot), k.to(cache.k[i].dtype))
        cache.v[i].index_put_((row, slot), v.to(cache.v[i].dtype))
        x = text_block_rest(layer, cfg.text, x, ops.attention(q, k, v, segments, causal=True), ops=ops)
    cache.lengths[:] = segments.lengths
    cache.rope_deltas.copy_(_deltas(inputs))
    # Decode positions run from lengths + delta up to capacity - 1 + delta, all three axes alike.
    reach = cache.capacity + max(0, int(cache.rope_deltas.max()))
    cache.rope = mrope_tables(cfg.text, torch.arange(reach, device=x.device).expand(3, -1), x.dtype)
    last = segments.cu_seqlens[1:].long() - 1
    return text_head(select(params, "text."), cfg.text, x[last], params["lm_head.weight"], ops=ops)


@torch.no_grad()
def decode_step(
    params: Params | DecoderParams, cfg: ThinkerConfig, cache: KVCache, tokens: torch.Tensor, *, ops: Ops | None = None
) -> torch.Tensor:
    """Feed one token per row (B,), append its keys / values to the cache, return the next logits (B, V).

    `params` may be the thinker's dict or its `decoder_params` (built once per generation: a decode
    step then does no per-layer dictionary work).
    """
    if tokens.shape != (cache.batch_size,):
        raise ValueError(f"decode_step takes one token per cache row, shape ({cache.batch_size},), got {tuple(tokens.shape)}")
    if max(cache.lengths) >= cache.capacity:
        raise CacheFullError(f"the KV cache is full ({cache.capacity} tokens per row): no room for another token")
    ops = ops or resolve("auto", tokens.device)
    weights = decoder_params(params, cfg)
    device = cache.rope_deltas.device
    slot = torch.tensor(cache.lengths, device=device)
    rows = torch.arange(cache.batch_size, device=device)
    x = text_embed(weights.text, tokens.to(device))  # (B, C)
    # Decoding positions advance all three axes together (qwen2_5_omni.md 3.5).
    positions = slot + cache.rope_deltas
    if cache.rope is not None and cache.rope[0].dtype == x.dtype:
        rope = (cache.rope[0][positions], cache.rope[1][positions])
    else:
        rope = mrope_tables(cfg.text, positions.expand(3, -1), x.dtype)
    kv_lengths = [n + 1 for n in cache.lengths]
    for i, layer in enumerate(weights.layers):
        q, k, v = text_qkv(layer, cfg.text, x, rope, ops=ops)  # (B, H, D), (B, Hkv, D)
        cache.k[i].index_put_((rows, slot), k.to(cache.k[i].dtype))
        cache.v[i].index_put_((rows, slot), v.to(cache.v[i].dtype))
        a = ops.cached_attention(q[:, None], cache.k[i], cache.v[i], kv_lengths)  # (B, 1, H, D)
        x = text_block_rest(layer, cfg.text, x, a, ops=ops)
    cache.lengths[:] = kv_lengths
    return text_head(weights.text, cfg.text, x, weights.lm_head, ops=ops)
