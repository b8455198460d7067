"""Test helpers: tiny HF thinkers built from omnicore configs, and hand-built multimodal batches.

Batches are assembled from "pieces" (text runs and media blocks) exactly as the HF processor lays
them out (qwen2_5_omni.md section 5.2), written here independently of omnicore's position code:
audio-in-video chunks are formed by value range (floor(t / 50)), the processor's rule for fps >= 1.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from omnicore.checkpoint.hf import native_to_hf, params_to_hf
from omnicore.config import AudioConfig, TextConfig, ThinkerConfig, TokenIds, VisionConfig, TINY
from omnicore.models.positions import audio_token_count
from omnicore.models.thinker import init_thinker

# A second tiny shape: plain multi-head attention, even depth, other mrope split, shorter audio chunks.
TINY_MHA = ThinkerConfig(
    text=TextConfig(
        vocab_size=400, hidden=48, n_layers=2, n_heads=3, n_kv_heads=3, ffn=80,
        rope_theta=10000.0, rms_eps=1e-5, mrope_section=(4, 2, 2),
    ),
    vision=VisionConfig(
        depth=3, hidden=24, n_heads=2, ffn=40, in_channels=3, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, window_size=84, fullatt_blocks=(2,), out_hidden=48,
    ),
    audio=AudioConfig(
        n_mels=128, d_model=24, n_layers=3, n_heads=3, ffn=40, max_source_positions=200,
        n_window=50, output_dim=48,
    ),
    tokens=TokenIds(audio=390, audio_start=391, audio_end=392, vision_start=393, vision_end=394, image=395, video=396),
    position_id_per_seconds=25,
    seconds_per_chunk=2,
)  # fmt: skip

CONFIGS = {"tiny_gqa": TINY, "tiny_mha": TINY_MHA}
PARITY_STD = 0.25  # large enough that logits are O(1) on the tiny shapes


def hf_thinker_config(cfg: ThinkerConfig):
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(**cfg.to_hf())


def hf_thinker(cfg: ThinkerConfig, folder: Path, *, seed: int = 0, std: float = PARITY_STD, attn: str = "sdpa"):
    """A random HF thinker saved with `save_pretrained` to `folder`, and the model itself (fp32, eval)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(hf_thinker_config(cfg), attn_implementation=attn)
    weights = params_to_hf(init_thinker(cfg, seed=seed, std=std), prefix="")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not [m for m in missing if "inv_freq" not in m and "positional_embedding" not in m]
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@attrs.define
class Piece:
    kind: str  # text | image | video | audio | video_audio
    n: int = 0  # text tokens, or mel frames for audio / video_audio
    grid: tuple[int, int, int] = (1, 2, 2)
    fps: float = 2.0


def _video_values(cfg: ThinkerConfig, grid, fps) -> list[int]:
    m2 = cfg.vision.spatial_merge_size**2
    spg = cfg.vision.temporal_patch_size / fps
    per_grid = grid[1] * grid[2] // m2
    return [int(k * spg * cfg.position_id_per_seconds) for k in range(grid[0]) for _ in range(per_grid)]


def piece_tokens(cfg: ThinkerConfig, p: Piece, gen: torch.Generator) -> list[int]:
    tok = cfg.tokens
    m2 = cfg.vision.spatial_merge_size**2
    if p.kind == "text":
        return torch.randint(0, min(tok.audio, tok.image) - 10, (p.n,), generator=gen).tolist()
    if p.kind == "image":
        return [tok.vision_start] + [tok.image] * (p.grid[0] * p.grid[1] * p.grid[2] // m2) + [tok.vision_end]
    if p.kind == "video":
        return [tok.vision_start] + [tok.video] * (p.grid[0] * p.grid[1] * p.grid[2] // m2) + [tok.vision_end]
    if p.kind == "audio":
        return [tok.audio_start] + [tok.audio] * audio_token_count(p.n) + [tok.audio_end]
    if p.kind == "video_audio":
        chunk = cfg.position_id_per_seconds * cfg.seconds_per_chunk
        video = [v // chunk for v in _video_values(cfg, p.grid, p.fps)]
        audio = [v // chunk for v in range(audio_token_count(p.n))]
        body = []
        for j in range(max(video + audio) + 1):
            body += [tok.video] * video.count(j) + [tok.audio] * audio.count(j)
        return [tok.vision_start, tok.audio_start] + body + [tok.audio_end, tok.vision_end]
    raise ValueError(p.kind)


def build_batch(cfg: ThinkerConfig, rows: list[list[Piece]], *, seed: int = 0, padding: str = "left") -> dict:
    """A padded batch dict with HF processor keys, random media and labels (-100 on media and padding)."""
    gen = torch.Generator().manual_seed(seed)
    tok = cfg.tokens
    seqs, images, videos, spg, audios = [], [], [], [], []
    for row in rows:
        ids = []
        for p in row:
            ids += piece_tokens(cfg, p, gen)
            if p.kind == "image":
                images.append(p.grid)
            if p.kind in ("video", "video_audio"):
                videos.append(p.grid)
                spg.append(cfg.vision.temporal_patch_size / p.fps)
            if p.kind in ("audio", "video_audio"):
                audios.append(p.n)
        seqs.append(ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        lo = width - len(s) if padding == "left" else 0
        input_ids[i, lo : lo + len(s)] = torch.tensor(s)
        mask[i, lo : lo + len(s)] = 1
    labels = input_ids.clone()
    media = torch.tensor([tok.image, tok.video, tok.audio])
    labels[torch.isin(input_ids, media) | (mask == 0)] = -100
    # HF shifts labels over the padded row, so with left padding the last pad position "predicts"
    # a row's first token; real SFT data never labels that token (it is <|im_start|>), so neither do we.
    labels[torch.arange(len(seqs)), mask.argmax(1)] = -100
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    patch_dim = cfg.vision.patch_dim
    if images:
        batch["image_grid_thw"] = torch.tensor(images)
        batch["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), patch_dim, generator=gen)
    if videos:
        batch["video_grid_thw"] = torch.tensor(videos)
        batch["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in videos), patch_dim, generator=gen)
        batch["video_second_per_grid"] = torch.tensor(spg)
    if audios:
        frames = max(audios)
        feats = torch.zeros(len(audios), cfg.audio.n_mels, frames + 7)  # extra padding, as HF pads to 30000
        fmask = torch.zeros(len(audios), frames + 7, dtype=torch.long)
        for i, n in enumerate(audios):
            feats[i, :, :n] = torch.randn(cfg.audio.n_mels, n, generator=gen)
            fmask[i, :n] = 1
        batch["input_features"] = feats
        batch["feature_attention_mask"] = fmask
    if any(p.kind == "video_audio" for row in rows for p in row):
        batch["use_audio_in_video"] = True
    return batch


def hf_kwargs(batch: dict) -> dict:
    """The batch as keyword arguments for the HF thinker's forward."""
    return {k: v for k, v in batch.items() if k != "labels"} | {"labels": batch.get("labels")}


def full_omni_folder(cfg: ThinkerConfig, folder: Path, *, seed: int = 0, std: float = PARITY_STD, thinker_dtype=torch.float32):
    """A complete tiny `Qwen2_5OmniForConditionalGeneration` (thinker + talker + token2wav) saved by
    transformers in several shards, with a `spk_dict.pt` and tokenizer-like side files."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    t = cfg.tokens
    talker = dict(
        vocab_size=64, hidden_size=32, embedding_size=cfg.text.hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        rope_scaling={"mrope_section": [2, 3, 3], "type": "default", "rope_type": "default"},
        audio_token_index=t.audio, image_token_index=t.image, video_token_index=t.video,
        vision_start_token_id=t.vision_start, vision_end_token_id=t.vision_end,
        audio_start_token_id=t.audio_start, audio_end_token_id=t.audio_end,
        tts_text_start_token_id=10, tts_text_end_token_id=11, tts_text_pad_token_id=12,
        tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62, tts_codec_mask_token_id=63,
    )  # fmt: skip
    dit = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ff_mult=2, emb_dim=16, head_dim=16, block_size=4,
        look_ahead_layers=[1], look_backward_layers=[0], num_embeds=64, mel_dim=16, enc_emb_dim=16, enc_dim=16,
        enc_channels=[16, 16, 16, 16, 48], enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1],
        enc_attention_channels=8, enc_res2net_scale=2, enc_se_channels=8,
    )  # fmt: skip
    bigvgan = dict(mel_dim=16, upsample_initial_channel=32, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4])
    config = Qwen2_5OmniConfig(thinker_config=cfg.to_hf(), talker_config=talker, token2wav_config={"dit_config": dit, "bigvgan_config": bigvgan})
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config)
    model.thinker.load_state_dict(params_to_hf(init_thinker(cfg, seed=seed, std=std), prefix=""), strict=False)
    model.thinker.to(thinker_dtype)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="400KB")
    # The published speaker layout: cond (1, D), ref_mel (1, T, mel) (token2wav reads its batch from dim 0).
    speaker = {"bos_token": 61, "cond": torch.randn(1, 16), "ref_mel": torch.randn(1, 30, 16)}
    torch.save({"Chelsie": speaker}, folder / "spk_dict.pt")
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32768}')
    (folder / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    return model


def synthetic_hf_folder(cfg: ThinkerConfig, folder: Path, *, seed: int = 0, dtype=torch.bfloat16, shard_bytes: int = 256 * 2**20) -> int:
    """A full-model-layout HF folder (`thinker.` keys, sharded, with an index) of random weights,
    written tensor by tensor so even multi-GB folders need little memory. Returns the tensor bytes."""
    import json

    from omnicore.checkpoint.safetensors_io import SafetensorsWriter
    from omnicore.models.thinker import param_shapes

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": cfg.to_hf()}))
    shapes = {"thinker." + native_to_hf(k): v for k, v in param_shapes(cfg).items()}
    item = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(torch.Size(shape).numel()) * item
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(folder / file, {n: (dtype, shapes[n]) for n in names}, {"format": "pt"}) as w:
            for n in names:
                w.write(n, (torch.rand(shapes[n], generator=gen) - 0.5).to(dtype))
        weight_map |= dict.fromkeys(names, file)
        total += sum(int(torch.Size(shapes[n]).numel()) * item for n in names)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total

