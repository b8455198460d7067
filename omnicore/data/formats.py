"""Dataset readers: JSON / JSONL records in the LLaVA, mllm and sharegpt layouts -> `Conversation`s.

Layouts (data_formats.md): LLaVA (`conversations` of `from`/`value` with `human`/`gpt`, `image` one
path, a list, or absent), mllm (`messages` of `role`/`content` with `user`/`assistant`, plus `images`,
`videos`, `audios`; LLaMA-Factory's `<video><audio>` pairs), and sharegpt with any column / tag names
(`Attr`, which MindSpeed-MM's `dataset_param.attr` block maps onto). Each record is read with the
configured `Attr` when its messages column is present, else with the mllm or LLaVA names, so the
seed's mixed files need no config edit. Turn rules are LLaMA-Factory's: an optional system prompt
(a `system` column or a first system-role message), then user / assistant alternating, ending on the
assistant. A record breaking a rule is a `BadSample`; a damaged file is a `DataFormatError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

from omnicore.data.errors import BadSample, DataFormatError, DataStats, Problem

__all__ = [
    "Attr",
    "LLAVA",
    "MLLM",
    "Turn",
    "Conversation",
    "PLACEHOLDER",
    "iter_records",
    "parse_record",
    "read_dataset",
]

PLACEHOLDER = re.compile(r"<(image|video|audio)>")
_KINDS = ("image", "video", "audio")
_STR = attrs.validators.instance_of(str)
_OPTIONAL_STR = attrs.validators.optional(_STR)


@attrs.frozen(kw_only=True)
class Attr:
    """Column and tag names of a sharegpt-style record (LLaMA-Factory `columns` + `tags`, flat).

    Defaults are the LLaVA names, as MindSpeed-MM's. A media column left None is looked up under
    the standard names (`images` / `image`, `videos` / `video`, `audios` / `audio`).
    """

    messages: str = attrs.field(default="conversations", validator=_STR)
    role_tag: str = attrs.field(default="from", validator=_STR)
    content_tag: str = attrs.field(default="value", validator=_STR)
    user_tag: str = attrs.field(default="human", validator=_STR)
    assistant_tag: str = attrs.field(default="gpt", validator=_STR)
    system_tag: str = attrs.field(default="system", validator=_STR)
    observation_tag: str = attrs.field(default="observation", validator=_STR)
    function_tag: str = attrs.field(default="function_call", validator=_STR)
    system: str | None = attrs.field(default=None, validator=_OPTIONAL_STR)
    images: str | None = attrs.field(default=None, validator=_OPTIONAL_STR)
    videos: str | None = attrs.field(default=None, validator=_OPTIONAL_STR)
    audios: str | None = attrs.field(default=None, validator=_OPTIONAL_STR)


LLAVA = Attr()
MLLM = Attr(messages="messages", role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant")
_STANDARD_MEDIA = {"image": ("images", "image"), "video": ("videos", "video"), "audio": ("audios", "audio")}


@attrs.frozen
class Turn:
    """One message: role "user" or "assistant", text with `<image>`/`<video>`/`<audio>` placeholders."""

    role: str
    text: str


@attrs.frozen(kw_only=True)
class Conversation:
    """One record, validated: turns alternate user / assistant and end on the assistant.

    Media lists hold the record's paths in placeholder order; a video may be a tuple of frame paths.
    `use_audio_in_video` is the record's own setting (None: the template's default). `index` is the
    record's 0-based position in its file, `line` its 1-based line in a JSONL file (None for JSON).
    """

    id: str
    source: str
    index: int
    line: int | None = None
    system: str | None = None
    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()
    videos: tuple[str | tuple[str, ...], ...] = ()
    audios: tuple[str, ...] = ()
    use_audio_in_video: bool | None = None

    def __attrs_post_init__(self) -> None:
        roles = [t.role for t in self.turns]
        if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
            raise ValueError(f"Conversation {self.id!r}: turns must alternate user / assistant and end on the assistant")

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source}[{self.index}]"

    @property
    def texts(self) -> tuple[str, ...]:
        """The system prompt (if any) and every turn's text, in reading order."""
        return ((self.system,) if self.system else ()) + tuple(t.text for t in self.turns)

    @property
    def rounds(self) -> int:
        return len(self.turns) // 2

    def first_rounds(self, k: int) -> Conversation:
        """The first k user / assistant rounds, with the media their placeholders use (a prefix of each list)."""
        kept = self.turns[: 2 * k]
        texts = ((self.system,) if self.system else ()) + tuple(t.text for t in kept)
        used = {kind: sum(len(re.findall(f"<{kind}>", text)) for text in texts) for kind in _KINDS}
        return attrs.evolve(
            self, turns=kept, images=self.images[: used["image"]], videos=self.videos[: used["video"]],
            audios=self.audios[: used["audio"]],
        )  # fmt: skip


def _line_of(data: bytes, position: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, position) + 1
    return line, position - (data.rfind(b"\n", 0, position) + 1) + 1


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, int | None, object]]:
    """(index, line, value) of each record of a JSON array file or a JSONL file.

    A `.jsonl` file, or one whose first non-blank character is not `[`, is read as JSON Lines
    (blank lines skipped). Any syntax or encoding error is a `DataFormatError` naming the line.
    """
    name = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataFormatError(name, 0, 0, f"cannot read: {e.strerror or e}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
        data = data[3:]
    if not name.endswith(".jsonl") and re.match(rb"\s*\[", data):
        yield from _json_array(name, data)
    else:
        yield from _json_lines(name, data)


def _json_array(name: str, data: bytes) -> Iterator[tuple[int, int | None, object]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(name, *_line_of(data, e.start), "invalid UTF-8") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(name, e.lineno, e.colno, f"malformed JSON: {e.msg}") from None
    except RecursionError:
        raise DataFormatError(name, 0, 0, "malformed JSON: nested too deeply") from None
    if not isinstance(values, list):
        raise DataFormatError(name, 1, 1, "a JSON dataset must be an array of records")
    for index, value in enumerate(values):
        yield index, None, value


def _json_lines(name: str, data: bytes) -> Iterator[tuple[int, int | None, object]]:
    index = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataFormatError(name, number, 0, "invalid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataFormatError(name, number, e.colno, f"malformed JSON line: {e.msg}") from None
        except RecursionError:
            raise DataFormatError(name, number, 0, "malformed JSON line: nested too deeply") from None
        yield index, number, value
        index += 1


def _layout(record: Mapping, attr: Attr) -> Attr:
    for candidate in (attr, MLLM, LLAVA):
        if candidate.messages in record:
            return candidate
    names = sorted({attr.messages, MLLM.messages, LLAVA.messages})
    raise BadSample(Problem.MISSING_KEY, f"no message list (looked for {', '.join(map(repr, names))})")


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise BadSample(Problem.WRONG_TYPE, f"{what} must be a string, got {type(value).__name__}")
    return value


def _paths(record: Mapping, kind: str, attr: Attr, layout: Attr) -> tuple:
    """The media list of one kind: a string is a one-item list; a video item may be a frame list."""
    names = (getattr(attr, kind + "s"), getattr(layout, kind + "s")) + _STANDARD_MEDIA[kind]
    column = next((n for n in dict.fromkeys(names) if n is not None and n in record), None)
    value = record.get(column) if column is not None else None
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadSample(Problem.WRONG_TYPE, f"{column!r} must be a path or a list of paths, got {type(value).__name__}")
    out = []
    for i, item in enumerate(items):
        if kind == "video" and isinstance(item, list) and item and all(isinstance(p, str) for p in item):
            out.append(tuple(item))  # a video given as its frames
        elif isinstance(item, str):
            out.append(item)
        else:
            raise BadSample(Problem.WRONG_TYPE, f"{column}[{i}] must be a path string, got {type(item).__name__}")
    return tuple(out)


def _turns(record: Mapping, attr: Attr, layout: Attr) -> tuple[str | None, tuple[Turn, ...]]:
    """(system prompt, turns) under LLaMA-Factory's rules."""
    messages = record[layout.messages]
    if not isinstance(messages, list):
        raise BadSample(Problem.WRONG_TYPE, f"{layout.messages!r} must be a list, got {type(messages).__name__}")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadSample(Problem.WRONG_TYPE, f"{layout.messages}[{i}] must be an object")
        for key in (layout.role_tag, layout.content_tag):
            if key not in message:
                raise BadSample(Problem.MISSING_KEY, f"{layout.messages}[{i}] has no {key!r}")
        role = _text(message[layout.role_tag], f"{layout.messages}[{i}].{layout.role_tag}")
        pairs.append((role, _text(message[layout.content_tag], f"{layout.messages}[{i}].{layout.content_tag}")))
    system = None
    if pairs and pairs[0][0] == layout.system_tag:
        system, pairs = pairs[0][1], pairs[1:]
    else:
        column = attr.system or layout.system or "system"
        if record.get(column) is not None:
            system = _text(record[column], repr(column))
    roles = {layout.user_tag: "user", layout.assistant_tag: "assistant"}
    turns = []
    for i, (role, text) in enumerate(pairs):
        if role in (layout.observation_tag, layout.function_tag):
            raise BadSample(Problem.UNSUPPORTED_ROLE, f"message role {role!r}: tool turns are not supported")
        expected = "user" if i % 2 == 0 else "assistant"
        if roles.get(role) != expected:
            raise BadSample(Problem.TURN_ORDER, f"message {i + 1} has role {role!r}, expected the {expected} role")
        turns.append(Turn(expected, text))
    if not turns or len(turns) % 2:
        raise BadSample(Problem.TURN_ORDER, f"{len(turns)} turn(s): a conversation must end on an assistant turn")
    return system, tuple(turns)


def parse_record(
    record: object, attr: Attr = LLAVA, *, source: str = "", index: int = 0, line: int | None = None
) -> Conversation:
    """One raw record -> a validated `Conversation`; `BadSample` (located) if it breaks a rule."""
    where = f"{source}:{line}" if line is not None else f"{source}[{index}]"
    raw_id = record.get("id") if isinstance(record, dict) else None
    rid = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else f"#{index}"
    try:
        if not isinstance(record, dict):
            raise BadSample(Problem.NOT_OBJECT, f"a record must be a JSON object, got {type(record).__name__}")
        layout = _layout(record, attr)
        system, turns = _turns(record, attr, layout)
        media = {kind: _paths(record, kind, attr, layout) for kind in _KINDS}
        flag = record.get("use_audio_in_video")
        if flag is not None and not isinstance(flag, bool):
            raise BadSample(Problem.WRONG_TYPE, f"use_audio_in_video must be true or false, got {flag!r}")
        texts = ((system,) if system else ()) + tuple(t.text for t in turns)
        for kind in _KINDS:
            tags = sum(len(re.findall(f"<{kind}>", text)) for text in texts)
            if tags != len(media[kind]):
                raise BadSample(Problem.PLACEHOLDERS, f"{tags} <{kind}> tag(s) but {len(media[kind])} {kind} path(s)")
    except BadSample as e:
        raise e.at(where, rid) from None
    return Conversation(
        id=rid, source=source, index=index, line=line, system=system, turns=turns, images=media["image"],
        videos=media["video"], audios=media["audio"], use_audio_in_video=flag,
    )  # fmt: skip


def read_dataset(
    path: str | os.PathLike, attr: Attr = LLAVA, *, max_rows: int | None = None, on_bad_sample: str = "skip"
) -> tuple[list[Conversation], DataStats]:
    """The valid conversations of one file (its first `max_rows` records) and the counts.

    Bad records are dropped and counted (`on_bad_sample="skip"`) or raised (`"error"`); a damaged
    file always raises `DataFormatError`.
    """
    if on_bad_sample not in ("skip", "error"):
        raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
    source, stats, out = os.fspath(path), DataStats(), []
    for index, line, record in iter_records(path):
        if max_rows is not None and index >= max_rows:
            break
        stats.count("records")
        try:
            out.append(parse_record(record, attr, source=source, index=index, line=line))
        except BadSample as e:
            if on_bad_sample == "error":
                raise
            stats.reject(e)
    stats.count("conversations", len(out))
    return out, stats
