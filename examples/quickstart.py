"""Quick start: the functional thinker on a tiny random model, end to end on the CPU in seconds.

Builds a tiny Qwen2.5-Omni-shaped thinker, saves it as an HF folder (what a user downloads),
loads it back with `omnicore.load_hf`, and fits one image + audio batch for a few AdamW steps,
printing the loss. The full launcher and the bundled demo data arrive with the training runtime.

    python examples/quickstart.py [--steps 30] [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import omnicore
from omnicore.checkpoint.hf import params_to_hf


def write_hf_folder(folder: Path, cfg: omnicore.ThinkerConfig, seed: int) -> None:
    """A thinker-only HF folder: config.json + model.safetensors (thinker.-prefixed names)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    params = omnicore.init_thinker(cfg, seed=seed, std=0.05)
    save_file({k: v.contiguous() for k, v in params_to_hf(params).items()}, str(folder / "model.safetensors"))


def demo_batch(cfg: omnicore.ThinkerConfig) -> dict:
    """One sample: text, a 56x56 image (4 tokens), text, a 0.5 s audio clip (12 tokens), answer text."""
    t = cfg.tokens
    gen = torch.Generator().manual_seed(0)
    prompt = [1, 2, 3, t.vision_start, *[t.image] * 4, t.vision_end, 4, t.audio_start, *[t.audio] * 12, t.audio_end]
    answer = torch.randint(10, 400, (16,), generator=gen).tolist()
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(16, cfg.vision.patch_dim, generator=gen),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "input_features": torch.randn(1, cfg.audio.n_mels, 50, generator=gen),
        "feature_attention_mask": torch.ones(1, 50, dtype=torch.long),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()

    write_hf_folder(args.out / "hf", omnicore.TINY, seed=0)
    cfg, params = omnicore.load_hf(args.out / "hf")
    ops = omnicore.ops.resolve("auto", "cpu")
    print(f"loaded {len(params)} tensors ({sum(p.numel() for p in params.values()):,} parameters), ops backend: {ops.name}")

    batch = omnicore.prepare_inputs(cfg, demo_batch(cfg))  # host-side layout, computed once
    leaves = {k: v.requires_grad_() for k, v in params.items()}
    opt = torch.optim.AdamW(leaves.values(), lr=3e-3)
    for step in range(1, args.steps + 1):
        loss = omnicore.thinker_loss(leaves, cfg, batch, ops=ops)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
