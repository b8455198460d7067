"""Ask the trained demo model the demo's questions, whose answers depend on the media.

    python examples/ask_demo.py [--run examples/demo/run] [--demo examples/demo]

Prints each question, the model's answer and whether it names the right color or pitch; exits 1 if
any answer is wrong (so the demo command fails loudly when training did not work).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from make_demo import DEMO_QUESTIONS
from omnicore.checkpoint.native import load_native
from omnicore.data.formats import Conversation, Turn
from omnicore.data.sample import SampleContext, process_sample
from omnicore.data.tokenizer import load_tokenizer
from omnicore.generate import generate


def prompt_batch(demo: Path, ctx: SampleContext, kind: str, path: str, question: str) -> dict:
    """The prompt up to `<|im_start|>assistant\\n`: the chat template's generation prompt (the
    conversation's empty last answer is the one the model generates)."""
    placeholder = "<image>" if kind == "image" else "<audio>"
    conv = Conversation(
        id="question", source=str(demo / "questions.json"), index=0,
        turns=(Turn("user", placeholder + question), Turn("assistant", "")),
        images=(path,) if kind == "image" else (), audios=(path,) if kind == "audio" else (),
    )  # fmt: skip
    batch = process_sample(conv, ctx, generation_prompt=True).batch()
    return {k: v for k, v in batch.items() if k not in ("labels", "position_ids")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("examples/demo/run"))
    parser.add_argument("--demo", type=Path, default=Path("examples/demo"))
    args = parser.parse_args()
    cfg, params = load_native(args.run, dtype=torch.float32)
    tokenizer = load_tokenizer(args.demo / "model")
    ctx = SampleContext(tokenizer=tokenizer, model=cfg)
    im_end = tokenizer.token_id("<|im_end|>")
    wrong = 0
    for kind, path, question, expected in DEMO_QUESTIONS:
        new = generate(params, cfg, prompt_batch(args.demo, ctx, kind, path, question), max_new_tokens=16, stop_ids={im_end})[0]
        answer = tokenizer.decode([t for t in new if t != im_end]).strip()
        ok = expected in answer.lower()
        wrong += not ok
        print(f"[{'ok' if ok else 'WRONG'}] {path}: {question} -> {answer!r}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
