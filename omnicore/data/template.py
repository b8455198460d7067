"""The Qwen2.5-Omni chat template, placeholder expansion and labels, in Python (never the Jinja file).

Layout (qwen2_5_omni.md 5.1): every message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`, with a
system message first (the record's, else `TemplateConfig.system_prompt`). Placeholders (5.2):
`<image>` -> `<|vision_bos|>` `<|IMAGE|>` x t*h*w/4 `<|vision_eos|>`, `<video>` likewise with
`<|VIDEO|>`, `<audio>` -> `<|audio_bos|>` `<|AUDIO|>` x T `<|audio_eos|>`. With audio in video, a
video becomes `<|vision_bos|><|audio_bos|>` V0 A0 V1 A1 ... `<|audio_eos|><|vision_eos|>`, chunked by
`position_id_per_seconds * seconds_per_chunk` temporal positions exactly as the HF processor does.
Text between special tokens is tokenized as one string, as HF tokenizes the rendered conversation.
Labels are LLaMA-Factory's `qwen2_omni`: each assistant turn's content, `<|im_end|>` and the `\\n`
after it; media tokens are never labelled (`train_on_prompt` labels the rest of the prompt too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from omnicore.config import ThinkerConfig
from omnicore.data.errors import BadSample, Problem
from omnicore.data.formats import PLACEHOLDER, Conversation
from omnicore.data.tokenizer import Tokenizer
from omnicore.models.positions import audio_token_count

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "OMNI_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "TemplateConfig",
    "MediaRef",
    "AudioKey",
    "MediaShapes",
    "Encoded",
    "plan_media",
    "chunk_bounds",
    "encode_conversation",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The prompt the Omni model card requires for speech output (the 4.52 processor warns without it).
OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
IGNORE_INDEX = -100
TEMPLATES = ("qwen2_omni",)

# Where a clip's audio comes from: ("file", k) = the record's audios[k]; ("track", j) = the sound
# track of videos[j] (audio in video without a separate file).
AudioKey = tuple[str, int]


_bool = attrs.validators.instance_of(bool)
_optional_str = attrs.validators.optional(attrs.validators.instance_of(str))


@attrs.frozen(kw_only=True)
class TemplateConfig:
    """Chat template settings. `use_audio_in_video` is the default; a record's own key overrides it.

    `label_newline`: label the "\\n" after an assistant's `<|im_end|>` (LLaMA-Factory's qwen2_omni
    does, since its assistant slot is "{content}<|im_end|>\\n"); False labels up to `<|im_end|>`.
    """

    name: str = attrs.field(default="qwen2_omni")
    system_prompt: str | None = attrs.field(default=DEFAULT_SYSTEM_PROMPT, validator=_optional_str)
    train_on_prompt: bool = attrs.field(default=False, validator=_bool)
    mask_history: bool = attrs.field(default=False, validator=_bool)
    label_newline: bool = attrs.field(default=True, validator=_bool)
    use_audio_in_video: bool = attrs.field(default=False, validator=_bool)

    @name.validator
    def _known(self, attribute, value) -> None:
        if value not in TEMPLATES:
            raise ValueError(f"template {value!r} is not supported; omnicore implements {', '.join(TEMPLATES)}")


@attrs.frozen
class MediaRef:
    """A placeholder resolved to its media item: `kind`, `index` into that list, and for a video in
    audio-in-video mode the `audio` it interleaves with (None: a plain video)."""

    kind: str
    index: int
    audio: AudioKey | None = None


@attrs.frozen(kw_only=True)
class MediaShapes:
    """What the template needs to know of processed media: grids, seconds per grid, mel frames."""

    image_grids: Sequence[Sequence[int]] = ()
    video_grids: Sequence[Sequence[int]] = ()
    video_seconds_per_grid: Sequence[float] = ()
    audio_frames: Mapping[AudioKey, int] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class Encoded:
    """Token ids and labels of one conversation; `audio_order` lists its clips in token order."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    audio_order: tuple[AudioKey, ...]


def _messages(conv: Conversation, cfg: TemplateConfig) -> list[tuple[str, str, bool]]:
    """(role, text, has placeholders) in order; the default system prompt is plain text."""
    system = [("system", conv.system, True)] if conv.system else []
    if not system and cfg.system_prompt:
        system = [("system", cfg.system_prompt, False)]
    return system + [(t.role, t.text, True) for t in conv.turns]


def plan_media(
    texts: Sequence[str], use_audio_in_video: bool
) -> tuple[list[list[str | MediaRef]], list[AudioKey]]:
    """Split each text at its placeholders and resolve them to media items, in reading order.

    Items of a kind are consumed in list order. In audio-in-video mode a `<video>` whose next
    placeholder in the same text is `<audio>` pairs with that audio file (LLaMA-Factory's
    `<video><audio>`; the `<audio>` tag is removed); any other video uses its own sound track.
    Returns the pieces of each text and the audio clips in the order their tokens appear.
    """
    used = {"image": 0, "video": 0, "audio": 0}
    out, audio_order = [], []
    for text in texts:
        parts = PLACEHOLDER.split(text)  # [text, kind, text, kind, ..., text]
        strings, kinds = parts[0::2], parts[1::2]
        pieces, skip = [strings[0]], False
        for t, kind in enumerate(kinds):
            if skip:  # the <audio> of a <video><audio> pair
                skip = False
            else:
                index, audio = used[kind], None
                used[kind] += 1
                if kind == "video" and use_audio_in_video:
                    skip = t + 1 < len(kinds) and kinds[t + 1] == "audio"
                    audio = ("file", used["audio"]) if skip else ("track", index)
                    used["audio"] += skip
                elif kind == "audio":
                    audio = ("file", index)
                if audio is not None:
                    audio_order.append(audio)
                pieces.append(MediaRef(kind, index, audio if kind == "video" else None))
            pieces.append(strings[t + 1])
        out.append([p for p in pieces if p != ""])
    return out, audio_order


def chunk_bounds(values: Sequence[float], per_chunk: int) -> list[tuple[int, int]]:
    """Split non-decreasing temporal values into runs at multiples of `per_chunk` (HF's counter rule:
    the chunk counter advances at most once per element, so a jump over a whole chunk lags)."""
    bounds, start, current = [], 0, 1
    for i, v in enumerate(values):
        if v >= current * per_chunk:
            bounds.append((start, i))
            start, current = i, current + 1
    bounds.append((start, len(values)))
    return bounds


class _Builder:
    """Accumulates text (tokenized per run between special tokens) and literal id runs, with labels."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.labels = tokenizer, [], []
        self.buffer, self.spans, self.length = [], [], 0

    def text(self, text: str, label: bool) -> None:
        if text:
            self.spans.append((self.length, self.length + len(text), label))
            self.buffer.append(text)
            self.length += len(text)

    def flush(self) -> None:
        if not self.buffer:
            return
        ids, offsets = self.tok.encode_offsets("".join(self.buffer))
        bad = [i for i in ids if i in self.tok.special_set]
        if bad:
            shown = self.tok.decode(bad[:1])
            raise BadSample(Problem.SPECIAL_TOKEN, f"the text contains the special token {shown!r}")
        labelled = [(s, e) for s, e, label in self.spans if label]
        for token, (a, b) in zip(ids, offsets):
            # A token is labelled when it covers any labelled character (a merge across the prompt /
            # answer boundary, e.g. "\n" + "\n...", counts as answer).
            hit = any(a < e and s < max(b, a + 1) for s, e in labelled)
            self.ids.append(token)
            self.labels.append(token if hit else IGNORE_INDEX)
        self.buffer, self.spans, self.length = [], [], 0

    def add(self, ids: Sequence[int], label: bool) -> None:
        self.flush()
        self.ids += ids
        self.labels += ids if label else [IGNORE_INDEX] * len(ids)


def _video_audio(model: ThinkerConfig, tok: Tokenizer, grid, seconds_per_grid: float, n_audio: int) -> list[int]:
    """The interleaved body of a video with its audio (between the two start and two end tokens)."""
    merge2 = model.vision.spatial_merge_size**2
    per_grid = grid[1] * grid[2] // merge2
    # Float64 values compared with integer thresholds, as the processor (the model floors fp32 values).
    video = [k * seconds_per_grid * model.position_id_per_seconds for k in range(grid[0]) for _ in range(per_grid)]
    per_chunk = int(model.position_id_per_seconds * model.seconds_per_chunk)
    v_chunks, a_chunks = chunk_bounds(video, per_chunk), chunk_bounds(range(n_audio), per_chunk)
    body = []
    for j in range(max(len(v_chunks), len(a_chunks))):
        if j < len(v_chunks):
            body += [tok.special.video] * (v_chunks[j][1] - v_chunks[j][0])
        if j < len(a_chunks):
            body += [tok.special.audio] * (a_chunks[j][1] - a_chunks[j][0])
    return body


def _expand(ref: MediaRef, shapes: MediaShapes, model: ThinkerConfig, tok: Tokenizer) -> list[int]:
    """The token ids of one media block (its start / end tokens included)."""
    s, merge2 = tok.special, model.vision.spatial_merge_size**2
    try:
        if ref.kind == "image":
            t, h, w = shapes.image_grids[ref.index]
            return [s.vision_bos] + [s.image] * (t * h * w // merge2) + [s.vision_eos]
        key = ("file", ref.index) if ref.kind == "audio" else ref.audio
        n = audio_token_count(shapes.audio_frames[key]) if key is not None else 0
        if key is not None and n <= 0:  # under 3 mel frames: the encoder would emit nothing
            raise BadSample(Problem.MEDIA, f"{ref.kind} #{ref.index}: the clip is too short for one audio token")
        if ref.kind == "audio":
            return [s.audio_bos] + [s.audio] * n + [s.audio_eos]
        grid = shapes.video_grids[ref.index]
        if ref.audio is None:
            return [s.vision_bos] + [s.video] * (grid[0] * grid[1] * grid[2] // merge2) + [s.vision_eos]
        body = _video_audio(model, tok, grid, shapes.video_seconds_per_grid[ref.index], n)
        return [s.vision_bos, s.audio_bos] + body + [s.audio_eos, s.vision_eos]
    except (IndexError, KeyError):
        raise BadSample(Problem.PLACEHOLDERS, f"no processed media for {ref.kind} #{ref.index}") from None


def encode_conversation(
    conv: Conversation,
    tokenizer: Tokenizer,
    shapes: MediaShapes,
    model: ThinkerConfig,
    cfg: TemplateConfig,
    *,
    generation_prompt: bool = False,
) -> Encoded:
    """Token ids (T,) and labels (T,) of a conversation whose media `shapes` are known.

    `generation_prompt`: the conversation's last assistant turn is the answer still to be generated.
    It must be empty and is rendered as `<|im_start|>assistant\\n` alone, unlabelled (the HF
    template's `add_generation_prompt`); earlier turns are encoded as usual.
    Raises `BadSample` for text that tokenizes to a special token or media that give no tokens.
    """
    use_aiv = cfg.use_audio_in_video if conv.use_audio_in_video is None else conv.use_audio_in_video
    messages = _messages(conv, cfg)
    pieces, audio_order = plan_media([text if parse else "" for _, text, parse in messages], use_aiv)
    last = max(i for i, (role, _, _) in enumerate(messages) if role == "assistant")
    if generation_prompt and messages[last][1]:
        raise ValueError(
            f"Conversation {conv.id!r}: with generation_prompt the last assistant turn is the answer to generate and must be empty"
        )
    b, s = _Builder(tokenizer), tokenizer.special
    for i, ((role, text, parse), parts) in enumerate(zip(messages, pieces)):
        if generation_prompt and i == last:
            b.add([s.im_start], False)
            b.text("assistant\n", False)
            break
        # LLaMA-Factory: an answer is "{content}<|im_end|>\n" (masked if history under mask_history,
        # even with train_on_prompt); everything else is prompt, labelled only with train_on_prompt.
        if role == "assistant":
            content = not (cfg.mask_history and i != last)
            newline = content and cfg.label_newline
        else:
            content = newline = cfg.train_on_prompt
        b.add([s.im_start], cfg.train_on_prompt)
        b.text(f"{role}\n", cfg.train_on_prompt)
        for part in parts if parse else [text]:
            if isinstance(part, MediaRef):
                b.add(_expand(part, shapes, model, tokenizer), False)
            else:
                b.text(part, content)
        b.add([s.im_end], content)
        b.text("\n", newline)
    b.flush()
    return Encoded(input_ids=tuple(b.ids), labels=tuple(b.labels), audio_order=tuple(audio_order))
