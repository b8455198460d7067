"""The one media opener: record paths -> open binary files, with every refusal a `MediaError`.

A record names its media by a path relative to the media roots (default: the dataset file's folder,
then `dataset_dir`, as DESIGN.md section 8). `MediaRoots.open` resolves the path (symlinks included)
and refuses anything that lands outside every root, URLs (unless a fetch hook is given), missing,
empty, oversized and non-regular files. Decoders (`image.py`, `video.py`, `audio.py`) receive the open
file objects, or bytes, never path strings, and turn any failure of the libraries below them into a
`MediaError` naming the file and the reason, so a data pipeline needs to catch exactly one type.
"""

from __future__ import annotations

import contextlib
import enum
import io
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs

__all__ = [
    "Reason",
    "MediaError",
    "MediaLimits",
    "DEFAULT_LIMITS",
    "MediaRoots",
    "MediaSource",
    "media_source",
    "decoding",
]

MediaSource = BinaryIO | bytes | bytearray | memoryview

# "scheme://..." (http, https, file, s3, ...): a Windows drive ("C:\x") has no "//" after the colon.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class Reason(enum.StrEnum):
    """Why a media file was refused; `MediaError.reason` is one of these."""

    MISSING = "missing"
    UNREADABLE = "unreadable"
    NOT_A_FILE = "not a regular file"
    OUTSIDE_ROOTS = "outside the media roots"
    URL = "URL not allowed"
    EMPTY = "empty"
    TOO_LARGE = "too large"
    CORRUPT = "corrupt"
    NO_FRAMES = "no frames"
    NO_AUDIO = "no audio"


class MediaError(ValueError):
    """A media file that cannot be used: `name` (the path or file name), `reason`, `detail`.

    The arguments are kept in `args`, so the error pickles across data-loader worker processes.
    """

    def __init__(self, name: str, reason: Reason, detail: str = "") -> None:
        super().__init__(str(name), Reason(reason), detail)

    @property
    def name(self) -> str:
        return self.args[0]

    @property
    def reason(self) -> Reason:
        return self.args[1]

    @property
    def detail(self) -> str:
        return self.args[2]

    def __str__(self) -> str:
        return f"media {self.name!r}: {self.reason.value}" + (f" ({self.detail})" if self.detail else "")


@attrs.frozen(kw_only=True)
class MediaLimits:
    """Bounds that keep hostile files from exhausting memory or time; each refusal is `TOO_LARGE`.

    `max_pixels` applies to an image or a video frame and is checked from the header, before any
    pixel is decoded (Pillow's own decompression-bomb threshold is the default, about 9459 x 9459).
    """

    max_file_bytes: int = 4 << 30
    max_pixels: int = 89_478_485
    max_video_frames: int = 100_000  # decoded frames per video, about 55 min at 30 fps
    max_audio_seconds: float = 3600.0  # decoded audio per file, before any length policy cuts it

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"MediaLimits.{field.name} must be positive, got {getattr(self, field.name)}")


DEFAULT_LIMITS = MediaLimits()


def _real_roots(roots: Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    real: list[Path] = []
    for root in roots:
        path = Path(os.path.realpath(os.fspath(root)))
        if path not in real:
            real.append(path)
    if not real:
        raise ValueError("MediaRoots needs at least one root folder")
    return tuple(real)


@attrs.frozen(kw_only=True)
class MediaRoots:
    """Ordered root folders that media paths resolve against, and the opener over them.

    `fetch_url` is the hook that enables URL paths (`http(s)://`, `file://`, any `scheme://`): when
    it is None (the default) they are refused; when given, it receives the URL and must return an
    open binary file. omnicore itself never fetches anything.
    """

    roots: tuple[Path, ...] = attrs.field(converter=_real_roots)
    fetch_url: Callable[[str], BinaryIO] | None = None
    limits: MediaLimits = DEFAULT_LIMITS

    @classmethod
    def for_dataset(
        cls, dataset_file: str | os.PathLike, dataset_dir: str | os.PathLike | None = None, **kwargs
    ) -> MediaRoots:
        """The default roots: the dataset file's folder, then `dataset_dir` (when given)."""
        roots = [Path(dataset_file).parent] + ([Path(dataset_dir)] if dataset_dir is not None else [])
        return cls(roots=roots, **kwargs)

    def _inside(self, real: Path) -> bool:
        return any(real.is_relative_to(root) for root in self.roots)

    def resolve(self, path: str | os.PathLike) -> Path:
        """The real (symlink-free) path of a record's media path; `MediaError` if refused.

        A relative path is tried under each root in order and the first existing file wins; an
        absolute path is taken as is. Whatever the path spells (`..`, absolute, symlinks), the real
        path must lie inside one of the roots.
        """
        text = os.fspath(path)
        if _URL.match(text):
            raise MediaError(text, Reason.URL, "URL paths are refused unless MediaRoots(fetch_url=...) is given")
        if not text.strip() or "\x00" in text:
            raise MediaError(text, Reason.MISSING, "empty or invalid path")
        candidates = [Path(text)] if os.path.isabs(text) else [root / text for root in self.roots]
        escaped, not_file = None, None
        for candidate in candidates:
            real = Path(os.path.realpath(candidate))
            if not self._inside(real):
                escaped = real
            elif real.is_file():
                return real
            elif real.exists():
                not_file = real
        if escaped is not None:
            roots = ", ".join(map(str, self.roots))
            raise MediaError(text, Reason.OUTSIDE_ROOTS, f"resolves to {escaped}, outside {roots}")
        if not_file is not None:
            raise MediaError(text, Reason.NOT_A_FILE, str(not_file))
        raise MediaError(text, Reason.MISSING, "not found under " + ", ".join(map(str, self.roots)))

    def open(self, path: str | os.PathLike) -> BinaryIO:
        """An open binary file for a record's media path (use it as a context manager)."""
        text = os.fspath(path)
        if _URL.match(text) and self.fetch_url is not None:
            return self.fetch_url(text)
        real = self.resolve(text)
        # O_NOFOLLOW: the resolved path has no symlinks, so one appearing now is refused, not
        # followed. O_NONBLOCK: opening a FIFO swapped in after `resolve` must not block.
        extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            file = open(real, "rb", opener=lambda p, flags: os.open(p, flags | extra))
        except FileNotFoundError as e:
            raise MediaError(text, Reason.MISSING, str(real)) from e
        except OSError as e:
            raise MediaError(text, Reason.UNREADABLE, f"{real}: {e.strerror or e}") from e
        info = os.fstat(file.fileno())
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = MediaError(text, Reason.NOT_A_FILE, str(real))
        elif info.st_size == 0:
            problem = MediaError(text, Reason.EMPTY, f"{real} has 0 bytes")
        elif info.st_size > self.limits.max_file_bytes:
            problem = MediaError(
                text, Reason.TOO_LARGE, f"{info.st_size} bytes, over max_file_bytes {self.limits.max_file_bytes}"
            )
        if problem is not None:
            file.close()
            raise problem
        return file


def media_source(source: MediaSource) -> tuple[BinaryIO, str]:
    """(binary file object, name for messages) for an open file or in-memory bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), "<bytes>"
    if isinstance(source, (str, os.PathLike)):  # a path here would bypass the roots
        raise TypeError(f"decoders take open files (MediaRoots.open) or bytes, not the path {os.fspath(source)!r}")
    name = getattr(source, "name", None)
    return source, name if isinstance(name, str) else "<stream>"


@contextlib.contextmanager
def decoding(name: str, what: str) -> Iterator[None]:
    """Turn any failure inside a decoder into `MediaError(name, CORRUPT)`.

    Deliberately broad: on hostile bytes Pillow raises SyntaxError, struct.error, IndexError...,
    FFmpeg and libsndfile their own error types; the pipeline should see one clean error instead.
    """
    try:
        yield
    except MediaError:
        raise
    except MemoryError as e:
        raise MediaError(name, Reason.TOO_LARGE, f"{what}: out of memory while decoding") from e
    except Exception as e:
        raise MediaError(name, Reason.CORRUPT, f"{what}: {type(e).__name__}: {e}") from e
