"""The thinker's Qwen2 decoder (HF `Qwen2_5OmniThinkerTextModel` + `lm_head`), as pure functions.

Activations are token-major (N, C): the valid tokens of every sample back to back, with `Segments`
marking the samples (causal attention never crosses them), so padding costs nothing. Pre-norm
blocks: RMSNorm -> q/k/v (bias) -> 3-D M-RoPE -> causal GQA attention -> o (no bias); RMSNorm ->
SwiGLU MLP (no bias). Local head counts are read from the weights, so a TP shard runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnicore.comm import LOCAL, Comm, row_linear
from omnicore.config import TextConfig
from omnicore.layout import Split, TPPlan
from omnicore.models.recompute import run_layer
from omnicore.ops import Ops, Segments
from omnicore.params import Params, Shapes, select

__all__ = [
    "text_param_shapes",
    "text_tp_plan",
    "mrope_tables",
    "text_embed",
    "text_block",
    "text_qkv",
    "text_block_rest",
    "text_layers",
    "text_head",
]


def text_param_shapes(cfg: TextConfig) -> Shapes:
    """Names (relative to "text.") and full shapes of the decoder; lm_head is top-level."""
    c, kv, f = cfg.hidden, cfg.n_kv_heads * cfg.head_dim, cfg.ffn
    shapes: Shapes = {"embed.weight": (cfg.vocab_size, c)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn_norm.weight": (c,),
            p + "attn.q.weight": (c, c),
            p + "attn.q.bias": (c,),
            p + "attn.k.weight": (kv, c),
            p + "attn.k.bias": (kv,),
            p + "attn.v.weight": (kv, c),
            p + "attn.v.bias": (kv,),
            p + "attn.o.weight": (c, c),
            p + "mlp_norm.weight": (c,),
            p + "mlp.gate.weight": (f, c),
            p + "mlp.up.weight": (f, c),
            p + "mlp.down.weight": (c, f),
        }
    shapes["norm.weight"] = (c,)
    return shapes


def text_tp_plan(cfg: TextConfig) -> TPPlan:
    """Megatron-style TP over full native names: q / k / v and gate / up column parallel, o and down
    row parallel (their inputs arrive split), embedding and lm_head vocab parallel, norms replicated.
    k / v split by kv heads and, when the TP size exceeds them, each rank keeps the kv head its
    query heads read."""
    layer = r"text\.layers\.\d+\."
    return (
        (r"text\.embed\.weight|lm_head\.weight", Split(0, unit_name="vocabulary rows")),
        (layer + r"attn\.q\.(weight|bias)", Split(0, cfg.n_heads, "query heads")),
        (layer + r"attn\.[kv]\.(weight|bias)", Split(0, cfg.n_kv_heads, "kv heads", replicate_short=True)),
        (layer + r"attn\.o\.weight", Split(1, cfg.n_heads, "query heads")),
        (layer + r"mlp\.(gate|up)\.weight", Split(0, unit_name="ffn rows")),
        (layer + r"mlp\.down\.weight", Split(1, unit_name="ffn columns")),
        (layer + r"(attn|mlp)_norm\.weight|text\.norm\.weight", None),
    )


def mrope_tables(cfg: TextConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) for 3-D positions (3, N), built once per batch for every layer.

    Frequency slot j (of head_dim / 2) takes its angle from axis t, h or w by `mrope_section`
    (16 / 24 / 24 slots for the 7B model); the half is duplicated for the rotate-half pairing.
    Angles in fp32, then cast to the activation dtype (HF does the same).
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) / half)
    axis = torch.repeat_interleave(torch.arange(3, device=positions.device), torch.tensor(cfg.mrope_section, device=positions.device))
    pos = positions.to(torch.float32)[axis]  # (half, N): the axis each slot reads
    angles = pos.T * inv_freq  # (N, half)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def text_embed(params: Params, input_ids: torch.Tensor, *, comm: Comm = LOCAL) -> torch.Tensor:
    """(N,) token ids -> (N, C) embeddings; params relative to "text.".

    Vocab parallel under TP: this rank holds rows [rank * V_local, (rank + 1) * V_local); ids outside
    them embed to zero here and the ranks' partial embeddings are summed (`exit_tp`).
    """
    weight = params["embed.weight"]
    if comm.tp_size == 1:
        return F.embedding(input_ids, weight)
    local = input_ids - comm.tp_rank * weight.shape[0]
    mine = (local >= 0) & (local < weight.shape[0])
    partial = F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * mine[:, None].to(weight.dtype)
    return comm.exit_tp(partial)


def text_block(
    params: Params,
    cfg: TextConfig,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    segments: Segments,
    *,
    ops: Ops,
    comm: Comm = LOCAL,
) -> torch.Tensor:
    """One decoder layer on (N, C); params relative to "text.layers.{i}."."""
    q, k, v = text_qkv(params, cfg, x, rope, ops=ops, comm=comm)
    a = ops.attention(q, k, v, segments, causal=True)
    return text_block_rest(params, cfg, x, a, ops=ops, comm=comm)


def text_qkv(
    params: Params, cfg: TextConfig, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], *, ops: Ops, comm: Comm = LOCAL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention half's inputs of one layer: RMSNorm, q / k / v projections and M-RoPE.

    x (N, C) -> q (N, H_local, D), k and v (N, Hkv_local, D). Shared by `text_block` and the
    decoder of omnicore.models.decode, which writes k / v into its cache between the halves.
    """
    h = comm.enter_tp(ops.rms_norm(x, params["attn_norm.weight"], cfg.rms_eps))
    n, d = h.shape[0], cfg.head_dim  # all tokens (under sequence parallelism x holds 1 / tp of them)
    q = F.linear(h, params["attn.q.weight"], params["attn.q.bias"]).view(n, -1, d)
    k = F.linear(h, params["attn.k.weight"], params["attn.k.bias"]).view(n, -1, d)
    v = F.linear(h, params["attn.v.weight"], params["attn.v.bias"]).view(n, -1, d)
    cos, sin = rope
    return ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin), v


def text_block_rest(
    params: Params, cfg: TextConfig, x: torch.Tensor, a: torch.Tensor, *, ops: Ops, comm: Comm = LOCAL
) -> torch.Tensor:
    """The rest of a layer after attention: output projection and residual, then the MLP half.

    x (N, C) the layer's input, a (N, H_local, D) the attention output -> (N, C).
    """
    x = x + row_linear(a.reshape(a.shape[0], -1), params["attn.o.weight"], comm=comm)
    h = comm.enter_tp(ops.rms_norm(x, params["mlp_norm.weight"], cfg.rms_eps))
    m = ops.swiglu(F.linear(h, params["mlp.gate.weight"]), F.linear(h, params["mlp.up.weight"]))
    return x + row_linear(m, params["mlp.down.weight"], comm=comm)


def text_layers(
    params: Params,
    cfg: TextConfig,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    segments: Segments,
    layer_ids: range | list[int],
    *,
    ops: Ops,
    comm: Comm = LOCAL,
    recompute: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Run decoder layers `layer_ids` (global indices), recomputing those in `recompute` during
    backward; params relative to "text."."""
    for i in layer_ids:
        x = run_layer(text_block, i in recompute, select(params, f"layers.{i}."), cfg, x, rope, segments, ops=ops, comm=comm)
    return x


def text_head(params: Params, cfg: TextConfig, x: torch.Tensor, lm_head: torch.Tensor, *, ops: Ops, comm: Comm = LOCAL) -> torch.Tensor:
    """Final RMSNorm and the vocabulary projection: (N, C) -> (N, V / tp), this rank's vocab slice."""
    return F.linear(comm.enter_tp(ops.rms_norm(x, params["norm.weight"], cfg.rms_eps)), lm_head)

