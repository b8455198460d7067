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
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import torch

__all__ = ["DTYPES", "TensorInfo", "SafetensorsFile", "SafetensorsWriter", "sha256_file", "SafetensorsFormatError"]

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
# Small I/O chunks on purpose: glibc raises its mmap threshold after freeing a large block, so
# big transient buffers would be recycled from the heap and stay resident.
_CHUNK = 2**20


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
            buf = out.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(info.begin)
                if f.readinto(buf) != info.nbytes:
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


class SafetensorsWriter:
    """Writes one file tensor by tensor in the declared order, hashing as it goes.

    `entries` maps name -> (dtype, shape) in file order; the header is written first, so the
    whole tensor set must be known up front (it always is: shapes come from the layout).
    `close()` flushes and fsyncs; `sha256` and `nbytes` describe the finished file.
    """

    def __init__(self, path: str | Path, entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
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
        self._file = open(self.path, "wb")
        self._digest = hashlib.sha256()
        self._next = 0
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self.nbytes = 8 + len(blob) + offset

    def _emit(self, data) -> None:
        self._file.write(data)
        self._digest.update(data)

    def write(self, name: str, data: torch.Tensor | Iterable[torch.Tensor | bytes]) -> None:
        """Append `name`: one tensor, or chunks (tensors or bytes) that concatenate to its bytes."""
        expected_name, expected = self._sizes[self._next]
        if name != expected_name:
            raise ValueError(f"{self.path}: expected tensor {expected_name!r} next, got {name!r}")
        written = 0
        for piece in [data] if torch.is_tensor(data) else data:
            if torch.is_tensor(piece):
                piece = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            self._emit(piece)
            written += len(piece)
        if written != expected:
            raise ValueError(f"{self.path}: tensor {name!r} got {written} bytes, its header promises {expected}")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._sizes):
            missing = [n for n, _ in self._sizes[self._next :]]
            self._file.close()
            raise ValueError(f"{self.path}: closed before writing {len(missing)} tensor(s), first {missing[0]!r}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Stop writing (after an error): the file is left incomplete; its folder is discarded."""
        self._file.close()

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
