"""`omnicore-convert` (also `python -m omnicore_dist.convert`): HF <-> native checkpoints, resharding.

    omnicore-convert hf-to-native --hf-dir ckpt/hf/Qwen2.5-Omni-7B --out-dir ckpt/native \\
        --tp 1 --llm-pp-layers [11,17] --vit-pp-layers [32,0] --audio-pp-layers [32,0]
    omnicore-convert native-to-hf --native-dir save_dir --hf-dir ckpt/hf/Qwen2.5-Omni-7B --out-dir ckpt/export
    omnicore-convert reshard --native-dir ckpt/native --out-dir ckpt/native_tp2 --tp 2

MindSpeed-MM's `mm-convert Qwen2_5_OmniConverter hf_to_mm | mm_to_hf --cfg.<field> ...` commands work
unchanged with `omnicore-convert` in place of `mm-convert` (see `translate_mm_convert`).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from omnicore.checkpoint.convert import DTYPE_CHOICES, HFSource, export_nbytes, hf_to_native, native_to_hf, reshard
from omnicore.checkpoint.hf import CheckpointError
from omnicore.checkpoint.native import NativeCheckpoint
from omnicore.config import ConfigError
from omnicore.layout import Layout, LayoutError, parse_layer_list

__all__ = ["main", "build_parser", "translate_mm_convert", "layout_from_args"]

EXAMPLES = """
examples:
  # HF download -> native, the recipe's TP1 PP2 layout (encoders on stage 0)
  omnicore-convert hf-to-native --hf-dir ckpt/hf/Qwen2.5-Omni-7B --out-dir ckpt/native \\
      --tp 1 --llm-pp-layers [11,17] --vit-pp-layers [32,0] --audio-pp-layers [32,0]
  # hetero: LLM TP 4, encoders TP 1
  omnicore-convert hf-to-native --hf-dir ckpt/hf/Qwen2.5-Omni-7B --out-dir ckpt/native_tp4 --tp 4 --vit-tp 1 --audio-tp 1
  # after training: the newest checkpoint in save_dir, overlaid on the original download (talker kept)
  omnicore-convert native-to-hf --native-dir save_dir --hf-dir ckpt/hf/Qwen2.5-Omni-7B --out-dir ckpt/export
  # change TP / PP without going through HF
  omnicore-convert reshard --native-dir ckpt/native --out-dir ckpt/native_pp4 --llm-pp-layers 1,10,10,7 --vit-pp-layers 32,0,0,0 --audio-pp-layers 32,0,0,0
  # MindSpeed-MM's command, unchanged
  omnicore-convert Qwen2_5_OmniConverter hf_to_mm --cfg.mm_dir ckpt/mm --cfg.hf_config.hf_dir ckpt/hf/Qwen2.5-Omni-7B \\
      --cfg.parallel_config.llm_pp_layers [[11,17]] --cfg.parallel_config.vit_pp_layers [[32,0]] \\
      --cfg.parallel_config.audio_pp_layers [[32,0]] --cfg.parallel_config.tp_size 1

Layer lists accept [[11,17]], [11,17], 11,17 or "11 17": one entry per pipeline stage, summing to the
tower's depth; an encoder must finish at or before the stage where the LLM starts. Encoder TP sizes
default to --tp. Nothing that looks like a checkpoint appears in the output folder until the conversion
is complete; an existing checkpoint there is replaced only with --overwrite.
"""


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="tensor-parallel size of the LLM (default 1), e.g. --tp 2")
    p.add_argument("--vit-tp", "--vit-tp-size", dest="vit_tp", type=int, help="TP size of the vision encoder (default: --tp), e.g. --vit-tp 1")
    p.add_argument("--audio-tp", "--audio-tp-size", dest="audio_tp", type=int, help="TP size of the audio encoder (default: --tp)")
    for flag, tower in (("llm", "LLM"), ("vit", "vision encoder"), ("audio", "audio encoder")):
        p.add_argument(
            f"--{flag}-pp-layers",
            f"--{flag}_pp_layers",
            dest=f"{flag}_pp_layers",
            metavar="LIST",
            help=f"{tower} layers per pipeline stage, e.g. [11,17] (default: all on one stage"
            + ("" if flag == "llm" else "; with PP > 1 the whole encoder on stage 0")
            + ")",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnicore-convert",
        description="Convert Qwen2.5-Omni checkpoints between Hugging Face and omnicore's native format.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hf-to-native", help="HF folder -> native checkpoint", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, type=Path, help="HF Qwen2.5-Omni folder (config.json + safetensors), e.g. ckpt/hf/Qwen2.5-Omni-7B")
    p.add_argument("--out-dir", required=True, type=Path, help="native checkpoint root to create, e.g. ckpt/native")
    _add_layout(p)
    p.add_argument("--dtype", choices=["original", *DTYPE_CHOICES], default="original", help="stored dtype (default: as in the HF files)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out-dir")

    p = sub.add_parser("native-to-hf", help="native checkpoint -> HF folder (talker kept)", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--native-dir", required=True, type=Path, help="native root (release or a training save folder) or a step folder, e.g. save_dir")
    p.add_argument("--hf-dir", required=True, type=Path, help="the ORIGINAL HF folder the checkpoint came from (talker, tokenizer, spk_dict.pt)")
    p.add_argument("--out-dir", required=True, type=Path, help="HF folder to create, e.g. ckpt/export")
    p.add_argument("--iteration", type=int, help="export iteration N of a training save folder (default: the tracker's)")
    p.add_argument("--dtype", choices=["original", *DTYPE_CHOICES], default="original", help="dtype of the exported thinker (default: the original's)")
    p.add_argument("--overwrite", action="store_true", help="replace an HF checkpoint already in --out-dir")

    p = sub.add_parser("reshard", help="native -> native under a new TP / PP layout", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--native-dir", required=True, type=Path, help="native root or step folder to read, e.g. ckpt/native")
    p.add_argument("--out-dir", required=True, type=Path, help="native root to create, e.g. ckpt/native_tp2")
    p.add_argument("--iteration", type=int, help="read iteration N of a training save folder (default: the tracker's)")
    _add_layout(p)
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out-dir")
    return parser


def layout_from_args(args: argparse.Namespace) -> Layout:
    return Layout(
        tp=args.tp,
        vit_tp=args.vit_tp,
        audio_tp=args.audio_tp,
        llm_pp_layers=parse_layer_list(args.llm_pp_layers, "--llm-pp-layers"),
        vit_pp_layers=parse_layer_list(args.vit_pp_layers, "--vit-pp-layers"),
        audio_pp_layers=parse_layer_list(args.audio_pp_layers, "--audio-pp-layers"),
    )


_MM_FIELDS = {
    "hf_to_mm": {
        "mm_dir": "--out-dir",
        "hf_config.hf_dir": "--hf-dir",
        "parallel_config.llm_pp_layers": "--llm-pp-layers",
        "parallel_config.vit_pp_layers": "--vit-pp-layers",
        "parallel_config.audio_pp_layers": "--audio-pp-layers",
        "parallel_config.tp_size": "--tp",
        "parallel_config.vit_tp_size": "--vit-tp",
        "parallel_config.audio_tp_size": "--audio-tp",
    },
    "mm_to_hf": {
        "save_hf_dir": "--out-dir",
        "mm_dir": "--native-dir",
        "hf_config.hf_dir": "--hf-dir",
    },
}
_MM_CHECKED = ("parallel_config.llm_pp_layers", "parallel_config.vit_pp_layers", "parallel_config.audio_pp_layers",
               "parallel_config.tp_size", "parallel_config.vit_tp_size", "parallel_config.audio_tp_size")  # fmt: skip
_MM_IGNORED = {"trust_remote_code": "omnicore never runs code from a checkpoint", "parallel_config.ep_size": "no experts in Qwen2.5-Omni"}


def translate_mm_convert(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """MindSpeed-MM's `Qwen2_5_OmniConverter hf_to_mm|mm_to_hf --cfg.x v ...` as omnicore arguments.

    Returns (arguments, layout fields given to mm_to_hf): mm_to_hf reads the layout from the
    checkpoint, so those fields are only checked against it.
    """
    if len(argv) < 2 or argv[1] not in _MM_FIELDS:
        raise SystemExit("omnicore-convert Qwen2_5_OmniConverter: expected hf_to_mm or mm_to_hf (resplit: use omnicore-convert reshard)")
    command = argv[1]
    fields, args, checked = _MM_FIELDS[command], ["hf-to-native" if command == "hf_to_mm" else "native-to-hf"], {}
    items = list(argv[2:])
    while items:
        flag = items.pop(0)
        key, _, value = flag.partition("=")
        if not key.startswith("--cfg."):
            raise SystemExit(f"omnicore-convert Qwen2_5_OmniConverter {command}: unexpected argument {flag!r} (fields are --cfg.<name> <value>)")
        if not value:
            if not items:
                raise SystemExit(f"omnicore-convert: {key} needs a value")
            value = items.pop(0)
        field = key[len("--cfg.") :]
        if field in fields:
            args += [fields[field], value]
        elif command == "mm_to_hf" and field in _MM_CHECKED:
            checked[field] = value
        elif field == "parallel_config.ep_size" and value.strip() != "1":
            raise SystemExit(f"omnicore-convert: --cfg.parallel_config.ep_size {value}: expert parallelism does not apply to Qwen2.5-Omni")
        elif field in _MM_IGNORED:
            print(f"omnicore-convert: ignoring --cfg.{field} ({_MM_IGNORED[field]})", file=sys.stderr)
        else:
            known = [*fields, *_MM_IGNORED, *(_MM_CHECKED if command == "mm_to_hf" else ())]
            near = difflib.get_close_matches(field, known, n=1)
            hint = f"; did you mean --cfg.{near[0]}?" if near else ""
            raise SystemExit(f"omnicore-convert Qwen2_5_OmniConverter {command}: --cfg.{field} is not supported{hint}")
    return args, checked


def _check_mm_layout(native_dir: Path, iteration: int | None, checked: dict[str, str]) -> None:
    """mm_to_hf's parallel fields must describe the checkpoint (MindSpeed needs them to find its files)."""
    if not checked:
        return
    layout = NativeCheckpoint(native_dir, iteration=iteration, verify="none").layout
    actual = {
        "parallel_config.llm_pp_layers": layout.llm_pp_layers,
        "parallel_config.vit_pp_layers": layout.vit_pp_layers,
        "parallel_config.audio_pp_layers": layout.audio_pp_layers,
        "parallel_config.tp_size": (layout.tp,),
        "parallel_config.vit_tp_size": (layout.vit_tp,),
        "parallel_config.audio_tp_size": (layout.audio_tp,),
    }
    for field, value in checked.items():
        if parse_layer_list(value, f"--cfg.{field}") != tuple(actual[field]):
            raise LayoutError(f"--cfg.{field} {value} does not match the checkpoint's layout {list(actual[field])}")


class _Progress:
    """A byte / tensor progress bar on a terminal (tqdm disables itself when stderr is not a TTY)."""

    def __init__(self, total: int, what: str):
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=None, file=sys.stderr)
        self.tensors = 0

    def __call__(self, nbytes: int, tensors: int) -> None:
        self.tensors += tensors
        self.bar.update(nbytes)
        self.bar.set_postfix(tensors=self.tensors, refresh=False)

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace, checked: dict[str, str]) -> Path:
    if args.command == "hf-to-native":
        progress = _Progress(HFSource(args.hf_dir).nbytes(), "hf-to-native")
        dtype = None if args.dtype == "original" else DTYPE_CHOICES[args.dtype]
        try:
            return hf_to_native(args.hf_dir, args.out_dir, layout_from_args(args), dtype=dtype, overwrite=args.overwrite, progress=progress)
        finally:
            progress.close()
    if args.command == "native-to-hf":
        _check_mm_layout(args.native_dir, args.iteration, checked)
        progress = _Progress(export_nbytes(args.hf_dir, args.dtype), "native-to-hf")
        try:
            return native_to_hf(args.native_dir, args.hf_dir, args.out_dir, iteration=args.iteration, dtype=args.dtype, overwrite=args.overwrite, progress=progress)
        finally:
            progress.close()
    progress = _Progress(NativeCheckpoint(args.native_dir, iteration=args.iteration, verify="none").nbytes(), "reshard")
    try:
        return reshard(args.native_dir, args.out_dir, layout_from_args(args), iteration=args.iteration, overwrite=args.overwrite, progress=progress)
    finally:
        progress.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    checked: dict[str, str] = {}
    if argv and re.fullmatch(r"Qwen2_5_?OmniConverter", argv[0]):
        argv, checked = translate_mm_convert(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = run(args, checked)
    except (LayoutError, CheckpointError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"omnicore-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"omnicore-convert {args.command}: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
