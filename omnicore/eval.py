"""Evaluation: answer accuracy on a question file (`python -m omnicore.eval`) and `validation_loss`.

    python -m omnicore.eval --ckpt DIR --data questions.json [--batch-size 8] [--output answers.jsonl]

The question file is a JSON list (or JSON Lines, one object per line) of records:

    {"id": "q1",                                  optional, default: the record's index
     "question": "What color is this picture?",   may hold <image> / <video> / <audio> tags
     "answer": "red",                             a reference answer, or a list of accepted ones
     "images": ["media/red.png"], "videos": [], "audios": [],   optional; relative to the file's folder
     "system": "...",                             optional system prompt
     "use_audio_in_video": false}                 optional

Without tags the media come before the question (images, videos, audios). Scores, over normalised
text (lower case, whitespace runs made one space, punctuation at either end removed):
`exact_match` - the answer equals a reference; `accuracy` - a reference occurs in the answer as
whole words ("It is red." is accurate for "red"). Prompts are decoded greedily in batches.

`validation_loss(params, cfg, batches)` is the pure piece a training loop calls: the summed
next-token loss and the target count over held-out micro-batches, so data-parallel ranks can
all-reduce both before dividing.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import torch

from omnicore.chat import USER_ERRORS, InferenceModel, describe, model_from_args, prompt_batch, stop_ids
from omnicore.comm import LOCAL, Comm
from omnicore.config import ThinkerConfig
from omnicore.data.collate import collate_packed
from omnicore.generate import generate
from omnicore.models.thinker import ThinkerInputs, thinker_token_losses
from omnicore.ops import Ops
from omnicore.params import Params

__all__ = [
    "ValidationLoss",
    "validation_loss",
    "QARecord",
    "read_questions",
    "normalize",
    "exact_match",
    "contains_answer",
    "evaluate",
    "main",
]


@attrs.frozen
class ValidationLoss:
    """Summed next-token cross-entropy over `targets` labelled tokens; `mean` is the loss to log."""

    total: float
    targets: int

    @property
    def mean(self) -> float:
        return self.total / self.targets if self.targets else float("nan")


@torch.no_grad()
def validation_loss(
    params: Params,
    cfg: ThinkerConfig,
    batches: Iterable[Mapping[str, Any] | ThinkerInputs],
    *,
    ops: Ops | None = None,
    comm: Comm = LOCAL,
) -> ValidationLoss:
    """Loss over held-out micro-batches (dicts with labels, as for `thinker_loss`, or `ThinkerInputs`).

    Every labelled token counts once, whatever micro-batch it sits in (the "token" loss reduction).
    No gradients, no parameter change; `comm` as in the training forward (TP).
    """
    total, targets = 0.0, 0
    for batch in batches:
        losses, _ = thinker_token_losses(params, cfg, batch, ops=ops, comm=comm)
        total += float(losses.double().sum())
        targets += losses.numel()
    return ValidationLoss(total=total, targets=targets)


@attrs.frozen(kw_only=True)
class QARecord:
    """One question of an evaluation file (see the module docstring); `where` is file[index]."""

    id: str
    where: str
    question: str
    answers: tuple[str, ...]
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    audios: tuple[str, ...] = ()
    system: str | None = None
    use_audio_in_video: bool = False


_FIELDS = {"id", "question", "answer", "images", "videos", "audios", "system", "use_audio_in_video"}


def _record(raw: Any, where: str, index: int) -> QARecord:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a record must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; a record has {sorted(_FIELDS)}")
    question, answer = raw.get("question"), raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    answers = (answer,) if isinstance(answer, str) else answer
    if not isinstance(answers, list | tuple) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of strings")
    media = {}
    for key in ("images", "videos", "audios"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ValueError(f"{where}: '{key}' must be a list of paths")
        media[key] = tuple(value)
    return QARecord(
        id=str(raw.get("id", index)), where=where, question=question, answers=tuple(answers), system=raw.get("system"),
        use_audio_in_video=bool(raw.get("use_audio_in_video", False)), **media,
    )  # fmt: skip


def read_questions(path: str | Path) -> list[QARecord]:
    """The records of a question file (JSON list, or JSON Lines); ValueError naming the record."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else None
        if items is None:
            raise ValueError(f"{path}: expected a JSON list of records (or one JSON object per line)")
        located = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    except json.JSONDecodeError:
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    return [_record(item, where, i) for i, (where, item) in enumerate(located)]


_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, whitespace runs made one space, punctuation removed from both ends."""
    return _SPACES.sub(" ", text.lower()).strip().strip(string.punctuation + " ")


def exact_match(answer: str, references: Sequence[str]) -> bool:
    return normalize(answer) in {normalize(r) for r in references}


def contains_answer(answer: str, references: Sequence[str]) -> bool:
    """Some normalised reference occurs in the normalised answer as whole words."""
    said = normalize(answer)
    return any(re.search(rf"(?<!\w){re.escape(normalize(r))}(?!\w)", said) for r in references if normalize(r))


def _batch_of(prompts: list[dict]) -> dict:
    """Prompts (one-row batches) packed into one batch; media concatenated in prompt order."""
    samples = []
    for p in prompts:
        sample = {k: v for k, v in p.items() if k != "use_audio_in_video"} | {"input_ids": p["input_ids"][0]}
        samples.append(sample)
    batch = collate_packed(samples)
    batch.pop("labels", None)
    flags = {p["use_audio_in_video"] for p in prompts if "use_audio_in_video" in p}
    if len(flags) == 1:
        batch["use_audio_in_video"] = flags.pop()
    return batch


def evaluate(model: InferenceModel, records: Sequence[QARecord], source: str | Path, *, batch_size: int = 8, max_new_tokens: int = 64) -> list[dict]:
    """Answer every record (greedy) and score it: one dict per record with the answer and both scores.

    A record whose prompt cannot be built (missing media...) gets `error` and counts as wrong.
    """
    stops = stop_ids(model.tokenizer)
    results: list[dict | None] = [None] * len(records)
    pending: list[tuple[int, dict]] = []

    def flush() -> None:
        # Audio-in-video settings may differ per record; one batch holds one setting.
        groups: dict[object, list[tuple[int, dict]]] = {}
        for item in pending:
            groups.setdefault(item[1].get("use_audio_in_video"), []).append(item)
        for items in groups.values():
            new = generate(
                model.params, model.cfg, _batch_of([p for _, p in items]), max_new_tokens=max_new_tokens,
                stop_ids=stops, max_positions=model.max_positions, ops=model.ops,
            )  # fmt: skip
            for (i, _), tokens in zip(items, new):
                answer = model.tokenizer.decode([t for t in tokens if t not in stops]).strip()
                results[i] = _scored(records[i], answer)
        pending.clear()

    for i, record in enumerate(records):
        try:
            prompt = prompt_batch(
                model, record.question, images=record.images, videos=record.videos, audios=record.audios,
                system=record.system, use_audio_in_video=record.use_audio_in_video, source=source,
            )  # fmt: skip
        except USER_ERRORS as e:
            results[i] = _scored(record, None, error=f"{record.where}: {describe(e)}")
            continue
        tokens = prompt["input_ids"].shape[1]
        if tokens + max_new_tokens - 1 > model.max_positions:  # checked here so one long prompt spoils no batch
            results[i] = _scored(record, None, error=f"{record.where}: a prompt of {tokens} tokens plus {max_new_tokens} new tokens "
                                                     f"exceeds the model's {model.max_positions} positions")  # fmt: skip
            continue
        pending.append((i, prompt))
        if len(pending) == batch_size:
            flush()
    flush()
    return results


def _scored(record: QARecord, answer: str | None, error: str | None = None) -> dict:
    out = {"id": record.id, "question": record.question, "references": list(record.answers), "answer": answer}
    out["exact_match"] = answer is not None and exact_match(answer, record.answers)
    out["accuracy"] = answer is not None and contains_answer(answer, record.answers)
    return out | ({"error": error} if error else {})


def summary(results: Sequence[dict]) -> dict:
    n = len(results)
    return {
        "records": n,
        "exact_match": sum(r["exact_match"] for r in results) / n if n else 0.0,
        "accuracy": sum(r["accuracy"] for r in results) / n if n else 0.0,
        "errors": sum("error" in r for r in results),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m omnicore.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path, help="HF folder or native checkpoint (root or step folder)")
    p.add_argument("--data", required=True, type=Path, help="question file (JSON list or JSON Lines)")
    p.add_argument("--iteration", type=int, help="native checkpoint: load iteration N (default: the tracker's)")
    p.add_argument("--tokenizer", type=Path, help="folder with the tokenizer (default: the checkpoint's)")
    p.add_argument("--data-config", type=Path, help="a training data.json: take its processor and template settings")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--output", type=Path, help="write every record's answer and scores here (JSON Lines)")
    p.add_argument("--dtype", choices=["original", "float32", "bfloat16", "float16"], default="original")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Print the summary as JSON; exit 0, or 2 on a user error (checkpoint, tokenizer, question file)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        stderr.write("error: --batch-size must be >= 1\n")
        return 2
    try:
        records = read_questions(args.data)
        model = model_from_args(args)
    except (*USER_ERRORS, ValueError) as e:
        stderr.write(f"error: {e}\n")
        return 2
    results = evaluate(model, records, args.data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if args.output is not None:
        args.output.write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    for r in results:
        if "error" in r:
            stderr.write(f"error: {r['error']}\n")
    stdout.write(json.dumps(summary(results)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
