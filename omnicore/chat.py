"""Ask a (fine-tuned) thinker questions about images, videos and audio; the answer streams as it decodes.

    python -m omnicore.chat --ckpt DIR [--image X] [--video Y] [--audio Z] "question"
    python -m omnicore.chat --ckpt DIR [--system "..."] < questions.txt   # one question per line, until EOF

`--ckpt` is an HF Qwen2.5-Omni folder (full model or thinker only) or a native checkpoint (a root
with its tracker, or a step folder; any TP / PP layout, unsharded here in one process). The
tokenizer comes from the HF folder, or from the `hf/` files a native checkpoint carries, or from
`--tokenizer`. Media go through the data pipeline: opened by `MediaRoots` (the folders of the files
named here), processed and laid out by the chat template with its generation prompt. Without
`<image>` / `<video>` / `<audio>` tags in the question the media come first, in that order. In
interactive mode the conversation keeps its history and the media belong to the first question.
Decoding uses the KV cache (omnicore.generate): greedy by default, `--temperature` / `--top-k` /
`--top-p` / `--seed` to sample. `--adapters DIR` merges LoRA adapters (an omnicore adapter
checkpoint trained on `--ckpt`, or a PEFT folder) into the model (`load_model(adapters=...)`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TextIO

import attrs
import torch

from omnicore.checkpoint.hf import CheckpointError, load_hf
from omnicore.checkpoint.native import NativeCheckpoint
from omnicore.config import ConfigError, ThinkerConfig
from omnicore.data.config import DataConfigError, load_data_config
from omnicore.data.errors import BadSample
from omnicore.data.formats import PLACEHOLDER, Conversation, Turn
from omnicore.data.media import MediaError, Reason
from omnicore.data.processor import ProcessorConfig
from omnicore.data.sample import SampleContext, process_sample
from omnicore.data.template import TemplateConfig
from omnicore.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from omnicore.generate import GREEDY, Sampling, generate_steps
from omnicore.lora import LoraError
from omnicore.models.decode import CacheFullError
from omnicore.models.positions import PositionError
from omnicore.ops import Ops, resolve
from omnicore.params import Params

__all__ = ["InferenceModel", "load_model", "model_from_args", "prompt_batch", "stop_ids", "stream_answer", "describe", "main", "USER_ERRORS"]

DEFAULT_PROCESSOR, DEFAULT_TEMPLATE = ProcessorConfig(), TemplateConfig()
DEFAULT_MAX_POSITIONS = 32768  # Qwen2.5-Omni's max_position_embeddings, when config.json omits it
# Everything a user can get wrong (paths, files, lengths, configs): reported in one line, no traceback.
USER_ERRORS = (BadSample, MediaError, CheckpointError, TokenizerError, CacheFullError, ConfigError, DataConfigError, PositionError, LoraError,
               OSError)  # fmt: skip


@attrs.frozen(kw_only=True)
class InferenceModel:
    """A loaded thinker ready to answer: config, parameters, tokenizer and the sample context
    (processor and template settings) prompts are built with; `max_positions` from config.json."""

    cfg: ThinkerConfig
    params: Params
    tokenizer: Tokenizer
    max_positions: int
    ops: Ops
    processor: ProcessorConfig = DEFAULT_PROCESSOR
    template: TemplateConfig = DEFAULT_TEMPLATE


def _is_hf_folder(path: Path) -> bool:
    weights = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


def _max_positions(hf_config: dict) -> int:
    thinker = hf_config.get("thinker_config", hf_config)
    text = thinker.get("text_config", thinker)
    return int(text.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS)


def _tokenizer_folder(folder: Path | None, what: str) -> Tokenizer:
    has = folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file())
    if not has:
        raise TokenizerError(f"{what} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); pass --tokenizer DIR")
    return load_tokenizer(folder)


def load_model(
    ckpt: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    iteration: int | None = None,
    adapters: Callable[[Params, ThinkerConfig], Params] | None = None,
    processor: ProcessorConfig = DEFAULT_PROCESSOR,
    template: TemplateConfig = DEFAULT_TEMPLATE,
) -> InferenceModel:
    """Load an HF folder or a native checkpoint for inference (see the module docstring).

    `dtype` None keeps the stored dtype. `adapters(params, cfg)` returns the parameters to use
    (LoRA merging plugs in here). Raises `CheckpointError` / `TokenizerError` with the path.
    """
    path = Path(ckpt)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if _is_hf_folder(path):
        cfg, params = load_hf(path, dtype=dtype, device=device)
        hf_config = json.loads((path / "config.json").read_text())
        tok_folder, what = path, f"the HF folder {path}"
    else:
        native = NativeCheckpoint(path, iteration=iteration)
        cfg, params = native.cfg, {k: v.to(device) for k, v in native.params(dtype).items()}
        hf_config = native.meta["hf_config"]
        files = native.hf_files()
        tok_folder, what = (next(iter(files.values())).parent if files else None), f"the native checkpoint {native.path}"
    tok = _tokenizer_folder(Path(tokenizer) if tokenizer is not None else tok_folder, str(tokenizer) if tokenizer else what)
    tok.check_config(cfg)
    if adapters is not None:
        params = adapters(params, cfg)
    return InferenceModel(
        cfg=cfg, params=params, tokenizer=tok, max_positions=_max_positions(hf_config), ops=resolve("auto", device),
        processor=processor, template=template,
    )  # fmt: skip


def _with_placeholders(text: str, images: Sequence, videos: Sequence, audios: Sequence, use_audio_in_video: bool) -> str:
    """The question with a tag per media item: as written if it has tags, else the media first."""
    if PLACEHOLDER.search(text):
        return text
    # A video's paired audio (audio in video with a separate file) is tagged right after the video.
    paired = min(len(videos), len(audios)) if use_audio_in_video else 0
    tags = "<image>" * len(images) + "<video><audio>" * paired + "<video>" * (len(videos) - paired)
    return tags + "<audio>" * (len(audios) - paired) + text


def prompt_batch(
    model: InferenceModel,
    question: str,
    *,
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    audios: Sequence[str] = (),
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    use_audio_in_video: bool = False,
    source: str | Path | None = None,
) -> dict:
    """The prompt of one question as a one-row batch for `omnicore.generate` (no labels).

    `history`: earlier (question, answer) rounds; the media belong to the first question (tagged
    there when no round has tags). Media paths are relative to `source`'s folder (a data file) or
    absolute / relative to the working folder; the folders of the named files are the media roots.
    Raises `BadSample` (missing media, tag / media count mismatch...) naming the file.
    """
    rounds = [*history, (question, "")]
    first = _with_placeholders(rounds[0][0], images, videos, audios, use_audio_in_video)
    if not any(PLACEHOLDER.search(q) for q, _ in rounds):
        rounds[0] = (first, rounds[0][1])
    turns = tuple(t for q, a in rounds for t in (Turn("user", q), Turn("assistant", a)))
    base = Path(source).parent if source is not None else Path.cwd()
    named = [base / p for p in (*images, *videos, *audios)]
    conv = Conversation(
        id="question", source=str(source or base / "<chat>"), index=0, system=system, turns=turns,
        images=tuple(images), videos=tuple(videos), audios=tuple(audios), use_audio_in_video=use_audio_in_video or None,
    )  # fmt: skip
    ctx = SampleContext(
        tokenizer=model.tokenizer, model=model.cfg, processor=model.processor, template=model.template,
        media_roots=tuple(dict.fromkeys(p.absolute().parent for p in named)),
    )  # fmt: skip
    sample = process_sample(conv, ctx, generation_prompt=True)
    batch = {"input_ids": sample.input_ids[None]} | dict(sample.media)
    if "video_grid_thw" in sample.media:
        batch["use_audio_in_video"] = sample.use_audio_in_video
    device = model.params["lm_head.weight"].device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """`<|im_end|>`, and `<|endoftext|>` when the tokenizer has it."""
    ids = {tokenizer.special.im_end}
    try:
        ids.add(tokenizer.token_id("<|endoftext|>"))
    except TokenizerError:
        pass
    return frozenset(ids)


def stream_answer(
    model: InferenceModel,
    batch: dict,
    *,
    max_new_tokens: int = 512,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    write: Callable[[str], object] | None = None,
) -> str:
    """Decode the answer of a one-row prompt, passing text to `write` as tokens arrive; returns it all.

    Text is written once it decodes to whole characters (a byte-level token may end inside one).
    """
    stops, ids, shown = stop_ids(model.tokenizer), [], ""
    for step in generate_steps(
        model.params, model.cfg, batch, max_new_tokens=max_new_tokens, stop_ids=stops, sampling=sampling,
        generator=generator, max_positions=model.max_positions, ops=model.ops,
    ):  # fmt: skip
        token = int(step.tokens[0])
        if token in stops:
            break
        ids.append(token)
        text = model.tokenizer.decode(ids)
        if write is not None and not text.endswith("\ufffd") and text.startswith(shown):
            write(text[len(shown) :])
            shown = text
    text = model.tokenizer.decode(ids)
    if write is not None and text.startswith(shown) and len(text) > len(shown):
        write(text[len(shown) :])
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m omnicore.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="ask this one question (default: read questions from stdin, one per line)")
    p.add_argument("--ckpt", required=True, type=Path, help="HF folder or native checkpoint (root or step folder)")
    p.add_argument("--iteration", type=int, help="native checkpoint: load iteration N (default: the tracker's)")
    p.add_argument("--tokenizer", type=Path, help="folder with the tokenizer (default: the checkpoint's)")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="FILE", help="a video (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE", help="an audio clip (repeatable)")
    p.add_argument("--use-audio-in-video", action="store_true", help="a video brings its sound track (or the next --audio)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument("--data-config", type=Path, help="a training data.json: take its processor and template settings")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--dtype", choices=["original", "float32", "bfloat16", "float16"], default="original")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, npu:0")
    p.add_argument("--adapters", type=Path, help="LoRA adapters to merge: an omnicore adapter checkpoint trained on --ckpt, or a PEFT folder")
    return p


def model_from_args(args: argparse.Namespace) -> InferenceModel:
    """The `InferenceModel` the common flags describe (--ckpt, --tokenizer, --dtype, --data-config...)."""
    settings = {}
    if args.data_config is not None:
        data = load_data_config(args.data_config)
        settings = {"processor": data.processor, "template": data.template}
    dtype = None if args.dtype == "original" else getattr(torch, args.dtype)
    if getattr(args, "adapters", None) is not None:
        from omnicore.checkpoint.lora_io import adapter_merger  # LoRA: merged once, at load

        settings["adapters"] = adapter_merger(args.adapters, args.ckpt)
    return load_model(args.ckpt, tokenizer=args.tokenizer, dtype=dtype, device=args.device, iteration=args.iteration, **settings)


def describe(error: Exception) -> str:
    """One line for a user error (a chat prompt's BadSample without its synthetic record location)."""
    return f"{error.problem.value}: {error.detail}" if isinstance(error, BadSample) else str(error)


def _check_media(args: argparse.Namespace) -> None:
    """Fail before any question when a named media file is missing (interactive mode reuses them)."""
    for path in (*args.image, *args.video, *args.audio):
        if not Path(path).is_file():
            raise MediaError(path, Reason.MISSING, f"no such file: {Path(path).absolute()}")


def _questions(args: argparse.Namespace, stdin: TextIO, stderr: TextIO) -> Iterable[str]:
    if args.question is not None:
        yield args.question
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            stderr.write(">>> ")
            stderr.flush()
        line = stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        parser.error(str(e))
    try:
        _check_media(args)
        model = model_from_args(args)
    except USER_ERRORS as e:
        stderr.write(f"error: {describe(e)}\n")
        return 2
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    history: list[tuple[str, str]] = []
    failed = False

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    for question in _questions(args, stdin, stderr):
        try:
            batch = prompt_batch(
                model, question, images=args.image, videos=args.video, audios=args.audio, system=args.system,
                history=history, use_audio_in_video=args.use_audio_in_video,
            )  # fmt: skip
            answer = stream_answer(model, batch, max_new_tokens=args.max_new_tokens, sampling=sampling, generator=generator, write=write)
        except USER_ERRORS as e:
            stderr.write(f"error: {describe(e)}\n")
            failed = True
            continue
        write("\n")
        history.append((question, answer))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
