"""The safetensors reader: headers validated up front, tensors and row ranges read lazily, broken files named."""

import json
import math
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load

from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import CheckpointReader, read_header
from extsub_kernels.io.format import DTYPES

from checkpoints import save as save_checkpoint


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
    "garbage header": (
        lambda p: p.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe garbage!!\x00\x00\x00" + b"\0" * 64),
        "not valid JSON",
    ),
    "header is a list": (lambda p: _with_header(p, [1, 2], b""), "not an object"),  # type: ignore[arg-type]
    "offsets past end of file": (
        lambda p: _with_header(p, {"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\0" * 40),
        "ends at byte 400 of the data section but the file holds only 40",
    ),
    "offsets disagree with shape": (
        lambda p: _with_header(p, {"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}, b"\0" * 8),
        "span 8 bytes but dtype F32 and shape",
    ),
    "unknown dtype": (
        lambda p: _with_header(p, {"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        "unknown dtype 'F7'",
    ),
    "negative shape": (
        lambda p: _with_header(p, {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"),
        r"shape \[-1\] has the integer -1 as dimension 0",
    ),
    "overlapping tensors": (
        lambda p: _with_header(
            p,
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
        ),
        "overlaps the previous tensor",
    ),
    "bytes after the last tensor": (
        lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 9),
        "5 bytes after the last tensor",
    ),
    "metadata not strings": (
        lambda p: _with_header(p, {"__metadata__": {"a": 1}}, b""),
        r"__metadata__\['a'\] is the integer 1, not a string",
    ),
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


def _raw_header(path: Path, text: str, data: bytes = b"") -> Path:
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype: str = '"U8"', shape: str = "[1]", offsets: str = "[0,1]", extra: str = "") -> str:
    return f'{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}{extra}}}'


def _one(entry: str, name: str = "w") -> str:
    return f'{{"{name}":{entry}}}'


def _reference_loads(path: Path) -> bool:
    try:
        load(path.read_bytes())
    except Exception:
        return False
    return True


# name: (header text, data bytes, expected message, whether safetensors refuses it too)
HOSTILE = {
    "dtype is a list": (
        _one(_entry(dtype='["U8"]')),
        1,
        r"tensor 'w': dtype is a list \['U8'\], not a string like 'F32'",
        True,
    ),
    "dtype is an object": (
        _one(_entry(dtype='{"a":[1]}')),
        1,
        r"dtype is an object \{'a': \[1\]\}, not a string",
        True,
    ),
    "dtype is a number": (_one(_entry(dtype="7")), 1, "dtype is the integer 7, not a string", True),
    "dtype is null": (_one(_entry(dtype="null")), 1, "dtype is null, not a string", True),
    "an unknown dtype": (_one(_entry(dtype='"F7"')), 1, "unknown dtype 'F7'; expected one of F64, F32", True),
    "an integer of 5000 digits": (
        _one(_entry(shape="[" + "9" * 5000 + "]")),
        1,
        "a 5000-digit integer, where dimensions and offsets are 64-bit",
        True,
    ),
    "JSON nested 100000 deep": (
        '{"w":' + "[" * 100_000 + "]" * 100_000 + "}",
        0,
        "nests JSON deeper than a parser allows",
        True,
    ),
    "a lone surrogate in a tensor name": (
        _one(_entry(), "w\\ud800"),
        1,
        r"a tensor name holds a lone surrogate escape \('w\\ud800'\)",
        True,
    ),
    "a lone surrogate in metadata": (
        '{"__metadata__":{"k":"\\udfff"}}',
        0,
        "__metadata__ entry 'k' holds a lone surrogate escape",
        True,
    ),
    "a tensor named twice": (
        '{"w":' + _entry() + ',"w":' + _entry(offsets="[1,2]") + "}",
        2,
        "the key 'w' twice in one object",
        True,
    ),
    "a field given twice": (_one(_entry(extra=',"dtype":"I8"')), 1, "the key 'dtype' twice in one object", True),
    "NaN": (_one(_entry(shape="[NaN]")), 1, "the literal NaN, which is not JSON", True),
    "a float dimension": (
        _one(_entry(shape="[1.0]")),
        1,
        "the number 1.0, where dimensions and offsets are integers",
        True,
    ),
    "-0 as a dimension": (
        _one(_entry(shape="[-0]", offsets="[0,0]")),
        0,
        r"shape \[-0.0\] has the number -0.0 as dimension 0",
        True,
    ),
    "a string dimension": (_one(_entry(shape='["1"]')), 1, "has the string '1' as dimension 0", True),
    "a boolean dimension": (_one(_entry(shape="[true]")), 1, "has the boolean true as dimension 0", True),
    "shape is an object": (_one(_entry(shape="{}")), 1, "shape is an object {}, not a list of dimensions", True),
    "a missing field": ('{"w":{"dtype":"U8","data_offsets":[0,1]}}', 1, "the header entry has no shape", True),
    "the entry is a list": (
        '{"w":[1]}',
        1,
        r"the header entry is a list \[1\], not an object with dtype, shape and data_offsets",
        True,
    ),
    "shape [2**64, 0]": (
        _one(_entry(shape=f"[{2**64},0]", offsets="[0,0]")),
        0,
        "has the integer 18446744073709551616 as dimension 0",
        True,
    ),
    # safetensors reads the header but no torch tensor can have a dimension past int64
    "shape [2**63, 0]": (
        _one(_entry(shape=f"[{2**63},0]", offsets="[0,0]")),
        0,
        "has the integer 9223372036854775808 as dimension 0",
        True,
    ),
    "shape [2**32, 2**32, 0]": (
        _one(_entry(shape=f"[{2**32},{2**32},0]", offsets="[0,0]")),
        0,
        "overflows 64-bit sizes or strides",
        True,
    ),
    "shape [0, 2**62, 4]": (
        _one(_entry(shape=f"[0,{2**62},4]", offsets="[0,0]")),
        0,
        "overflows 64-bit sizes or strides",
        True,
    ),
    # stricter than safetensors: no weight has 65 dimensions, and millions would slow every later step
    "65 dimensions": (
        _one(_entry(shape="[" + ",".join(["1"] * 65) + "]")),
        1,
        "shape has 65 dimensions, more than the 64 accepted",
        False,
    ),
    # stricter than safetensors, which ignores unknown fields: a field we do not know may change the meaning
    "an unexpected field": (_one(_entry(extra=',"x":[]')), 1, "the header entry has the unexpected field 'x'", False),
    "offsets reversed": (_one(_entry(offsets="[1,0]")), 1, r"data_offsets \[1, 0\] are not \[begin, end\]", True),
    "three offsets": (_one(_entry(offsets="[0,1,1]")), 1, r"data_offsets \[0, 1, 1\] are not \[begin, end\]", True),
    "offsets that overlap": (
        '{"a":' + _entry() + ',"b":' + _entry(shape="[2]", offsets="[0,2]") + "}",
        2,
        "overlaps the previous tensor",
        True,
    ),
    "offsets with a gap": (_one(_entry(offsets="[1,2]")), 2, r"tensor 'w' leaves a gap before it \(offset 1\)", True),
    "bytes after the JSON": (_one(_entry()) + "x", 1, r"not valid JSON \(Extra data", True),
    "NUL padding": (_one(_entry()) + "\0\0\0", 1, r"not valid JSON \(Extra data", True),
    "the header is a string": ('"w"', 0, "the header is the string 'w', not an object of tensors", True),
    "metadata is a list": (
        '{"__metadata__":[]}',
        0,
        r"the header's __metadata__ is a list \[\], not an object of strings",
        True,
    ),
    "a metadata value is null": ('{"__metadata__":{"k":null}}', 0, r"__metadata__\['k'\] is null, not a string", True),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers_give_one_line_naming_the_file(tmp_path, case):
    text, data_bytes, message, reference_refuses = HOSTILE[case]
    path = _raw_header(tmp_path / "hostile.safetensors", text, b"\0" * data_bytes)
    with pytest.raises(InputError, match=message) as info:
        read_header(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and len(text) < 600, text
    assert _reference_loads(path) is not reference_refuses, "this case documents whether safetensors refuses it too"


def test_a_header_length_above_the_format_limit_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(
        InputError, match="header length field says 100000001 bytes, above the 100000000 that safetensors allows"
    ):
        read_header(path)


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening a FIFO to read would wait for a writer: it is refused without blocking
    for path in (fifo, tmp_path):
        with pytest.raises(InputError, match=f"{path}: not a regular file"):
            read_header(path)


# Accepted: safetensors reads these back, so the reader must read them the same.
EDGE_CASES = {
    "an empty header": ("{}", 0),
    "null metadata": ('{"__metadata__":null}', 0),
    "spaces before the JSON": (" " + _one(_entry()), 1),
    "a surrogate pair (one character)": (_one(_entry(), "w\\ud83d\\ude00"), 1),
    "an empty tensor name": (_one(_entry(), ""), 1),
    "shape [0, 2**40]": (_one(_entry('"F32"', f"[0,{2**40}]", "[0,0]")), 0),
    "shape [2**63-1, 0]": (_one(_entry('"F32"', f"[{2**63 - 1},0]", "[0,0]")), 0),
    "shape [2**32, 2**32-1, 0]": (_one(_entry('"BF16"', f"[{2**32},{2**32 - 1},0]", "[0,0]")), 0),
    "64 dimensions": (_one(_entry(shape="[" + ",".join(["1"] * 64) + "]")), 1),
    "empty tensors before and after another": (
        '{"a":'
        + _entry(shape="[0]", offsets="[0,0]")
        + ',"b":'
        + _entry()
        + ',"c":'
        + _entry(shape="[0,3]", offsets="[1,1]")
        + "}",
        1,
    ),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_what_safetensors_reads_back_is_read_the_same(tmp_path, case):
    text, data_bytes = EDGE_CASES[case]
    path = _raw_header(tmp_path / "edge.safetensors", text, bytes(range(1, data_bytes + 1)))
    expected = load(path.read_bytes())
    with CheckpointReader([path]) as reader:
        assert sorted(reader.keys()) == sorted(expected)
        for name, tensor in expected.items():
            got = reader.read(name)
            assert (
                got.dtype == tensor.dtype
                and got.shape == tensor.shape
                and torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))
            )


@pytest.mark.parametrize("code", DTYPES)
def test_dtypes_are_those_the_installed_safetensors_loads_back(tmp_path, code):
    size = DTYPES[code].itemsize
    path = _raw_header(
        tmp_path / "t.safetensors", _one(_entry(f'"{code}"', "[2]", f"[0,{2 * size}]")), b"\0" * 2 * size
    )
    if _reference_loads(path):
        assert read_header(path).tensors["w"].dtype == DTYPES[code]
    else:
        with pytest.raises(InputError, match=f"dtype {code} cannot be loaded back by the installed safetensors"):
            read_header(path)


_DIMS = st.sampled_from([0, 1, 2, 3, 2**31, 2**32 - 1, 2**32, 2**40, 2**61, 2**62, 2**63 - 1, 2**63, 2**64 - 1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(_DIMS, max_size=5).filter(lambda s: 0 in s or math.prod(s) <= 64),
    code=st.sampled_from(["BOOL", "BF16", "F32", "F64"]),
)
def test_a_shape_is_accepted_exactly_when_safetensors_loads_it(tmp_path, shape, code):
    nbytes = math.prod(shape) * DTYPES[code].itemsize
    path = _raw_header(
        tmp_path / "shape.safetensors", _one(_entry(f'"{code}"', json.dumps(shape), f"[0,{nbytes}]")), b"\0" * nbytes
    )
    loads = _reference_loads(path)
    try:
        read_header(path)
    except InputError as e:
        assert not loads, f"safetensors loads shape {shape} but the reader refused it: {e}"
    else:
        assert loads, f"the reader accepted shape {shape}, which safetensors cannot load"


def test_a_header_in_use_is_parsed_once_and_a_changed_one_again(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"aa": torch.zeros(2)})
    first = read_header(path)
    assert read_header(path) is first
    save_checkpoint(path, {"bb": torch.zeros(2)})  # same size, another header: never served from the first
    assert list(read_header(path).tensors) == ["bb"]


def test_a_header_of_200k_tensors_reads_in_bounded_time(tmp_path):
    """Scale (issue 13): reading is linear in the tensors, ~5 µs each on the 2-core CI machine (1M in ~5 s,
    benchmarks/bench_read_header.py); 200k take about a second, and the bound leaves 30× for a loaded machine."""
    n = 200_000
    entries = ",".join(
        f'"layers.{i // 1000}.block.{i % 1000}.w":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}'
        for i in range(n)
    )
    path = _raw_header(tmp_path / "many.safetensors", "{" + entries + "}", bytes(n))
    start = time.perf_counter()
    with CheckpointReader([path]) as reader:
        assert len(reader) == n and reader.info("layers.199.block.999.w").offset == path.stat().st_size - 1
    assert time.perf_counter() - start < 30


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
