"""One conversation -> one training sample: media through the roots, processor, template, positions.

`process_sample` opens every media path of a `Conversation` with the one opener (`MediaRoots`: the
dataset file's folder, then `dataset_dir`, then any extra roots), decodes and processes it, applies the
media caps and the sequence limit (`length.py`), renders the chat template (`template.py`) and
computes the 3-D positions with `omnicore.models.positions.sample_positions`. The result uses the
thinker's batch key names, so `Sample.batch()` goes straight into `omnicore.prepare_inputs`.
Any problem with the record is a located `BadSample`; `iter_samples` drops and counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import attrs
import torch

from omnicore.config import ThinkerConfig
from omnicore.data.config import DataConfig
from omnicore.data.errors import BadSample, DataStats, Problem
from omnicore.data.formats import Conversation
from omnicore.data.image import decode_image
from omnicore.data.audio import decode_audio, decode_video_audio
from omnicore.data.length import LengthPolicy, cap_audio, cap_video
from omnicore.data.media import DEFAULT_LIMITS, MediaError, MediaLimits, MediaRoots
from omnicore.data.processor import ProcessorConfig, audio_features, process_image, process_video
from omnicore.data.template import AudioKey, Encoded, MediaShapes, TemplateConfig, encode_conversation, plan_media
from omnicore.data.tokenizer import Tokenizer
from omnicore.data.video import VideoFrames, decode_video, video_from_frames
from omnicore.models.positions import MediaQueue, sample_positions

__all__ = ["SampleContext", "Sample", "process_sample", "iter_samples"]


@attrs.frozen(kw_only=True)
class SampleContext:
    """Everything `process_sample` needs besides the conversation (checked once, at construction)."""

    tokenizer: Tokenizer
    model: ThinkerConfig
    processor: ProcessorConfig = ProcessorConfig()
    template: TemplateConfig = TemplateConfig()
    length: LengthPolicy = LengthPolicy()
    dataset_dir: Path | None = None
    media_roots: tuple[Path, ...] = attrs.field(default=(), converter=tuple)
    limits: MediaLimits = DEFAULT_LIMITS
    fetch_url: Callable[[str], BinaryIO] | None = None

    def __attrs_post_init__(self) -> None:
        self.tokenizer.check_config(self.model)

    @classmethod
    def for_data(cls, cfg: DataConfig, tokenizer: Tokenizer, model: ThinkerConfig, **kwargs) -> SampleContext:
        """The context a `DataConfig` describes (processor, template, length policy, media roots)."""
        return cls(
            tokenizer=tokenizer, model=model, processor=cfg.processor, template=cfg.template, length=cfg.length,
            dataset_dir=cfg.dataset_dir, media_roots=cfg.media_roots, **kwargs,
        )  # fmt: skip

    def roots(self, source: str) -> MediaRoots:
        """The media roots of a dataset file: its folder, then `dataset_dir`, then `media_roots`."""
        folders = [Path(source).parent] + ([self.dataset_dir] if self.dataset_dir is not None else [])
        return MediaRoots(roots=folders + list(self.media_roots), fetch_url=self.fetch_url, limits=self.limits)


@attrs.frozen(kw_only=True)
class Sample:
    """One processed sample. input_ids, labels (T,) int64 (labels -100 where not trained); positions
    (3, T) int64; `media` in the thinker's key names (pixel_values (N, 1176), image_grid_thw (n, 3),
    pixel_values_videos, video_grid_thw, video_second_per_grid (n,), input_features (128, sum L),
    audio_feature_lengths (n,)), only the keys of the media present. `notes`: truncations applied."""

    id: str
    where: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    media: Mapping[str, torch.Tensor]
    use_audio_in_video: bool
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to_dict(self) -> dict:
        """The unbatched dict `omnicore.data.collate` takes: input_ids, labels (T,), position_ids (3, T), media."""
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.positions} | dict(self.media)

    def batch(self) -> dict:
        """A one-sample batch for `omnicore.prepare_inputs`: (1, T) ids and labels, (3, 1, T) positions."""
        out = {"input_ids": self.input_ids[None], "labels": self.labels[None], "position_ids": self.positions[:, None]}
        out |= dict(self.media)
        if "video_grid_thw" in self.media:
            out["use_audio_in_video"] = self.use_audio_in_video
        return out


def _image(roots: MediaRoots, path: str, ctx: SampleContext) -> tuple[torch.Tensor, torch.Tensor]:
    with roots.open(path) as f:
        image = decode_image(f, limits=ctx.limits)
    try:
        return process_image(image, ctx.processor)
    except ValueError as e:  # smart_resize: a side under 28 px or an extreme aspect ratio
        raise BadSample(Problem.MEDIA, f"image {path!r}: {e}") from None


def _video(roots: MediaRoots, item, ctx: SampleContext, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
    if isinstance(item, tuple):  # a video given as its frames
        frames = []
        for path in item:
            with roots.open(path) as f:
                frames.append(decode_image(f, limits=ctx.limits))
        video: VideoFrames = video_from_frames(frames, ctx.processor)
        name = item[0]
    else:
        with roots.open(item) as f:
            video = decode_video(f, ctx.processor, limits=ctx.limits)
        name = item
    video, cut = cap_video(video, ctx.length, ctx.processor.temporal_patch_size, name)
    notes += ["video truncated"] * cut
    values, grid = process_video(video.frames, ctx.processor)
    return values, grid, video.second_per_grid


def _audio(roots: MediaRoots, key: AudioKey, conv: Conversation, ctx: SampleContext, notes: list[str]) -> torch.Tensor:
    kind, index = key
    rate = ctx.processor.sampling_rate
    if kind == "file":
        name = conv.audios[index]
        with roots.open(name) as f:
            wave = decode_audio(f, sampling_rate=rate, limits=ctx.limits)
    else:
        name = conv.videos[index]
        if isinstance(name, tuple):
            raise BadSample(Problem.MEDIA, f"video #{index} is a list of frames: it has no sound track to use")
        with roots.open(name) as f:
            wave = decode_video_audio(f, sampling_rate=rate, limits=ctx.limits)
    wave, cut = cap_audio(wave, ctx.length, rate, name)
    notes += ["audio truncated"] * cut
    return audio_features(wave, ctx.processor)


def _fit(conv: Conversation, enc: Encoded, shapes: MediaShapes, ctx: SampleContext, prompt: bool) -> tuple[Conversation, Encoded]:
    """The conversation within `max_seq_len`: as is, its first rounds that fit, or `BadSample`.
    A generation prompt is never truncated (its first rounds would drop the question)."""
    limit = ctx.length.max_seq_len
    if limit is None or len(enc.input_ids) <= limit:
        return conv, enc
    if ctx.length.on_too_long == "truncate" and not prompt:
        # Length grows with the number of rounds kept: binary search for the most rounds that fit.
        best, lo, hi = None, 1, conv.rounds - 1
        while lo <= hi:
            k = (lo + hi) // 2
            sub = conv.first_rounds(k)
            sub_enc = encode_conversation(sub, ctx.tokenizer, shapes, ctx.model, ctx.template)
            if len(sub_enc.input_ids) <= limit:
                best, lo = (sub, sub_enc), k + 1
            else:
                hi = k - 1
        if best is not None:
            return best
    raise BadSample(Problem.TOO_LONG, f"{len(enc.input_ids)} tokens, over max_seq_len {limit}")


def _joined(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat, without copying the common single item (tens of MB for a large image)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _media_keys(images: list, videos: list, clips: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The thinker's batch keys for processed items, each kind concatenated in placeholder order."""
    media = {}
    if images:
        media |= {
            "pixel_values": _joined([v for v, _ in images]),
            "image_grid_thw": torch.stack([g for _, g in images]),
        }
    if videos:
        media |= {
            "pixel_values_videos": _joined([v for v, _, _ in videos]),
            "video_grid_thw": torch.stack([g for _, g, _ in videos]),
            "video_second_per_grid": torch.tensor([s for _, _, s in videos], dtype=torch.float32),
        }
    if clips:  # packed audio form: (n_mels, sum L) and each clip's L
        lengths = torch.tensor([c.shape[1] for c in clips], dtype=torch.long)
        media |= {"input_features": _joined(clips, dim=1), "audio_feature_lengths": lengths}
    return media


def _process(conv: Conversation, ctx: SampleContext, prompt: bool) -> Sample:
    roots, notes = ctx.roots(conv.source), []
    use_aiv = ctx.template.use_audio_in_video if conv.use_audio_in_video is None else conv.use_audio_in_video
    # Media first: the template needs every grid and mel length to lay out the tokens.
    try:
        images = [_image(roots, path, ctx) for path in conv.images]
        videos = [_video(roots, item, ctx, notes) for item in conv.videos]
        audio = {key: _audio(roots, key, conv, ctx, notes) for key in plan_media(conv.texts, use_aiv)[1]}
    except MediaError as e:
        raise BadSample(Problem.MEDIA, str(e)) from None
    shapes = MediaShapes(
        image_grids=[g.tolist() for _, g in images],
        video_grids=[g.tolist() for _, g, _ in videos],
        video_seconds_per_grid=[spg for _, _, spg in videos],
        audio_frames={key: feats.shape[1] for key, feats in audio.items()},
    )
    full = encode_conversation(conv, ctx.tokenizer, shapes, ctx.model, ctx.template, generation_prompt=prompt)
    kept, enc = _fit(conv, full, shapes, ctx, prompt)
    notes += ["text truncated"] * (kept.rounds < conv.rounds)
    # Dropped rounds took their media with them: each kind's kept items are a prefix of its list,
    # and the clips follow the token order (a video's track sits where the video is).
    images, videos = images[: len(kept.images)], videos[: len(kept.videos)]
    clips = [audio[key] for key in enc.audio_order]
    media = _media_keys(images, videos, clips)
    # The position walk re-checks every block against the metadata: a layout bug fails here, loudly.
    queue = MediaQueue(
        image_grids=shapes.image_grids[: len(images)],
        video_grids=shapes.video_grids[: len(videos)],
        video_seconds_per_grid=shapes.video_seconds_per_grid[: len(videos)],
        audio_mel_frames=[c.shape[1] for c in clips],
    )
    positions = sample_positions(ctx.model, enc.input_ids, queue, where=conv.where)
    queue.check_consumed()
    return Sample(
        id=conv.id, where=conv.where, input_ids=torch.tensor(enc.input_ids, dtype=torch.long),
        labels=torch.tensor(enc.labels, dtype=torch.long), positions=positions, media=media,
        use_audio_in_video=use_aiv, notes=tuple(notes),
    )  # fmt: skip


def process_sample(conv: Conversation, ctx: SampleContext, *, generation_prompt: bool = False) -> Sample:
    """The training sample of one conversation; `BadSample` (located) if it cannot be made.

    `generation_prompt`: a prompt for decoding instead, ending in `<|im_start|>assistant\\n` (the
    conversation's last assistant turn, which must be empty, is the answer to generate).
    """
    try:
        return _process(conv, ctx, generation_prompt)
    except BadSample as e:
        raise e.at(conv.where, conv.id) from None


def iter_samples(
    convs: Iterable[Conversation], ctx: SampleContext, stats: DataStats, *, on_bad_sample: str = "skip"
) -> Iterator[Sample]:
    """Process conversations lazily; bad ones are counted in `stats` and skipped (or raised)."""
    if on_bad_sample not in ("skip", "error"):
        raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
    for conv in convs:
        try:
            sample = process_sample(conv, ctx)
        except BadSample as e:
            if on_bad_sample == "error":
                raise
            stats.reject(e)
            continue
        stats.count("samples")
        for note in sample.notes:
            stats.count(note)
        yield sample
