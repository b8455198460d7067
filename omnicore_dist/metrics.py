"""What a run reports: a line per log interval, `metrics.jsonl`, `log.txt`, a progress bar on a
terminal, optional TensorBoard, and an end-of-run summary (warm-up steps excluded) with a loss plot.

Only the main rank writes. Throughput counts real tokens (no padding): the model never sees padding.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ["StepRecord", "RunLog", "peak_memory_bytes", "plot_losses"]


@attrs.frozen(kw_only=True)
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # real (unpadded) tokens of the global batch
    samples: int
    modality_tokens: Mapping[str, int]
    step_seconds: float
    data_seconds: float
    devices: int
    skipped: bool = False
    data_stats: Mapping[str, int] = attrs.field(factory=dict)  # bad / truncated samples so far
    flops: float = 0.0  # model FLOPs of the step (0: unknown)
    peak_flops_per_device: float = 0.0

    def as_dict(self) -> dict:
        d = attrs.asdict(self)
        d["tokens_per_s_per_device"] = self.tokens / self.step_seconds / self.devices if self.step_seconds else 0.0
        d["tokens_per_sample"] = self.tokens / self.samples if self.samples else 0.0
        d["peak_memory_bytes"] = peak_memory_bytes()
        if self.flops and self.peak_flops_per_device:
            d["mfu"] = self.flops / self.step_seconds / (self.peak_flops_per_device * self.devices)
        return d


def peak_memory_bytes() -> int:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _line(d: Mapping) -> str:
    parts = [
        f"step {d['step']}",
        f"loss {d['loss']:.4f}",
        f"lr {d['lr']:.3e}",
        f"grad_norm {d['grad_norm']:.3f}",
        f"tok/s/dev {d['tokens_per_s_per_device']:.0f}",
        f"tok/sample {d['tokens_per_sample']:.0f}",
        "tokens " + " ".join(f"{k}={v}" for k, v in d["modality_tokens"].items()),
        f"step {d['step_seconds'] * 1000:.0f} ms (data {d['data_seconds'] * 1000:.0f} ms)",
        f"mem {d['peak_memory_bytes'] / 2**30:.2f} GiB",
    ]
    if "mfu" in d:
        parts.append(f"mfu {d['mfu']:.3f}")
    if d["data_stats"]:
        parts.append("data " + " ".join(f"{k}={v}" for k, v in d["data_stats"].items()))
    if d["skipped"]:
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


class RunLog:
    """Sinks of the main rank; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path | None, *, enabled: bool, interval: int, warmup_steps: int, total_steps: int,
                 first_step: int, progress: bool, tensorboard: bool):  # fmt: skip
        self.enabled = enabled and run_dir is not None
        self.interval, self.warmup_steps = interval, warmup_steps
        self.records: list[dict] = []
        self.validations: list[dict] = []
        self.run_dir = run_dir
        self.bar = None
        self.tb = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.text = open(run_dir / "log.txt", "a", buffering=1)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if progress:  # tqdm disables itself when stderr is not a terminal
            self.bar = tqdm(total=total_steps, initial=first_step - 1, unit="step", disable=None, file=sys.stderr)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

            self.tb = SummaryWriter(run_dir / "tensorboard")

    def message(self, text: str) -> None:
        if self.enabled:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.text.write(f"[{stamp}] {text}\n")
            (self.bar.write if self.bar and not self.bar.disable else print)(text)

    def step(self, record: StepRecord) -> None:
        if not self.enabled:
            return
        d = record.as_dict()
        self.records.append(d)
        self.jsonl.write(json.dumps(d) + "\n")
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record.loss:.4f}", refresh=False)
        if self.tb:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s_per_device"):
                self.tb.add_scalar(f"train/{key}", d[key], record.step)
        if record.step % self.interval == 0 or record.skipped:
            self.message(_line(d))

    def event(self, kind: str, **fields) -> None:
        """A non-step event in metrics.jsonl (restarts, saves, stops)."""
        if self.enabled:
            self.jsonl.write(json.dumps({"event": kind, **fields}) + "\n")

    def validation(self, fields: Mapping) -> None:
        """A validation-loss run: `{"event": "validation", "step", "val_loss", ...}` in metrics.jsonl."""
        if not self.enabled:
            return
        self.validations.append(dict(fields))
        self.event("validation", **fields)
        if self.tb:
            self.tb.add_scalar("val/loss", fields["val_loss"], fields["step"])
        self.message(f"validation at step {fields['step']}: loss {fields['val_loss']:.4f}, perplexity {fields['val_ppl']:.4g} "
                     f"({fields['val_targets']} tokens of {fields['val_samples']} samples, {fields['val_seconds']:.1f} s)")  # fmt: skip

    def summary(self) -> dict:
        """Throughput over the steps after warm-up, per device and for the whole job; writes loss.png."""
        if not self.enabled or not self.records:
            return {}
        measured = [r for r in self.records[self.warmup_steps :] if not r["skipped"]] or self.records
        seconds = sum(r["step_seconds"] for r in measured)
        tokens = sum(r["tokens"] for r in measured)
        devices = measured[0]["devices"]
        out = {
            "steps": len(self.records),
            "measured_steps": len(measured),
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "tokens_per_s_per_device": tokens / seconds / devices if seconds else 0.0,
            "samples_per_s": sum(r["samples"] for r in measured) / seconds if seconds else 0.0,
            "final_loss": self.records[-1]["loss"],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in self.records),
        }
        if self.validations:
            out["final_val_loss"] = self.validations[-1]["val_loss"]
        if all("mfu" in r for r in measured):
            out["mfu"] = sum(r["mfu"] for r in measured) / len(measured)
        self.event("summary", **out)
        self.message("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
        plot_losses([(r["step"], r["loss"]) for r in self.records], self.run_dir / "loss.png")
        return out

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        self.text.close()
        self.jsonl.close()


def plot_losses(points: list[tuple[int, float]], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A plain loss-vs-step line chart as PNG (Pillow; no plotting library needed)."""
    points = [(s, v) for s, v in points if math.isfinite(v)]
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 20, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if len(points) >= 1:
        steps, values = zip(*points)
        s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        v0, v1 = min(values), max(values) if max(values) > min(values) else min(values) + 1
        xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - v0) / (v1 - v0) * (bottom - top)) for s, v in points]
        draw.line(xy if len(xy) > 1 else xy * 2, fill=(31, 119, 180), width=2)
        draw.text((5, top), f"{v1:.3g}", fill="black")
        draw.text((5, bottom - 10), f"{v0:.3g}", fill="black")
        draw.text((left, bottom + 10), f"step {s0}", fill="black")
        draw.text((right - 60, bottom + 10), f"step {s1}", fill="black")
    draw.text((w // 2 - 20, 3), "loss", fill="black")
    img.save(path)
