"""Make the bundled demo: media, datasets, a data config, a tokenizer and a tiny Omni-shaped model.

    python examples/make_demo.py [--out examples/demo] [--seed 0]

Everything is generated from a seed in a few seconds (about 1 MB in all):
- media/: two images (red / blue squares), two 1 s tones (low 220 Hz / high 1760 Hz), a 2 s video with
  its own sound track and a 2 s video with a separate audio file;
- llava_demo.json (LLaVA layout: image questions and text-only records) and mllm_demo.json (mllm
  layout: audio, video, video + audio pair, text-only), read together through data.json (MindSpeed-MM's
  format, as a recipe user writes it);
- model/: an HF-format folder: config.json of a tiny thinker (omnicore.TINY's shape), random weights
  from the seed, and a byte-level BPE tokenizer trained on the demo text whose special tokens have the
  ids the config names.
The demo's questions (DEMO_QUESTIONS) can only be answered from the media: after
`python -m omnicore_dist.launch examples/demo.toml`, `python examples/ask_demo.py` asks them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import pre_tokenizers, trainers

import omnicore
from omnicore.checkpoint.hf import params_to_hf
from omnicore.data.tokenizer import qwen2_bpe

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
TONES = {"low": 220.0, "high": 1760.0}
RATE = 16000
IMAGE_QUESTIONS = ["What color is this picture?", "Which color do you see?", "Tell me the color of the image."]
AUDIO_QUESTIONS = ["Is this sound high or low?", "What pitch is this tone?", "Describe the pitch of the sound."]
TEXT_QA = [
    ("What is two plus two?", "Four."),
    ("Name a primary color.", "Red is a primary color."),
    ("What sound does a cat make?", "A cat says meow."),
    ("Say hello.", "Hello!"),
]
DEMO_QUESTIONS = [  # (media kind, file, question, a word the answer must contain)
    ("image", "media/red.png", "What color is this picture?", "red"),
    ("image", "media/blue.png", "What color is this picture?", "blue"),
    ("audio", "media/low.wav", "Is this sound high or low?", "low"),
    ("audio", "media/high.wav", "Is this sound high or low?", "high"),
]
SPECIAL = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",
           "<|endoftext|>", "<|im_start|>", "<|im_end|>")  # fmt: skip
BASE_VOCAB = 500  # omnicore.TINY puts <|AUDIO|> at 500, ... <|VIDEO|> at 506, in this order


def image_answer(color: str) -> str:
    return f"It is {color}."


def audio_answer(pitch: str) -> str:
    return f"It is a {pitch} tone."


def write_media(media: Path, gen: np.random.Generator) -> None:
    media.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLORS.items():
        pixels = np.clip(np.array(rgb)[None, None, :] + gen.normal(0, 8, (56, 56, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(media / f"{name}.png")
    t = np.arange(RATE) / RATE
    for name, hz in TONES.items():
        sf.write(media / f"{name}.wav", (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32), RATE)
    _write_video(media / "sweep.mp4", gen, with_audio=True)
    _write_video(media / "pair.mp4", gen, with_audio=False)
    sf.write(media / "pair.wav", (0.3 * np.sin(2 * math.pi * 440.0 * np.arange(2 * RATE) / RATE)).astype(np.float32), RATE)


def _write_video(path: Path, gen: np.random.Generator, *, with_audio: bool) -> None:
    """2 s at 4 fps, 56 x 56: a white square moving left to right (and a rising tone when audible)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=4)
        video.width = video.height = 56
        video.pix_fmt = "yuv420p"
        audio = out.add_stream("aac", rate=RATE) if with_audio else None
        for k in range(8):
            frame = np.zeros((56, 56, 3), np.uint8)
            frame[20:36, 4 + 5 * k : 20 + 5 * k] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            t = np.arange(2 * RATE) / RATE
            wave = (0.3 * np.sin(2 * math.pi * (300 + 200 * t) * t)).astype(np.float32)
            step = 1024
            for start in range(0, len(wave), step):
                chunk = wave[start : start + step]
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
                frame.sample_rate = RATE
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)


def datasets() -> tuple[list[dict], list[dict]]:
    """(LLaVA-layout records, mllm-layout records). Paths are relative to the dataset file."""
    llava, mllm = [], []
    for color in COLORS:
        for i, q in enumerate(IMAGE_QUESTIONS):
            for where in ("before", "after"):
                value = f"<image>\n{q}" if where == "before" else f"{q}\n<image>"
                llava.append({"id": f"img-{color}-{i}-{where}", "image": f"media/{color}.png",
                              "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": image_answer(color)}]})  # fmt: skip
    for q, a in TEXT_QA:
        llava.append({"id": f"text-{len(llava)}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    for pitch in TONES:
        for i, q in enumerate(AUDIO_QUESTIONS):
            for _ in range(2):
                mllm.append({"messages": [{"role": "user", "content": f"<audio>{q}"}, {"role": "assistant", "content": audio_answer(pitch)}],
                             "audios": [f"media/{pitch}.wav"]})  # fmt: skip
    mllm.append({"messages": [{"role": "user", "content": "<video>Where does the square move?"},
                              {"role": "assistant", "content": "From left to right."}], "videos": ["media/sweep.mp4"]})  # fmt: skip
    mllm.append({"messages": [{"role": "user", "content": "<video><audio>What do you see and hear?"},
                              {"role": "assistant", "content": "A moving square and a steady tone."}],
                 "videos": ["media/pair.mp4"], "audios": ["media/pair.wav"]})  # fmt: skip
    for q, a in TEXT_QA:
        mllm.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return llava, mllm


def data_json(out: Path) -> dict:
    """MindSpeed-MM's data.json shape for the two files (relative paths resolve from the repository root)."""
    return {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {
                "model_name_or_path": str(out / "model"),
                "image_max_pixels": 56 * 56,
                "video_max_pixels": 56 * 56,
                "video_fps": 2.0,
                "video_maxlen": 8,
            },
            "basic_parameters": {
                "template": "qwen2_omni",
                "dataset_dir": str(out),
                "dataset": f"{out / 'llava_demo.json'},{out / 'mllm_demo.json'}",
                "cache_dir": str(out / "cache"),
                "train_on_prompt": False,
                "mask_history": False,
                "max_samples": None,
            },
            "attr": {"system": None, "images": "images", "videos": "videos", "audios": "audios", "messages": "messages",
                     "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},  # fmt: skip
        },
        "dataloader_param": {"dataloader_mode": "sampler", "drop_last": True, "shuffle": True},
    }


def corpus(llava: list[dict], mllm: list[dict]) -> list[str]:
    texts = ["system user assistant You are a helpful assistant."]
    texts += [turn["value"] for r in llava for turn in r["conversations"]]
    texts += [m["content"] for r in mllm for m in r["messages"]]
    return texts


def write_tokenizer(folder: Path, texts: list[str]) -> None:
    """A byte-level BPE (Qwen2's pre-tokenizer) with exactly BASE_VOCAB entries, then the specials."""
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    untrained = qwen2_bpe({}, [])
    untrained.train_from_iterator(texts * 4, trainer)
    model = json.loads(untrained.to_str())["model"]
    vocab = dict(model["vocab"])
    for i in range(BASE_VOCAB - len(vocab)):  # unreachable fillers so the specials start at BASE_VOCAB
        vocab[f"zzfill{i:03d}"] = len(vocab)
    tok = qwen2_bpe(vocab, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]])
    tok.add_special_tokens(list(SPECIAL))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
                                                              "pad_token": "<|endoftext|>", "bos_token": None}, indent=1))  # fmt: skip


def write_model(folder: Path, seed: int) -> None:
    cfg = omnicore.TINY
    folder.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf() | {"vision_end_token_id": cfg.tokens.vision_end}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    params = omnicore.init_thinker(cfg, seed=seed, std=0.05)
    save_file({k: v.contiguous() for k, v in params_to_hf(params).items()}, str(folder / "model.safetensors"))


def make_demo(out: Path, seed: int = 0) -> None:
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    write_media(out / "media", gen)
    llava, mllm = datasets()
    (out / "llava_demo.json").write_text(json.dumps(llava, indent=1))
    (out / "mllm_demo.json").write_text(json.dumps(mllm, indent=1))
    (out / "data.json").write_text(json.dumps(data_json(out), indent=2))
    write_tokenizer(out / "model", corpus(llava, mllm))
    write_model(out / "model", seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_demo(args.out, args.seed)
    print(f"demo written to {args.out}")


if __name__ == "__main__":
    main()
