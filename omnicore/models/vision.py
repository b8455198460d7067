"""The thinker's vision encoder (HF `Qwen2_5OmniVisionEncoder`), as pure functions.

Input rows of `pixel_values` are 2x14x14x3 patches in merge-block order (every 4 consecutive rows
form one 2x2 merged token). The encoder permutes merged tokens into window order once, runs all
blocks there (window attention inside 4x4-token windows, full attention inside one temporal slice
for `fullatt_blocks`), merges 2x2 patches and permutes back. Everything that depends only on the
grids (window order, segments, 2-D rotary tables) is computed once per batch in `VisionLayout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F

from omnicore.comm import LOCAL, Comm, row_linear
from omnicore.config import VisionConfig
from omnicore.layout import Split, TPPlan
from omnicore.models.recompute import run_layer
from omnicore.ops import Ops, Segments
from omnicore.params import Params, Shapes, select

__all__ = ["vision_param_shapes", "vision_tp_plan", "VisionLayout", "vision_layout", "vision_encoder", "vision_stem", "vision_blocks", "vision_head", "vision_block", "window_order"]


def vision_param_shapes(cfg: VisionConfig) -> Shapes:
    """Names (relative to "vision.") and shapes; the Conv3d kernel keeps its HF 5-D shape."""
    c, f = cfg.hidden, cfg.ffn
    p = cfg.patch_size
    shapes: Shapes = {"patch_embed.weight": (c, cfg.in_channels, cfg.temporal_patch_size, p, p)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes |= {b + "attn_norm.weight": (c,)}
        for proj in ("q", "k", "v", "o"):
            shapes |= {b + f"attn.{proj}.weight": (c, c), b + f"attn.{proj}.bias": (c,)}
        shapes |= {b + "mlp_norm.weight": (c,)}
        for proj, shape in (("gate", (f, c)), ("up", (f, c)), ("down", (c, f))):
            shapes |= {b + f"mlp.{proj}.weight": shape, b + f"mlp.{proj}.bias": (shape[0],)}
    merged = c * cfg.merge_unit
    shapes |= {
        "merger.norm.weight": (c,),
        "merger.fc1.weight": (merged, merged),
        "merger.fc1.bias": (merged,),
        "merger.fc2.weight": (cfg.out_hidden, merged),
        "merger.fc2.bias": (cfg.out_hidden,),
    }
    return shapes


def vision_tp_plan(cfg: VisionConfig) -> TPPlan:
    """q / k / v and gate / up column parallel, o and down row parallel (biases replicated, added
    after the reduction); merger fc1 column, fc2 row; patch embed and norms replicated."""
    block = r"vision\.blocks\.\d+\."
    return (
        (block + r"attn\.[qkv]\.(weight|bias)", Split(0, cfg.n_heads, "heads")),
        (block + r"attn\.o\.weight", Split(1, cfg.n_heads, "heads")),
        (block + r"mlp\.(gate|up)\.(weight|bias)", Split(0, unit_name="ffn rows")),
        (block + r"mlp\.down\.weight", Split(1, unit_name="ffn columns")),
        (r"vision\.merger\.fc1\.(weight|bias)", Split(0, unit_name="merger rows")),
        (r"vision\.merger\.fc2\.weight", Split(1, unit_name="merger columns")),
        (
            block + r"((attn|mlp)_norm\.weight|attn\.o\.bias|mlp\.down\.bias)"
            r"|vision\.patch_embed\.weight|vision\.merger\.(norm\.weight|fc2\.bias)",
            None,
        ),
    )


@attrs.frozen
class VisionLayout:
    """Per-batch facts derived from the grids.

    order: (U,) merged-token permutation into window order; restore: its inverse.
    windows / slices: patch segments for window and full-attention blocks (in window order).
    cos, sin: (N, head_dim) fp32 2-D rotary tables in window order.
    tokens_per_item: merged tokens of each image / video (t * h * w / 4).
    """

    order: torch.Tensor
    restore: torch.Tensor
    windows: Segments
    slices: Segments
    cos: torch.Tensor
    sin: torch.Tensor
    tokens_per_item: tuple[int, ...]


def window_order(cfg: VisionConfig, grid: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Merged-token order of one item grouped by window, and the merged tokens in each window.

    Windows are `window_units` merged tokens on a side, tiled from the top-left of each temporal
    slice, ordered (t, window row, window col), raster order inside. Edge windows are smaller.
    """
    t, gh, gw = grid[0], grid[1] // cfg.spatial_merge_size, grid[2] // cfg.spatial_merge_size
    ws = cfg.window_units
    nh, nw = -(-gh // ws), -(-gw // ws)
    index = torch.full((t, nh * ws, nw * ws), -1, dtype=torch.long)
    index[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw)
    # (t, nh, ws, nw, ws) -> (t, nh, nw, ws, ws): one row per window
    windows = index.view(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(-1, ws * ws)
    valid = windows >= 0
    return windows[valid], valid.sum(-1).tolist()


def _rotary_angles(cfg: VisionConfig, grid: Sequence[int]) -> torch.Tensor:
    """(t*h*w, head_dim / 2) angles of each patch row in merge-block order: [row freqs, col freqs]."""
    t, h, w = grid
    m = cfg.spatial_merge_size
    quarter = cfg.head_dim // 4
    inv_freq = 1.0 / 10000 ** (torch.arange(0, quarter, dtype=torch.float32) * 2 / (cfg.head_dim // 2))
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)

    def merge_order(a: torch.Tensor) -> torch.Tensor:  # (h, w) raster -> 2x2 blocks, block raster
        return a.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)

    angles = torch.cat(
        (merge_order(rows)[:, None] * inv_freq, merge_order(cols)[:, None] * inv_freq), dim=-1
    )
    return angles.repeat(t, 1)


def vision_layout(cfg: VisionConfig, grid_thw: torch.Tensor | Sequence[Sequence[int]], device=None) -> VisionLayout:
    """Everything the encoder needs that depends only on `grid_thw` (n_items, 3)."""
    grids = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
    for i, (t, h, w) in enumerate(grids):
        m = cfg.spatial_merge_size
        if t < 1 or h % m or w % m or h < m or w < m:
            raise ValueError(f"grid_thw[{i}] = {[t, h, w]}: t must be >= 1 and h, w positive multiples of {m}")
    orders, window_sizes, slice_sizes, angles, offset = [], [], [], [], 0
    for grid in grids:
        order, sizes = window_order(cfg, grid)
        orders.append(order + offset)
        offset += order.numel()
        window_sizes += [s * cfg.merge_unit for s in sizes]
        slice_sizes += [grid[1] * grid[2]] * grid[0]
        angles.append(_rotary_angles(cfg, grid))
    order = torch.cat(orders)
    u = cfg.merge_unit
    angles = torch.cat(angles).view(-1, u, cfg.head_dim // 2)[order].view(-1, cfg.head_dim // 2)
    angles = torch.cat((angles, angles), dim=-1)
    return VisionLayout(
        order=order.to(device),
        restore=torch.argsort(order).to(device),
        windows=Segments.from_lengths(window_sizes, device),
        slices=Segments.from_lengths(slice_sizes, device),
        cos=angles.cos().to(device),
        sin=angles.sin().to(device),
        tokens_per_item=tuple(t * h * w // u for t, h, w in grids),
    )


def vision_block(
    params: Params,
    cfg: VisionConfig,
    x: torch.Tensor,
    layout: VisionLayout,
    segments: Segments,
    *,
    ops: Ops,
    comm: Comm = LOCAL,
) -> torch.Tensor:
    """One ViT block on (N, C) patches in window order; params relative to "vision.blocks.{i}."."""
    n, d = x.shape[0], cfg.head_dim
    h = comm.enter_tp(ops.rms_norm(x, params["attn_norm.weight"], cfg.rms_eps))
    q, k, v = (F.linear(h, params[f"attn.{p}.weight"], params[f"attn.{p}.bias"]).view(n, -1, d) for p in "qkv")
    # fp32 tables: the rotation runs in fp32 and is cast back, as HF does for the vision tower.
    q, k = ops.apply_rope(q, layout.cos, layout.sin), ops.apply_rope(k, layout.cos, layout.sin)
    a = ops.attention(q, k, v, segments, causal=False).reshape(n, -1)
    x = x + row_linear(a, params["attn.o.weight"], params["attn.o.bias"], comm=comm)
    h = comm.enter_tp(ops.rms_norm(x, params["mlp_norm.weight"], cfg.rms_eps))
    gate = F.linear(h, params["mlp.gate.weight"], params["mlp.gate.bias"])
    up = F.linear(h, params["mlp.up.weight"], params["mlp.up.bias"])
    return x + row_linear(ops.swiglu(gate, up), params["mlp.down.weight"], params["mlp.down.bias"], comm=comm)


def vision_stem(params: Params, cfg: VisionConfig, pixel_values: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
    """(N, patch_dim) patches -> (N, C) patch embeddings in window order; params relative to "vision."."""
    n, u = pixel_values.shape[0], cfg.merge_unit
    if pixel_values.shape[1] != cfg.patch_dim or n != layout.order.numel() * u:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}; the grids need "
            f"({layout.order.numel() * u}, {cfg.patch_dim})"
        )
    w = params["patch_embed.weight"]
    # Conv3d with kernel == stride over one patch is a matmul with the flattened kernel.
    x = F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1))
    return x.view(-1, u, x.shape[-1])[layout.order].reshape(n, -1)  # window order, 4 patches per unit


def vision_blocks(
    params: Params,
    cfg: VisionConfig,
    x: torch.Tensor,
    layout: VisionLayout,
    blocks: range,
    *,
    ops: Ops,
    comm: Comm = LOCAL,
    recompute: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Blocks `blocks` (global indices) on (N, C) patches in window order; params relative to "vision."."""
    full = set(cfg.fullatt_blocks)
    for i in blocks:
        segments = layout.slices if i in full else layout.windows
        x = run_layer(vision_block, i in recompute, select(params, f"blocks.{i}."), cfg, x, layout, segments, ops=ops, comm=comm)
    return x


def vision_head(params: Params, cfg: VisionConfig, x: torch.Tensor, layout: VisionLayout, *, ops: Ops, comm: Comm = LOCAL) -> torch.Tensor:
    """The merger on the last block's output -> (N / 4, out_hidden) tokens in item / raster order."""
    return _merge(select(params, "merger."), cfg, x, comm=comm, ops=ops)[layout.restore]


def vision_encoder(
    params: Params,
    cfg: VisionConfig,
    pixel_values: torch.Tensor,
    layout: VisionLayout,
    *,
    ops: Ops,
    comm: Comm = LOCAL,
    recompute: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """(N, patch_dim) patches -> (N / 4, out_hidden) merged tokens in item / raster order.

    params relative to "vision."; blocks in `recompute` are recomputed during backward. A pipeline
    stage runs the same three parts, each where the stage plan puts it.
    """
    x = vision_stem(params, cfg, pixel_values, layout)
    x = vision_blocks(params, cfg, x, layout, range(cfg.depth), ops=ops, comm=comm, recompute=recompute)
    return vision_head(params, cfg, x, layout, ops=ops, comm=comm)


def _merge(params: Params, cfg: VisionConfig, x: torch.Tensor, *, ops: Ops, comm: Comm) -> torch.Tensor:
    """RMSNorm, group 4 consecutive patches (one 2x2 unit), MLP with exact GELU -> (N / 4, out)."""
    h = ops.rms_norm(x, params["norm.weight"], cfg.rms_eps).reshape(-1, x.shape[-1] * cfg.merge_unit)
    h = F.gelu(F.linear(comm.enter_tp(h), params["fc1.weight"], params["fc1.bias"]))
    return row_linear(h, params["fc2.weight"], params["fc2.bias"], comm=comm)
