"""The safetensors reader: headers validated up front, tensors and row ranges read lazily, broken files named."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from checkpoints import save as save_checkpoint
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import CheckpointReader, read_header


def _valid_file(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "m.safetensors", {"w": torch.randn(10, 10), "b": torch.randn(10)})


def _with_header(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


BROKEN = {
    "truncated data": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    "truncated header": (lambda p: p.write_bytes(p.read_bytes()[:40]), "truncated or not a safetensors file"),
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x01\x02"), "too short for a safetensors file"),
    "garbage header": (lambda p: p.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe garbage!!\x00\x00\x00" + b"\0" * 64), "not valid JSON"),
    "header is a list": (lambda p: _with_header(p, [1, 2], b""), "not an object"),  # type: ignore[arg-type]
    "offsets past end of file": (
        lambda p: _with_header(p, {"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\0" * 40),
        "ends at byte 400 of the data section but the file holds only 40",
    ),
    "offsets disagree with shape": (
        lambda p: _with_header(p, {"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}, b"\0" * 8),
        "span 8 bytes but dtype F32 and shape",
    ),
    "unknown dtype": (lambda p: _with_header(p, {"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype 'F7'"),
    "negative shape": (lambda p: _with_header(p, {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"), "not a list of non-negative"),
    "overlapping tensors": (
        lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6),
        "overlaps the previous tensor",
    ),
    "bytes after the last tensor": (
        lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 9),
        "5 bytes after the last tensor",
    ),
    "metadata not strings": (lambda p: _with_header(p, {"__metadata__": {"a": 1}}, b""), "__metadata__ must map strings to strings"),
}


def test_reader_reads_every_tensor_and_row_ranges(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.bias": torch.randn(7).half(),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
    }
    path = save_checkpoint(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    with CheckpointReader([path]) as reader:
        assert sorted(reader.keys()) == sorted(tensors) and reader.metadata == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(reader.read(name), t) and reader.info(name).shape == tuple(t.shape)
        buffer = torch.empty(64, dtype=torch.uint8)
        rows = reader.read_into("b.weight", buffer, start=5 * 4, length=2 * 5 * 4)
        assert torch.equal(rows.view(torch.float32).view(2, 5), tensors["b.weight"][1:3])


def test_reader_keys_are_in_file_order_across_shards(tmp_path):
    a = save_checkpoint(tmp_path / "a.safetensors", {"z": torch.zeros(1), "y": torch.zeros(2)})
    b = save_checkpoint(tmp_path / "b.safetensors", {"x": torch.zeros(1)})
    assert CheckpointReader([a, b]).keys() == ["y", "z", "x"]


def test_a_key_in_two_shards_is_refused(tmp_path):
    a = save_checkpoint(tmp_path / "a.safetensors", {"w": torch.zeros(1)})
    b = save_checkpoint(tmp_path / "b.safetensors", {"w": torch.zeros(1)})
    with pytest.raises(InputError, match=r"'w' is in two shards, .*a\.safetensors and .*b\.safetensors"):
        CheckpointReader([a, b], label="EXPERT")


@pytest.mark.parametrize("case", BROKEN)
def test_broken_files_give_an_error_naming_the_file(tmp_path, case):
    path = _valid_file(tmp_path)
    corrupt, message = BROKEN[case]
    corrupt(path)
    with pytest.raises(InputError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_a_file_that_shrinks_during_reading_is_a_merge_error(tmp_path):
    path = _valid_file(tmp_path)
    reader = CheckpointReader([path])
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MergeError, match="truncated or replaced during the merge"):
        reader.read("w")


def test_whole_tensors_read_back_to_back_with_one_pread_per_contiguous_span(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.randn(3) for i in range(50)}
    path = save_checkpoint(tmp_path / "m.safetensors", tensors)
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *args: calls.append(args[2]) or real(*args))
    with CheckpointReader([path]) as reader:
        names = sorted(tensors)[10:40]
        out = torch.empty(1000, dtype=torch.uint8)
        assert reader.read_whole_into(names, out) == 30 * 12
        assert torch.equal(out[:360].view(torch.float32).view(30, 3), torch.stack([tensors[n] for n in names]))
        assert len(calls) == 1
        reader.read_whole_into(["t1", "t9", "t2"], out)  # not adjacent in the file: a read each
        assert len(calls) == 4
