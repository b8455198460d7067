"""The data pipeline's error types and the counters it returns.

Two kinds of failure, kept apart on purpose: a `DataFormatError` is a damaged dataset file (malformed
JSON, unreadable, wrong top level) and stops the run, naming the file and the line; a `BadSample` is
one record that cannot become a training sample (turn order, placeholder counts, a missing image, too
long) and is dropped and counted in `DataStats`, or raised when the policy is `on_bad_sample="error"`.
A `MediaLimitError` stops the run when a media cap's policy is "error". All are `ValueError`s whose
arguments live in `args`, so they pickle across loader worker processes.
"""

from __future__ import annotations

import enum
from collections import Counter

import attrs

__all__ = ["Problem", "DataFormatError", "BadSample", "MediaLimitError", "DataStats", "MAX_LISTED"]

MAX_LISTED = 1000  # bad samples kept by name in DataStats.bad; the counts cover all of them


class Problem(enum.StrEnum):
    """Why a record was dropped; `BadSample.problem` is one of these."""

    NOT_OBJECT = "not an object"
    MISSING_KEY = "missing key"
    WRONG_TYPE = "wrong type"
    TURN_ORDER = "invalid turn order"
    UNSUPPORTED_ROLE = "unsupported role"
    PLACEHOLDERS = "placeholder/media count mismatch"
    SPECIAL_TOKEN = "special token in text"
    MEDIA = "media error"
    MEDIA_LIMIT = "media over limit"
    TOO_LONG = "too long"


class DataFormatError(ValueError):
    """A dataset file that cannot be read: `path`, `line` (1-based, 0 if unknown), `column`, `message`."""

    def __init__(self, path: str, line: int, column: int, message: str) -> None:
        super().__init__(str(path), int(line), int(column), message)

    @property
    def path(self) -> str:
        return self.args[0]

    @property
    def line(self) -> int:
        return self.args[1]

    @property
    def column(self) -> int:
        return self.args[2]

    def __str__(self) -> str:
        where = self.path + (f":{self.line}" if self.line else "") + (f":{self.column}" if self.column else "")
        return f"{where}: {self.args[3]}"


class BadSample(ValueError):
    """One record that cannot be used: `problem` (a `Problem`), `detail`, `where` (file:line), `id`."""

    def __init__(self, problem: Problem, detail: str, where: str = "", id: str = "") -> None:
        super().__init__(Problem(problem), detail, where, id)

    @property
    def problem(self) -> Problem:
        return self.args[0]

    @property
    def detail(self) -> str:
        return self.args[1]

    @property
    def where(self) -> str:
        return self.args[2]

    @property
    def id(self) -> str:
        return self.args[3]

    def at(self, where: str, id: str) -> BadSample:
        """The same error, located (raised deep down without knowing the record, located on the way up)."""
        return BadSample(self.problem, self.detail, self.where or where, self.id or id)

    def __str__(self) -> str:
        head = " ".join(part for part in (self.where, f"(id {self.id})" if self.id else "") if part)
        return f"{head + ': ' if head else ''}{self.problem.value}: {self.detail}"


class MediaLimitError(ValueError):
    """A media item over `max_audio_seconds` / `max_video_frames` under `on_media_limit="error"`.

    Deliberately not a `BadSample`: the user asked for the run to stop, so skipping policies
    (`on_bad_sample="skip"`) do not swallow it.
    """


@attrs.define
class DataStats:
    """Counters of a read or processing pass, and the first `MAX_LISTED` bad samples by name.

    Count keys are plain strings: "records", "samples", "dropped: <problem>", "audio truncated", ...
    """

    counts: Counter = attrs.Factory(Counter)
    bad: list[BadSample] = attrs.Factory(list)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def reject(self, error: BadSample) -> None:
        self.counts[f"dropped: {error.problem.value}"] += 1
        if len(self.bad) < MAX_LISTED:
            self.bad.append(error)

    @property
    def dropped(self) -> int:
        return sum(n for key, n in self.counts.items() if key.startswith("dropped: "))

    def merge(self, other: DataStats) -> DataStats:
        """A new DataStats holding both."""
        counts = Counter(self.counts)
        counts.update(other.counts)  # not `+`, which would drop keys counted 0
        return DataStats(counts=counts, bad=(self.bad + other.bad)[:MAX_LISTED])

    def report(self) -> str:
        """The counts, one `key: n` per line, sorted by key."""
        return "\n".join(f"{key}: {n}" for key, n in sorted(self.counts.items()))
