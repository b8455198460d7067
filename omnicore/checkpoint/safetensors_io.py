"""Streaming safetensors I/O with validated headers and bounded memory.

The format (huggingface/safetensors): an 8-byte little-endian header length, a JSON header mapping
each tensor name to {dtype, shape, data_offsets} (offsets relative to the data section, plus an
optional "__metadata__" of strings), then the raw little-endian bytes. Files written here load with
the `safetensors` library and vice versa.

Why not `safetensors.safe_open`: it memory-maps whole files, so every page read stays in the
process's resident set until the file is closed, and a truncated file is only detected when a
tensor is touched. Here headers are validated up front (offsets inside the file, sizes consistent
with shapes), tensors are read with plain `readinto` into fresh buffers, and writers stream tensor
by tensor (or chunk by chunk) while hashing, so memory stays near the tensor being moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import torch

__all__ = ["DTYPES", "TensorInfo", "SafetensorsFile", "SafetensorsWriter", "sha256_file", "SafetensorsFormatError", "CHUNK_BYTES"]

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's own limit
# Bounded I/O chunks on purpose: one huge write() call is many times slower than the same bytes in
# a few MB pieces (measured here: 131 MB writes ran at a tenth of the speed), and glibc raises its
# mmap threshold after freeing a large block, so big transient buffers would stay resident.
_CHUNK = CHUNK_BYTES = 4 * 2**20


class SafetensorsFormatError(ValueError):
    """A file that is not a complete, consistent safetensors file; the message names it."""


@attrs.frozen
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class SafetensorsFile:
    """Validated header of one file plus lazy, buffer-copying tensor reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise self._error(f"{size} bytes is too short for a safetensors header")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise self._error(f"header length {header_len} exceeds the file ({size} bytes): truncated or not safetensors")
                header = json.loads(f.read(header_len))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._error(f"unreadable header ({err})") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors = {name: self._entry(name, spec, data_start, size) for name, spec in header.items()}

    def _error(self, message: str) -> SafetensorsFormatError:
        return SafetensorsFormatError(f"{self.path}: {message}")

    def _entry(self, name: str, spec, data_start: int, size: int) -> TensorInfo:
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise self._error(f"tensor {name!r}: malformed header entry {spec!r}") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise self._error(f"tensor {name!r}: bad shape {shape} or offsets {[begin, end]}")
        if end - begin != _numel(shape) * _itemsize(dtype):
            raise self._error(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {spec['dtype']}")
        if data_start + end > size:
            raise self._error(f"tensor {name!r} ends at byte {data_start + end} but the file has {size}: truncated")
        return TensorInfo(dtype=dtype, shape=shape, begin=data_start + begin, nbytes=end - begin)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        """A new tensor holding `name` (no memory map, nothing retained)."""
        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous tensor `out` (same dtype and element count) with `name`'s data."""
        info = self.tensors[name]
        if out.dtype != info.dtype or out.numel() * out.element_size() != info.nbytes or not out.is_contiguous():
            raise ValueError(f"{self.path}: cannot read {name!r} ({info.dtype}, {info.shape}) into {out.dtype} {tuple(out.shape)}")
        if info.nbytes:
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(info.begin)
                for start in range(0, info.nbytes, _CHUNK):
                    if f.readinto(buf[start : start + _CHUNK]) != min(_CHUNK, info.nbytes - start):
                        raise self._error(f"tensor {name!r}: file ended early (truncated)")
        return out

    def read_span(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) of `name` along `dim`, contiguous and alone in memory: along dim 0
        only those bytes are read; along another dim the whole tensor is read, then copied from."""
        if dim == 0:
            return self.read_rows(name, start, stop)
        return self.read(name).narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `name` along dim 0 (a contiguous byte range of the file)."""
        info = self.tensors[name]
        row = _numel(info.shape[1:]) * _itemsize(info.dtype)
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype)
        if row and stop > start:
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(info.begin + start * row)
                if f.readinto(buf) != len(buf):
                    raise self._error(f"tensor {name!r}: file ended early (truncated)")
        return out

    def raw_chunks(self, name: str, chunk: int = _CHUNK) -> Iterable[bytes]:
        """The tensor's bytes as they are on disk, in pieces (for bit-exact copies)."""
        info = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            left = info.nbytes
            while left:
                data = f.read(min(chunk, left))
                if not data:
                    raise self._error(f"tensor {name!r}: file ended early (truncated)")
                left -= len(data)
                yield data


def sha256_file(path: str | Path, chunk: int = _CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            digest.update(data)
    return digest.hexdigest()


def _tensor_chunks(t: torch.Tensor) -> Iterator[memoryview]:
    """A tensor's bytes in row-major order, in pieces of about `_CHUNK` bytes, copying only small
    row blocks when the tensor is a strided view (a TP piece of a row-parallel weight)."""
    t = t.detach().cpu()
    if t.is_contiguous() or t.dim() < 2:
        yield from _chunks(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        return
    rows = max(1, _CHUNK // max(1, t[0].numel() * t.element_size()))
    for start in range(0, t.shape[0], rows):
        yield memoryview(t[start : start + rows].contiguous().reshape(-1).view(torch.uint8).numpy())


def _chunks(view: memoryview) -> Iterator[memoryview]:
    view = view.cast("B")
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


class SafetensorsWriter:
    """Writes one file tensor by tensor in the declared order, hashing as it goes.

    `entries` maps name -> (dtype, shape) in file order; the header is written first, so the
    whole tensor set must be known up front (it always is: shapes come from the layout).
    The sha256 of each chunk is computed on a helper thread while the chunk is written (both
    release the GIL), so hashing costs no extra wall time; `hash=False` skips it.
    `close()` flushes and fsyncs (`durable=False`: no fsync, for files whose loss a reader detects
    and repairs); `sha256` and `nbytes` describe the finished file.
    """

    def __init__(
        self,
        path: str | Path,
        entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        *,
        hash: bool = True,
        durable: bool = True,
    ):
        self.path = Path(path)
        self.durable = durable
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, (dtype, shape) in entries.items():
            nbytes = _numel(tuple(shape)) * _itemsize(dtype)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as the reference does
        self._file = open(self.path, "wb", buffering=0)
        self._digest = hashlib.sha256() if hash else None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256") if hash else None
        self._next = 0
        for piece in _chunks(memoryview(struct.pack("<Q", len(blob)) + blob)):
            self._emit(piece)
        self.nbytes = 8 + len(blob) + offset

    def _emit(self, piece: memoryview) -> int:
        pending = self._hasher.submit(self._digest.update, piece) if self._hasher else None
        written = 0
        while written < len(piece):  # raw writes may be partial
            written += self._file.write(piece[written:])
        if pending:
            pending.result()
        return len(piece)

    def write(self, name: str, data: torch.Tensor | Iterable[torch.Tensor | bytes]) -> None:
        """Append `name`: one tensor (any strides), or chunks (tensors or bytes) that concatenate
        to its bytes in row-major order."""
        expected_name, expected = self._sizes[self._next]
        if name != expected_name:
            raise ValueError(f"{self.path}: expected tensor {expected_name!r} next, got {name!r}")
        written = 0
        for piece in [data] if torch.is_tensor(data) else data:
            for chunk in _tensor_chunks(piece) if torch.is_tensor(piece) else _chunks(memoryview(piece)):
                written += self._emit(chunk)
        if written != expected:
            raise ValueError(f"{self.path}: tensor {name!r} got {written} bytes, its header promises {expected}")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._sizes):
            missing = [n for n, _ in self._sizes[self._next :]]
            self.abort()
            raise ValueError(f"{self.path}: closed before writing {len(missing)} tensor(s), first {missing[0]!r}")
        if self.durable:
            os.fsync(self._file.fileno())
        self.abort()

    def abort(self) -> None:
        """Close without syncing (also after an error: the file is incomplete; its folder is discarded)."""
        self._file.close()
        if self._hasher:
            self._hasher.shutdown()

    @property
    def sha256(self) -> str:
        if self._digest is None:
            raise ValueError(f"{self.path}: written with hash=False")
        return self._digest.hexdigest()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
