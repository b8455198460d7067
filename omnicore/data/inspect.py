"""`python -m omnicore.data.inspect DATA_CONFIG`: what a data config turns into, before training on it.

Reads the datasets of a MindSpeed-MM data.json (or any file `load_data_config` accepts), processes every
conversation (media decoded, template rendered, positions computed) and prints: counts per modality,
a text histogram of token lengths, one rendered sample with its label mask (labelled tokens inside
`[[ ]]`, media runs shortened to `<|IMAGE|>x24`), every bad sample with its reason, and all counters.
The tokenizer and the model's token ids come from the config's `model_name_or_path` (or `--model`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import attrs

from omnicore.config import load_config
from omnicore.data.config import DataConfigError, load_data_config
from omnicore.data.sample import Sample, SampleContext, iter_samples
from omnicore.data.template import IGNORE_INDEX
from omnicore.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["modality", "histogram", "render_labels", "main"]


def modality(sample: Sample) -> str:
    """"text", or the media kinds of a sample joined by "+" ("image", "video+audio", "audio-in-video")."""
    kinds = [k for k, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")) if key in sample.media]
    if "audio_feature_lengths" in sample.media:
        kinds.append("audio-in-video" if sample.use_audio_in_video and "video" in kinds else "audio")
    return "+".join(kinds) or "text"


def histogram(lengths: Sequence[int], bins: int = 10, width: int = 40) -> list[str]:
    """Equal-width bins from 0 to the longest length, one text bar per bin."""
    if not lengths:
        return ["(no samples)"]
    step = max(1, -(-(max(lengths) + 1) // bins))
    counts = Counter(n // step for n in lengths)
    top = max(counts.values())
    lines = []
    for b in range(max(counts) + 1):
        bar = "#" * round(width * counts[b] / top)
        lines.append(f"  [{b * step:>7}, {(b + 1) * step:>7})  {bar} {counts[b]}")
    return lines


def render_labels(tokenizer: Tokenizer, ids: Sequence[int], labels: Sequence[int]) -> str:
    """The decoded tokens, labelled runs inside [[ ]], media placeholder runs as `<|IMAGE|>x24`."""
    s = tokenizer.special
    media = {s.image, s.video, s.audio}
    out = []

    def key(pair: tuple[int, int]) -> tuple[bool, int | None]:  # (labelled, the media token or None)
        return pair[1] != IGNORE_INDEX, pair[0] if pair[0] in media else None

    for (labelled, token), run in itertools.groupby(zip(ids, labels), key=key):
        run_ids = [i for i, _ in run]
        text = f"{tokenizer.decode(run_ids[:1])}x{len(run_ids)}" if token is not None else tokenizer.decode(run_ids)
        out.append(f"[[{text}]]" if labelled else text)
    return "".join(out)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m omnicore.data.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("data_config", type=Path, help="MindSpeed-MM data.json")
    parser.add_argument("--model", type=Path, help="HF folder: config.json and tokenizer (default: model_name_or_path)")
    parser.add_argument("--seq-length", type=int, help="sequence limit to apply (the run config's)")
    parser.add_argument("--limit", type=int, help="process at most this many conversations")
    parser.add_argument("--sample", type=int, default=0, help="which processed sample to render")
    parser.add_argument("--bins", type=int, default=10)
    return parser.parse_args(argv)


def _report(samples: list[Sample], tokenizer: Tokenizer, stats, args, out: TextIO) -> None:
    kinds = Counter(modality(s) for s in samples)
    print("modalities (samples): " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"), file=out)
    lengths = [len(s) for s in samples]
    if lengths:
        labelled = sum(int((s.labels != IGNORE_INDEX).sum()) for s in samples)
        print(f"tokens: {sum(lengths)} in {len(lengths)} samples (min {min(lengths)}, max {max(lengths)}), "
              f"{labelled} labelled", file=out)  # fmt: skip
    print("token lengths:", *histogram(lengths, args.bins), sep="\n", file=out)
    if samples:
        s = samples[min(max(args.sample, 0), len(samples) - 1)]
        print(f"\nsample {s.where} (id {s.id}), {len(s)} tokens, labelled in [[ ]]:", file=out)
        print(render_labels(tokenizer, s.input_ids.tolist(), s.labels.tolist()), file=out)
    print(f"\nbad samples ({stats.dropped}):", file=out)
    for bad in stats.bad:
        print(f"  {bad}", file=out)
    print("\ncounts:", stats.report(), sep="\n", file=out)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = _arguments(argv)
    try:
        cfg = load_data_config(args.data_config)
        model_dir = args.model or cfg.model_name_or_path
        if model_dir is None:
            raise DataConfigError("no model folder: set preprocess_parameters.model_name_or_path or pass --model")
        model, tokenizer = load_config(model_dir), load_tokenizer(model_dir)
        convs = cfg.read_conversations(on_bad_sample="skip")  # list every bad sample, whatever the policy
        length = cfg.length if args.seq_length is None else attrs.evolve(cfg.length, max_seq_len=args.seq_length)
        ctx = SampleContext.for_data(attrs.evolve(cfg, length=length), tokenizer, model)
        stats = convs.stats
        todo = (convs.train + convs.val)[: args.limit]
        samples = list(iter_samples(todo, ctx, stats))
    except ValueError as e:  # every refusal of the pipeline (config, file, tokenizer, media cap)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.data_config}: {len(cfg.datasets)} dataset(s), {len(convs.train)} train + {len(convs.val)} val "
          f"conversations, {len(samples)} of {len(todo)} processed into samples", file=out)  # fmt: skip
    _report(samples, tokenizer, stats, args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
