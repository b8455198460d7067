"""Preprocessed samples in a per-node, content-addressed cache that several processes share safely.

The key is a sha256 over everything a processed sample depends on: the dataset files' bytes, the
conversations read from them, the bytes of every media file they reference (each file hashed once,
streamed, with xxh3-128: content addressing against accidents, not adversaries, at ~10x sha256's speed), the processor, template and length settings, media limits, the model's token / position
config, the tokenizer files, omnicore's version and the source of its processing modules
(`cache_key`). Same inputs, same folder; any change, another folder. Layout under `cache_dir`
(safetensors + JSON only, never pickles):

    builds.log                     one line per build started / committed (who, why)
    <key>.lock                     `fcntl.flock` target: one builder per key, the others wait
    <key>/manifest.json            written last; lists every shard (size) and entry (xxh3-64), self-checksummed
    <key>/shard-00000.safetensors  the tensors of up to `shard_samples` samples, named "<entry>/<key>"
    .build-<key>-<pid>/            a build in progress, renamed to <key>/ only once complete

A folder named by its key exists only after a complete build was renamed into place, so a build that
was killed midway is never read: the next process finds the lock free (the kernel releases a dead
holder's flock), discards the leftover and builds again. Each entry is checked against its xxh3-64
checksum when loaded; a mismatch is a `CorruptEntry` naming the sample and the shard. (xxhash is a
dependency for this: a warm read is bound by memory bandwidth, and xxh3 checks ~15 GB/s where zlib's
crc32 managed ~3, a third of a cached load's time.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import math
import os
import shutil
import socket
import sys
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import torch
import xxhash
from tqdm import tqdm

from omnicore import __version__
from omnicore.checkpoint.commit import fsync_dir, write_durably
from omnicore.checkpoint.safetensors_io import DTYPES, SafetensorsWriter
from omnicore.data.errors import BadSample, DataStats, Problem
from omnicore.data.formats import Conversation
from omnicore.data.media import MediaError, MediaRoots, Reason
from omnicore.data.sample import SampleContext, process_sample
from omnicore.data.workers import WorkerDied, worker_map

__all__ = [
    "CACHE_FORMAT",
    "TOKENIZER_FILES",
    "CacheKey",
    "CacheError",
    "CorruptEntry",
    "Entry",
    "SampleCache",
    "cache_key",
    "open_cache",
    "read_cache",
]

CACHE_FORMAT = 2  # bump when the stored layout or the processing it caches changes meaning
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
MANIFEST = "manifest.json"
MAX_OPEN_SHARDS = 64  # per process: a large cache must not exhaust the descriptor limit (often 1024)
BUILD_LOG = "builds.log"
DECODE_TIMEOUT = 300.0  # seconds one sample may take to decode in a worker process before it is dropped as bad
_HASH_CHUNK = 1 << 20
# The code that turns a record into a sample: its source is part of the key, so an edit to it misses
# existing caches even before anyone bumps the version (a development checkout changes it daily).
PROCESSING_MODULES = ("omnicore.data.formats", "omnicore.data.media", "omnicore.data.image", "omnicore.data.video",
                      "omnicore.data.audio", "omnicore.data.processor", "omnicore.data.length", "omnicore.data.tokenizer",
                      "omnicore.data.template", "omnicore.data.sample", "omnicore.models.positions")  # fmt: skip


class CacheError(ValueError):
    """A cache folder or entry that cannot be used; the message names it."""


class CorruptEntry(CacheError):
    """An entry whose bytes no longer match its checksum: `index`, `id`, `where`, `shard` (in `args`)."""

    def __init__(self, index: int, id: str, where: str, shard: str, detail: str) -> None:
        super().__init__(index, id, where, shard, detail)

    @property
    def index(self) -> int:
        return self.args[0]

    def __str__(self) -> str:
        index, id, where, shard, detail = self.args
        return f"cache entry {index} (id {id!r}, {where}) in {shard}: {detail}"


@attrs.frozen
class CacheKey:
    """`digest` names the cache folder; `inputs` (the per-input digests) is stored in the manifest."""

    digest: str
    inputs: Mapping[str, Any]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_stream(f) -> str:
    digest = xxhash.xxh3_128()
    while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)  # releases the GIL on large updates: threads hash in parallel
    return digest.hexdigest()


def _media_paths(conv: Conversation) -> list[str]:
    """Every media path a conversation references (a video given as frames: each frame)."""
    videos = [p for item in conv.videos for p in (item if isinstance(item, tuple) else (item,))]
    return [*conv.images, *videos, *conv.audios]


def _media_digest(roots: MediaRoots, path: str, fetching: bool) -> tuple[str, str]:
    """(identity, known content digest) of one media path: its real path and "" (to be hashed), or a
    digest standing for the refusal. URL media (only with a fetch hook) are keyed by their URL:
    omnicore never fetches anything just to hash it."""
    try:
        return str(roots.resolve(path)), ""
    except MediaError as e:
        if fetching and e.reason == Reason.URL:
            return f"url:{path}", f"url:{path}"
        return f"refused:{path}", f"refused:{e.reason.value}"


def _media_hashes(convs: Sequence[Conversation], ctx: SampleContext, threads: int) -> list[list[list[str]]]:
    """Per conversation, [path, content digest] of each media path; each real file hashed once."""
    roots = {source: ctx.roots(source) for source in {c.source for c in convs}}
    fetching = ctx.fetch_url is not None
    ident = [[(p, *_media_digest(roots[c.source], p, fetching)) for p in _media_paths(c)] for c in convs]
    files = {real: (roots[c.source], p) for c, row in zip(convs, ident) for p, real, known in row if not known}

    def digest(item: tuple[str, tuple[MediaRoots, str]]) -> tuple[str, str]:
        real, (root, path) = item
        try:
            with root.open(path) as f:  # the same opener (and refusals) as processing
                return real, _hash_stream(f)
        except MediaError as e:
            return real, f"refused:{e.reason.value}"

    with ThreadPoolExecutor(max(1, threads)) as pool:
        content = dict(pool.map(digest, files.items()))
    return [[[p, known or content[real]] for p, real, known in row] for row in ident]


def _code_digest() -> str:
    digest = hashlib.sha256()
    for name in PROCESSING_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return _hash_stream(f)
    except OSError:
        return "absent"  # conversations made in memory: their digest still covers the content


def cache_key(convs: Sequence[Conversation], ctx: SampleContext, *, tokenizer_dir: str | os.PathLike,
              on_bad_sample: str = "skip", threads: int = 4) -> CacheKey:  # fmt: skip
    """The content address of `convs` processed under `ctx` (see the module docstring for what it covers).

    `tokenizer_dir`: the folder `ctx.tokenizer` was loaded from; its `TOKENIZER_FILES` are hashed.
    """
    folder = Path(tokenizer_dir)
    media = _media_hashes(convs, ctx, threads)
    inputs = {
        "format": CACHE_FORMAT,
        "omnicore": __version__,
        "code": _code_digest(),
        "datasets": {source: _file_digest(Path(source)) for source in sorted({c.source for c in convs})},
        "conversations": _sha256(b"\n".join(_canonical(attrs.asdict(c)) for c in convs)),
        "media": _sha256(_canonical(media)),
        "media_files": len({digest for row in media for _, digest in row}),
        "processor": attrs.asdict(ctx.processor),
        "template": attrs.asdict(ctx.template),
        "length": attrs.asdict(ctx.length),
        "limits": attrs.asdict(ctx.limits),
        "fetch_url": ctx.fetch_url is not None,
        "model": _sha256(_canonical(ctx.model.to_hf())),
        "tokenizer": {name: _file_digest(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()},
        "on_bad_sample": on_bad_sample,
    }
    if not inputs["tokenizer"]:
        raise CacheError(f"{folder}: none of the tokenizer files {', '.join(TOKENIZER_FILES)} is there")
    return CacheKey(digest=_sha256(_canonical(inputs)), inputs=inputs)


@attrs.frozen(kw_only=True)
class Entry:
    """One cached sample: where it came from (`conv`: its index in the conversations it was built
    from), which shard holds it, its tensor keys, its token count and its xxh3-64 checksum."""

    id: str
    where: str
    conv: int
    shard: str
    keys: tuple[str, ...] = attrs.field(converter=tuple)
    tokens: int
    checksum: int
    notes: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    use_audio_in_video: bool = False


@attrs.frozen
class _Tensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    nbytes: int


def _pread_exact(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _shard_index(fd: int, name: str, size: int) -> dict[str, _Tensor]:
    """Parse a shard's safetensors header from an open descriptor (offsets checked against `size`)."""
    head = bytearray(8)
    if _pread_exact(fd, memoryview(head), 0) < 8:
        raise CacheError(f"{name}: too short for a safetensors header")
    length = int.from_bytes(head, "little")
    if length > size - 8:
        raise CacheError(f"{name}: header length {length} exceeds the file ({size} bytes)")
    raw = bytearray(length)
    _pread_exact(fd, memoryview(raw), 8)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        index = {}
        for key, spec in header.items():
            begin, end = (int(o) for o in spec["data_offsets"])
            index[key] = _Tensor(DTYPES[spec["dtype"]], tuple(int(d) for d in spec["shape"]), 8 + length + begin, end - begin)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CacheError(f"{name}: unreadable safetensors header ({e})") from None
    for key, t in index.items():
        if t.begin + t.nbytes > size or t.nbytes != math.prod(t.shape) * t.dtype.itemsize:
            raise CacheError(f"{name}: tensor {key!r} does not fit its shape or the file (damaged header)")
    return index


def _add_to_checksum(digest: xxhash.xxh3_64, key: str, tensor: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and bytes to an entry's running checksum."""
    digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class SampleCache:
    """A complete cache, opened read-only: `len(cache)` samples, `load(i)` -> the collate dict
    (input_ids, labels (T,), position_ids (3, T), media keys), `tokens(i)`, `stats` of its build.

    Shards are opened on first use (at most `MAX_OPEN_SHARDS` at a time, least recently used closed
    first) and read with `pread`, so forked loader workers can share descriptors. `rebuild(i)`
    processes an entry's conversation again (for a cache returned by `open_cache`).
    """

    def __init__(self, path: Path, manifest: Mapping[str, Any]):
        self.path = Path(path)
        self.key: str = manifest["key"]
        self.inputs: Mapping[str, Any] = manifest["inputs"]
        self.build: Mapping[str, Any] = manifest["build"]
        self.built = False  # set by `open_cache` when this process built it
        self.entries = tuple(Entry(**e) for e in manifest["entries"])
        stats = manifest["stats"]
        self.stats = DataStats(counts=Counter(stats["counts"]), bad=[BadSample(*b) for b in stats["bad"]])
        self._sizes: dict[str, int] = {name: info["bytes"] for name, info in manifest["files"].items()}
        for name, size in self._sizes.items():
            found = (self.path / name).stat().st_size
            if found != size:
                raise CacheError(f"{self.path / name}: {found} bytes, the manifest says {size}")
        self._open: OrderedDict[str, int] = OrderedDict()
        self._index: dict[str, dict[str, _Tensor]] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._open)
        self._source: tuple[Sequence[Conversation], SampleContext] | None = None

    def _shard(self, name: str) -> tuple[int, dict[str, _Tensor]]:
        """(descriptor, tensor index) of a shard, opening it (and closing the least recently used) if needed."""
        fd = self._open.pop(name, None)
        if fd is None:
            try:
                fd = os.open(self.path / name, os.O_RDONLY)
            except OSError as e:
                raise CacheError(f"{self.path / name}: {e.strerror or e}") from None
            if name not in self._index:
                self._index[name] = _shard_index(fd, str(self.path / name), self._sizes[name])
            if len(self._open) >= MAX_OPEN_SHARDS:
                os.close(self._open.popitem(last=False)[1])
        self._open[name] = fd
        return fd, self._index[name]

    def __len__(self) -> int:
        return len(self.entries)

    def tokens(self, i: int) -> int:
        return self.entries[i].tokens

    def describe(self, i: int) -> str:
        e = self.entries[i]
        return f"sample {i} (id {e.id!r}, {e.where})"

    def load(self, i: int) -> dict[str, torch.Tensor]:
        """Entry `i`'s tensors, checked against its checksum; `CorruptEntry` names it otherwise."""
        e = self.entries[i]
        shard, out, digest = str(self.path / e.shard), {}, xxhash.xxh3_64()
        try:
            fd, index = self._shard(e.shard)
        except CacheError as err:  # a damaged or vanished shard: each of its entries is reported (and repairable)
            raise CorruptEntry(i, e.id, e.where, shard, str(err)) from None
        for key in e.keys:
            info = index.get(f"{i}/{key}")
            if info is None:
                raise CorruptEntry(i, e.id, e.where, shard, f"tensor {key!r} is missing")
            out[key] = torch.empty(info.shape, dtype=info.dtype)
            view = memoryview(out[key].view(-1).view(torch.uint8).numpy())
            if _pread_exact(fd, view, info.begin) != info.nbytes:
                raise CorruptEntry(i, e.id, e.where, shard, f"tensor {key!r} is truncated")
            _add_to_checksum(digest, key, out[key])
        if digest.intdigest() != e.checksum:
            raise CorruptEntry(i, e.id, e.where, shard, f"checksum mismatch (xxh3 {digest.intdigest():016x}, stored {e.checksum:016x})")
        return out

    def attach(self, convs: Sequence[Conversation], ctx: SampleContext) -> SampleCache:
        """Remember the conversations and context it was built from, so `rebuild` can repair entries."""
        self._source = (convs, ctx)
        return self

    def rebuild(self, i: int) -> dict[str, torch.Tensor]:
        """Entry `i` processed again from its conversation (a `BadSample` if that now fails)."""
        if self._source is None:
            raise CacheError(f"{self.path}: opened without its conversations, cannot rebuild {self.describe(i)}")
        convs, ctx = self._source
        return process_sample(convs[self.entries[i].conv], ctx).to_dict()

    def close(self) -> None:
        self._finalizer()


def _manifest_checksum(body: Mapping[str, Any]) -> str:
    return _sha256(_canonical({k: v for k, v in body.items() if k != "checksum"}))


def read_cache(path: str | os.PathLike, *, key: str | None = None) -> SampleCache:
    """Open a committed cache folder; `CacheError` if it is incomplete, damaged or of another key."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: no {MANIFEST} (not a complete cache)") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path / MANIFEST}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("checksum") != _manifest_checksum(manifest):
        raise CacheError(f"{path / MANIFEST}: checksum mismatch (damaged)")
    if manifest.get("format") != CACHE_FORMAT or (key is not None and manifest.get("key") != key):
        raise CacheError(f"{path}: format {manifest.get('format')} / key {manifest.get('key')}, expected {CACHE_FORMAT} / {key}")
    try:
        return SampleCache(path, manifest)
    except (OSError, KeyError, TypeError) as e:
        raise CacheError(f"{path}: incomplete or malformed ({type(e).__name__}: {e})") from None


class _ProcessTask:
    """`worker_map`'s task of a build: conversation index -> ("ok", tensors, meta) or ("bad", BadSample, None)."""

    def __init__(self, convs: Sequence[Conversation], ctx: SampleContext):
        self.convs, self.ctx = convs, ctx

    def __call__(self, index: int) -> tuple[str, Any, Any]:
        try:
            sample = process_sample(self.convs[index], self.ctx)
        except BadSample as e:
            return "bad", e, None
        meta = {"id": sample.id, "where": sample.where, "notes": sample.notes, "use_audio_in_video": sample.use_audio_in_video}
        return "ok", sample.to_dict(), meta


class _ShardWriter:
    """Buffers samples and writes them as safetensors shards of about `max_bytes` / `max_samples`.

    A full shard is checksummed and written on a helper thread while the next samples are processed
    (file writes and xxhash release the GIL); one shard at a time, so memory stays near two shards.
    Each entry dict passed to `add` gets its "shard", "keys" and, once written, its "checksum".
    """

    def __init__(self, folder: Path, max_bytes: int, max_samples: int):
        self.folder, self.max_bytes, self.max_samples = folder, max_bytes, max_samples
        self.buffer: dict[str, torch.Tensor] = {}
        self.entries: list[tuple[int, dict[str, Any]]] = []
        self.bytes = 0
        self.files: dict[str, dict[str, Any]] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cache-writer")
        self._pending = None

    def add(self, index: int, entry: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        entry["shard"] = f"shard-{len(self.files) + (self._pending is not None):05d}.safetensors"
        entry["keys"] = sorted(tensors)
        for key in entry["keys"]:
            # A tensor from a worker lives in shared memory, one descriptor each: copy it out.
            t = tensors[key].clone() if tensors[key].is_shared() else tensors[key].contiguous()
            self.buffer[f"{index}/{key}"] = t
            self.bytes += t.numel() * t.element_size()
        self.entries.append((index, entry))
        if len(self.entries) >= self.max_samples or self.bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        self._wait()
        if self.entries:
            name = self.entries[0][1]["shard"]
            self._pending = self._thread.submit(self._write, name, self.buffer, self.entries)
            self.buffer, self.entries, self.bytes = {}, [], 0

    def _wait(self) -> None:
        if self._pending is not None:
            self.files |= self._pending.result()  # re-raises a failed write here
            self._pending = None

    def _write(self, name: str, buffer: dict[str, torch.Tensor], entries: list[tuple[int, dict[str, Any]]]) -> dict:
        for index, entry in entries:
            digest = xxhash.xxh3_64()
            for key in entry["keys"]:
                _add_to_checksum(digest, key, buffer[f"{index}/{key}"])
            entry["checksum"] = digest.intdigest()
        # No sha256 of the file: each entry's checksum covers its bytes and is checked on every load.
        # Not fsynced: a cache is rebuildable, and shard bytes a power loss drops fail their entries'
        # checksums (or the shard size check) and are processed again; only the manifest is durable.
        with SafetensorsWriter(self.folder / name, {k: (t.dtype, tuple(t.shape)) for k, t in buffer.items()}, hash=False, durable=False) as w:
            for k, t in buffer.items():
                w.write(k, t)
        return {name: {"bytes": w.nbytes}}

    def close(self) -> dict[str, dict[str, Any]]:
        """Write what is left, wait for it; the files written (name -> bytes)."""
        self.flush()
        self._wait()
        return self.files

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._thread.shutdown(wait=True)


def _log(cache_dir: Path, line: str) -> None:
    with open(cache_dir / BUILD_LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid {os.getpid()} {line}\n")


def _build(folder: Path, key: CacheKey, convs: Sequence[Conversation], ctx: SampleContext, *, workers: int, on_bad_sample: str,
           progress: bool, token: str | None, shard_bytes: int, shard_samples: int, decode_timeout: float | None = None) -> None:  # fmt: skip
    """Process every conversation into `folder` (shards, then the manifest, last)."""
    started = time.time()
    stats, entries = DataStats(), []
    bar = tqdm(total=len(convs), desc="building the data cache", unit="sample", disable=None if progress else True, file=sys.stderr)
    with _ShardWriter(folder, shard_bytes, shard_samples) as writer, bar:
        for index, outcome in enumerate(worker_map(_ProcessTask(convs, ctx), range(len(convs)), workers=workers, timeout=decode_timeout)):
            bar.update()
            if isinstance(outcome, WorkerDied):  # a decoder crashed or hung its process twice on this record's media
                conv = convs[index]
                outcome = ("bad", BadSample(Problem.MEDIA, f"{outcome.reason} while decoding it", conv.where, conv.id), None)
            kind, value, meta = outcome
            if kind == "bad":
                if on_bad_sample == "error":
                    raise value
                stats.reject(value)
                continue
            stats.count("samples")
            for note in meta["notes"]:
                stats.count(note)
            entries.append({**meta, "conv": index, "tokens": int(value["input_ids"].numel())})
            writer.add(len(entries) - 1, entries[-1], value)
        files = writer.close()
    body = {
        "format": CACHE_FORMAT,
        "key": key.digest,
        "inputs": key.inputs,
        "build": {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "seconds": round(time.time() - started, 3)},
        "stats": {"counts": dict(stats.counts), "bad": [list(b.args) for b in stats.bad]},
        "files": files,
        "entries": entries,
    }
    write_durably(folder / MANIFEST, json.dumps(body | {"checksum": _manifest_checksum(body)}))


@contextlib.contextmanager
def _locked(lock: Path, *, progress: bool) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (waiting for another holder; a dead holder's lock is freed)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process building {lock.with_suffix('')}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _existing(final: Path, key: str) -> tuple[SampleCache | None, str]:
    """The committed cache at `final`, or None and why it is not usable."""
    if not final.exists():
        return None, "missing"
    try:
        return read_cache(final, key=key), ""
    except CacheError as e:
        return None, f"unusable: {e}"


def open_cache(cache_dir: str | os.PathLike, convs: Sequence[Conversation], ctx: SampleContext, *,
               tokenizer_dir: str | os.PathLike, overwrite: bool = False, build_token: str | None = None,
               workers: int = 0, on_bad_sample: str = "skip", progress: bool = True, decode_timeout: float | None = DECODE_TIMEOUT,
               shard_bytes: int = 64 << 20, shard_samples: int = 256) -> SampleCache:  # fmt: skip
    """The cache of `convs` under `ctx` in `cache_dir`: found, or built here (one builder per key).

    Several processes may call this at once: one builds (with `workers` processes, 0 = in this one)
    while the others wait on the key's lock, then all read the same folder. With workers, a sample
    whose decoding crashes its process or takes longer than `decode_timeout` seconds is a bad sample
    (the process is replaced), never a crashed or hung build. `overwrite` rebuilds,
    except a cache built with the same non-None `build_token` (the ranks of one run share a token, so
    the cache is rebuilt once per run, not once per rank). Bad samples are dropped and counted in
    `SampleCache.stats` (kept in the manifest, so a hit reports the same counts), or raised with
    `on_bad_sample="error"`. The result can `rebuild` corrupt entries from `convs`.
    """
    if on_bad_sample not in ("skip", "error"):
        raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
    cache_dir = Path(cache_dir)
    key = cache_key(convs, ctx, tokenizer_dir=tokenizer_dir, on_bad_sample=on_bad_sample)
    final = cache_dir / key.digest
    if not overwrite:
        found, _ = _existing(final, key.digest)  # the common case needs no lock: a committed folder is final
        if found is not None:
            return found.attach(convs, ctx)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f"{key.digest}.lock", progress=progress):
        found, why = _existing(final, key.digest)
        if found is not None and (not overwrite or (build_token is not None and found.build.get("token") == build_token)):
            return found.attach(convs, ctx)
        why = why or "overwrite_cache"
        if found is not None:
            found.close()
        # Holding the lock, any other build (or replaced) folder of this key belongs to a builder that died.
        for leftover in [*cache_dir.glob(f".build-{key.digest}-*"), *cache_dir.glob(f".old-{key.digest}-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = cache_dir / f".build-{key.digest}-{os.getpid()}"
        tmp.mkdir()
        _log(cache_dir, f"build {key.digest} start ({why}): {len(convs)} conversations")
        try:
            _build(tmp, key, convs, ctx, workers=workers, on_bad_sample=on_bad_sample, progress=progress, decode_timeout=decode_timeout,
                   token=build_token, shard_bytes=shard_bytes, shard_samples=shard_samples)  # fmt: skip
            old = cache_dir / f".old-{key.digest}-{os.getpid()}"
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            fsync_dir(cache_dir)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _log(cache_dir, f"build {key.digest} abandoned")
            raise
        _log(cache_dir, f"build {key.digest} commit")
        cache = read_cache(final, key=key.digest)
    cache.built = True
    return cache.attach(convs, ctx)
