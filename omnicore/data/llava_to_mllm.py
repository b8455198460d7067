"""LLaVA-Instruct-150K -> mllm (MindSpeed-MM's converter, data_formats.md section 5), as a CLI.

    python -m omnicore.data.llava_to_mllm --coco-path ./data/COCO2017 \\
        --llava-json ./data/llava_instruct_150k.json --output ./data/mllm_format_llava_instruct_data.json

Each record's `image` (a name, a list, or absent for text-only) becomes `images`: the file
`<coco-path>/train2017/<image>`, written relative to the output file's folder so the dataset resolves
from where it sits; a record whose image is missing is skipped and counted. `from` human / gpt become
`role` user / assistant with `value` copied unchanged (the `<image>` tag and its newline stay); any
other `from` stops the conversion naming the record and the value. The `id` is kept (MindSpeed's tool
drops it; omnicore uses it in error reports). An existing output is replaced only with `--overwrite`;
the file is written to a temporary sibling and moved into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from omnicore.data.errors import DataFormatError
from omnicore.data.formats import iter_records

__all__ = ["ConversionError", "convert_records", "write_json_atomic", "main"]

ROLES = {"human": "user", "gpt": "assistant"}


class ConversionError(ValueError):
    """A LLaVA record the converter cannot translate (the message names the record)."""


def _name(record: object, index: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _convert_one(record: object, index: int, image_dir: Path, out_dir: Path) -> dict | None:
    """The mllm form of one record, or None when one of its images is missing."""
    name = _name(record, index)
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ConversionError(f"{name}: expected an object with a 'conversations' list")
    image = record.get("image")
    names = [] if image in (None, "", []) else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConversionError(f"{name}: 'image' must be a file name or a list of file names, got {image!r}")
    images = []
    for file in names:
        path = image_dir / file
        if not path.is_file():
            return None
        images.append(Path(os.path.relpath(path, out_dir)).as_posix())
    messages = []
    for turn in record["conversations"]:
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            value = turn.get("from") if isinstance(turn, dict) else turn
            raise ConversionError(f"{name}: unknown 'from' value {value!r} (expected 'human' or 'gpt')")
        messages.append({"role": role, "content": turn.get("value")})
    out = {"id": record["id"]} if "id" in record else {}
    return out | {"messages": messages, "images": images}


def convert_records(records: Iterable[object], coco_path: Path, output: Path) -> tuple[list[dict], Counter]:
    """(mllm records, counts: records, written, text_only, skipped_missing_image)."""
    image_dir, out_dir = Path(coco_path) / "train2017", Path(output).resolve().parent
    out, counts = [], Counter()
    for index, record in enumerate(records):
        counts["records"] += 1
        converted = _convert_one(record, index, image_dir.resolve(), out_dir)
        if converted is None:
            counts["skipped_missing_image"] += 1
            continue
        counts["text_only"] += not converted["images"]
        out.append(converted)
    counts["written"] = len(out)
    return out, counts


def write_json_atomic(records: list[dict], output: Path, *, overwrite: bool) -> None:
    """Write a JSON array next to `output`, fsync it, then move it into place.

    Without `overwrite` the final step is a hard link, which fails if `output` appeared meanwhile.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, output)
        else:
            os.link(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m omnicore.data.llava_to_mllm", description=__doc__.split("\n")[0])
    parser.add_argument("--coco-path", type=Path, default=Path("./data/COCO2017"), help="COCO root (holds train2017/)")
    parser.add_argument("--llava-json", type=Path, default=Path("./data/llava_instruct_150k.json"))
    parser.add_argument("--output", type=Path, default=Path("./data/mllm_format_llava_instruct_data.json"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        records, counts = convert_records((r for _, _, r in iter_records(args.llava_json)), args.coco_path, args.output)
        write_json_atomic(records, args.output, overwrite=args.overwrite)
    except (DataFormatError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError:
        print(f"error: {args.output} appeared while converting; pass --overwrite to replace it", file=sys.stderr)
        return 1
    print(
        f"{counts['records']} records: {counts['written']} written to {args.output} "
        f"({counts['text_only']} text-only), {counts['skipped_missing_image']} skipped (image missing)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
