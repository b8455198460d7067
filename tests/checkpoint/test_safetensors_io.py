"""Our streaming safetensors reader / writer interoperate with the reference library and reject
malformed files with a message naming them."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omnicore.checkpoint.safetensors_io import SafetensorsFile, SafetensorsFormatError, SafetensorsWriter, sha256_file

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.arange(7, dtype=torch.int64),
    "c": torch.randn(2, 9, 4).to(torch.bfloat16),
    "empty": torch.zeros(0, 3),
    "strided": torch.randn(6, 10)[:, 2:7],  # a TP piece of a row-parallel weight
}


def test_writer_output_loads_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in TENSORS.items()}, {"format": "pt"}) as w:
        for k, v in TENSORS.items():
            w.write(k, v)
    assert w.sha256 == sha256_file(path) and w.nbytes == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in TENSORS.items():
            assert torch.equal(f.get_tensor(k), v)


def test_reader_reads_safetensors_files_and_rows(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file({k: v.contiguous() for k, v in TENSORS.items()}, str(path))
    f = SafetensorsFile(path)
    for k, v in TENSORS.items():
        assert torch.equal(f.read(k), v) and f.tensors[k].dtype == v.dtype
    assert torch.equal(f.read_rows("c", 1, 2), TENSORS["c"][1:2])
    assert b"".join(f.raw_chunks("a", chunk=7)) == TENSORS["a"].numpy().tobytes()


def test_chunked_writes_and_wrong_sizes(tmp_path):
    t = torch.randn(100, 3)
    with SafetensorsWriter(tmp_path / "z.safetensors", {"t": (t.dtype, (100, 3))}) as w:
        w.write("t", (t[i : i + 30] for i in range(0, 100, 30)))
    assert torch.equal(SafetensorsFile(tmp_path / "z.safetensors").read("t"), t)
    w = SafetensorsWriter(tmp_path / "w.safetensors", {"t": (t.dtype, (100, 3)), "u": (t.dtype, (1,))})
    with pytest.raises(ValueError, match="expected tensor 't' next, got 'u'"):
        w.write("u", torch.zeros(1))
    with pytest.raises(ValueError, match="got 600 bytes, its header promises 1200"):
        w.write("t", t[:50])
    w.abort()


def _raw(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize(
    "content,message",
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "header length 1000000000 exceeds the file"),
        (struct.pack("<Q", 5) + b"nope!", "unreadable header"),
        (_raw({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated"),
        (_raw({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16), "do not hold shape"),
        (_raw({"x": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), "malformed header entry"),
        (_raw({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16), "bad shape"),
    ],
)
def test_malformed_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsFormatError, match=f"bad.safetensors: .*{message}"):
        SafetensorsFile(path)
