"""The thinker's Whisper-style audio encoder (HF `Qwen2_5OmniAudioEncoder`), as pure functions.

Each clip's log-mel frames are cut into 2-second chunks (`2 * n_window` frames, the last one the
remainder); two convolutions (the second with stride 2) turn a chunk of c frames into (c - 1)//2 + 1
vectors, sinusoid positions restart in every chunk, and attention is block-diagonal per chunk.
Afterwards each clip is average-pooled in pairs, normalised and projected to the LLM width:
L mel frames -> ((L - 1)//2 + 1) // 2 tokens (25 per second).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F

from omnicore.comm import LOCAL, Comm, row_linear
from omnicore.config import AudioConfig
from omnicore.layout import Split, TPPlan
from omnicore.models.positions import audio_token_count
from omnicore.models.recompute import run_layer
from omnicore.ops import Ops, Segments
from omnicore.params import Params, Shapes, select

__all__ = ["audio_param_shapes", "audio_tp_plan", "AudioLayout", "audio_layout", "audio_encoder", "audio_stem", "audio_layers", "audio_head", "audio_block", "MIN_MEL_FRAMES"]

MIN_MEL_FRAMES = 3  # fewer frames give zero tokens (HF crashes on them)


def audio_param_shapes(cfg: AudioConfig) -> Shapes:
    """Names (relative to "audio.") and shapes. `bos_eos.weight` is stored by HF but never used."""
    c, f = cfg.d_model, cfg.ffn
    shapes: Shapes = {
        "conv1.weight": (c, cfg.n_mels, 3),
        "conv1.bias": (c,),
        "conv2.weight": (c, c, 3),
        "conv2.bias": (c,),
        "bos_eos.weight": (2, cfg.output_dim),
    }
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn_norm.weight": (c,),
            p + "attn_norm.bias": (c,),
            p + "attn.q.weight": (c, c),
            p + "attn.q.bias": (c,),
            p + "attn.k.weight": (c, c),  # Whisper convention: k has no bias
            p + "attn.v.weight": (c, c),
            p + "attn.v.bias": (c,),
            p + "attn.o.weight": (c, c),
            p + "attn.o.bias": (c,),
            p + "mlp_norm.weight": (c,),
            p + "mlp_norm.bias": (c,),
            p + "mlp.fc1.weight": (f, c),
            p + "mlp.fc1.bias": (f,),
            p + "mlp.fc2.weight": (c, f),
            p + "mlp.fc2.bias": (c,),
        }
    shapes |= {
        "norm.weight": (c,),
        "norm.bias": (c,),
        "proj.weight": (cfg.output_dim, c),
        "proj.bias": (cfg.output_dim,),
    }
    return shapes


def audio_tp_plan(cfg: AudioConfig) -> TPPlan:
    """q / k / v and fc1 column parallel, o and fc2 row parallel (biases replicated). The convs
    and the output projection stay replicated: they are small, and a split projection would need
    an all-gather before the merge, where the replicated one needs nothing."""
    layer = r"audio\.layers\.\d+\."
    return (
        (layer + r"attn\.[qkv]\.(weight|bias)", Split(0, cfg.n_heads, "heads")),
        (layer + r"attn\.o\.weight", Split(1, cfg.n_heads, "heads")),
        (layer + r"mlp\.fc1\.(weight|bias)", Split(0, unit_name="ffn rows")),
        (layer + r"mlp\.fc2\.weight", Split(1, unit_name="ffn columns")),
        (
            layer + r"((attn|mlp)_norm\.(weight|bias)|attn\.o\.bias|mlp\.fc2\.bias)"
            r"|audio\.(conv1|conv2|norm|proj)\.(weight|bias)|audio\.bos_eos\.weight",
            None,
        ),
    )


@attrs.frozen
class AudioLayout:
    """Per-batch facts derived from the clips' mel lengths.

    mel_frames: each clip's frame count; chunk_frames: mel frames of every chunk, clip after clip; frame_mask (chunks, 1, Lmax) marks
    real frames before the convs; kept (chunks, L'max) marks real frames after them; chunks:
    attention segments over the kept frames; positions: (L'max, d_model) fp32 sinusoids;
    pool_first: index of the first frame of every pooled pair; tokens_per_clip: output tokens.
    """

    mel_frames: tuple[int, ...]
    chunk_frames: tuple[int, ...]
    frame_mask: torch.Tensor
    kept: torch.Tensor
    chunks: Segments
    positions: torch.Tensor
    pool_first: torch.Tensor
    tokens_per_clip: tuple[int, ...]


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's table: row p = [sin(p * inv_ts), cos(p * inv_ts)], inv_ts geometric over channels / 2."""
    half = channels // 2
    inv_ts = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_ts[None, :]
    return torch.cat((scaled.sin(), scaled.cos()), dim=1)


def audio_layout(cfg: AudioConfig, mel_frames: Sequence[int], device=None) -> AudioLayout:
    """Chunking, masks, segments and pooling indices for clips of `mel_frames` frames each."""
    mel_frames = [int(n) for n in mel_frames]
    short = [(i, n) for i, n in enumerate(mel_frames) if n < MIN_MEL_FRAMES]
    if short:
        clips = ", ".join(f"clip {i} has {n}" for i, n in short)
        raise ValueError(
            f"audio too short: {clips} mel frame(s); at least {MIN_MEL_FRAMES} (30 ms) are needed for one token"
        )
    size = cfg.chunk_frames
    chunk_frames: list[int] = []
    for n in mel_frames:
        full, rest = divmod(n, size)
        chunk_frames += [size] * full + ([rest] if rest else [])
    after_conv = [(c - 1) // 2 + 1 for c in chunk_frames]
    frames = torch.tensor(chunk_frames)
    kept_len = torch.tensor(after_conv)
    frame_mask = torch.arange(max(chunk_frames))[None, :] < frames[:, None]
    kept = torch.arange(max(after_conv))[None, :] < kept_len[:, None]
    tokens = [audio_token_count(n) for n in mel_frames]
    firsts, offset = [], 0
    for n in mel_frames:
        a = (n - 1) // 2 + 1
        firsts.append(offset + 2 * torch.arange(a // 2))
        offset += a
    return AudioLayout(
        mel_frames=tuple(mel_frames),
        chunk_frames=tuple(chunk_frames),
        frame_mask=frame_mask[:, None, :].to(device),
        kept=kept.to(device),
        chunks=Segments.from_lengths(after_conv, device),
        positions=_sinusoids(max(after_conv), cfg.d_model).to(device),
        pool_first=torch.cat(firsts).to(device),
        tokens_per_clip=tuple(tokens),
    )


def audio_block(params: Params, cfg: AudioConfig, x: torch.Tensor, chunks: Segments, *, ops: Ops, comm: Comm = LOCAL) -> torch.Tensor:
    """One pre-LayerNorm Whisper layer on (N, C); params relative to "audio.layers.{i}."."""
    n, c, d = x.shape[0], x.shape[1], cfg.head_dim
    h = comm.enter_tp(F.layer_norm(x, (c,), params["attn_norm.weight"], params["attn_norm.bias"], cfg.ln_eps))
    q = F.linear(h, params["attn.q.weight"], params["attn.q.bias"]).view(n, -1, d)
    k = F.linear(h, params["attn.k.weight"]).view(n, -1, d)
    v = F.linear(h, params["attn.v.weight"], params["attn.v.bias"]).view(n, -1, d)
    a = ops.attention(q, k, v, chunks, causal=False).reshape(n, -1)
    x = x + row_linear(a, params["attn.o.weight"], params["attn.o.bias"], comm=comm)
    h = comm.enter_tp(F.layer_norm(x, (c,), params["mlp_norm.weight"], params["mlp_norm.bias"], cfg.ln_eps))
    h = F.gelu(F.linear(h, params["mlp.fc1.weight"], params["mlp.fc1.bias"]))
    x = x + row_linear(h, params["mlp.fc2.weight"], params["mlp.fc2.bias"], comm=comm)
    if x.dtype == torch.float16:  # HF keeps fp16 activations finite the same way
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


def audio_stem(params: Params, cfg: AudioConfig, features: torch.Tensor, layout: AudioLayout) -> torch.Tensor:
    """(n_mels, sum L) log-mel frames -> (sum A, C): the two convs and positions, real frames only;
    params relative to "audio."."""
    if features.dim() != 2 or features.shape[0] != cfg.n_mels or features.shape[1] != sum(layout.chunk_frames):
        raise ValueError(
            f"audio features have shape {tuple(features.shape)}; the clip lengths need "
            f"({cfg.n_mels}, {sum(layout.chunk_frames)})"
        )
    w1 = params["conv1.weight"]
    chunks = features.to(w1.dtype).split(layout.chunk_frames, dim=1)
    # (chunks, Lmax, n_mels) zero-padded -> (chunks, n_mels, Lmax); zero padding equals the convs'
    # own zero padding, so a chunk's valid outputs do not depend on its neighbours' lengths.
    x = torch.nn.utils.rnn.pad_sequence([ch.T for ch in chunks], batch_first=True).transpose(1, 2)
    x = F.gelu(F.conv1d(x, w1, params["conv1.bias"], padding=1)) * layout.frame_mask
    x = F.gelu(F.conv1d(x, params["conv2.weight"], params["conv2.bias"], stride=2, padding=1))
    x = x.transpose(1, 2) + layout.positions.to(x.dtype)  # positions restart in every chunk
    return x[layout.kept]


def audio_layers(
    params: Params,
    cfg: AudioConfig,
    x: torch.Tensor,
    layout: AudioLayout,
    layers: range,
    *,
    ops: Ops,
    comm: Comm = LOCAL,
    recompute: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Layers `layers` (global indices) on (sum A, C); params relative to "audio."."""
    for i in layers:
        x = run_layer(audio_block, i in recompute, select(params, f"layers.{i}."), cfg, x, layout.chunks, ops=ops, comm=comm)
    return x


def audio_head(params: Params, cfg: AudioConfig, x: torch.Tensor, layout: AudioLayout) -> torch.Tensor:
    """Pool pairs of frames within each clip, LayerNorm, project -> (sum tokens, output_dim)."""
    x = (x[layout.pool_first] + x[layout.pool_first + 1]) * 0.5  # AvgPool1d(2, 2) within each clip
    x = F.layer_norm(x, (x.shape[1],), params["norm.weight"], params["norm.bias"], cfg.ln_eps)
    return F.linear(x, params["proj.weight"], params["proj.bias"])


def audio_encoder(
    params: Params,
    cfg: AudioConfig,
    features: torch.Tensor,
    layout: AudioLayout,
    *,
    ops: Ops,
    comm: Comm = LOCAL,
    recompute: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """(n_mels, sum L) log-mel frames of all clips back to back -> (sum tokens, output_dim).

    params relative to "audio."; layers in `recompute` are recomputed during backward. A pipeline
    stage runs the same three parts, each where the stage plan puts it.
    """
    x = audio_stem(params, cfg, features, layout)
    x = audio_layers(params, cfg, x, layout, range(cfg.n_layers), ops=ops, comm=comm, recompute=recompute)
    return audio_head(params, cfg, x, layout)
