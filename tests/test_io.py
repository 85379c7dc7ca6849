"""The safetensors reader and header-first writer against the `safetensors` library itself."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from checkpoints import leftovers, save as save_checkpoint
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import CheckpointReader, CheckpointWriter, TensorEntry, build_header, parse_size, read_header
from extsub_kernels.io.writer import plan_shards, safetensors_order

SMALL_DICTS = {
    "mixed dtypes": {
        "b.weight": torch.randn(3, 5),
        "a.bias": torch.randn(7).half(),
        "emb": torch.randn(4, 2).bfloat16(),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
    },
    "empty tensors": {"z": torch.zeros(0, 3), "y": torch.ones(2, 0, dtype=torch.bfloat16), "x": torch.ones(1)},
    "unicode and quotes": {'naïve "q"\\k': torch.randn(2, 2), "ω": torch.randn(1)},
    "one scalar": {"s": torch.tensor(1.0)},
}


def _entries(tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    return [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}], ids=["no metadata", "empty metadata", "format=pt"])
@pytest.mark.parametrize("case", SMALL_DICTS)
def test_writer_is_byte_identical_to_safetensors(tmp_path, case, metadata):
    tensors = SMALL_DICTS[case]
    with CheckpointWriter(tmp_path / "out.safetensors", _entries(tensors), metadata) as writer:
        for entry in writer.order:
            writer.write(entry.name, tensors[entry.name])
        writer.commit()
    assert (tmp_path / "out.safetensors").read_bytes() == save(tensors, metadata=metadata)


def test_header_is_padded_to_a_multiple_of_8_with_spaces():
    for n in range(1, 12):
        raw = build_header([TensorEntry("x" * n, torch.float32, (n,))])
        (length,) = struct.unpack("<Q", raw[:8])
        assert length == len(raw) - 8 and length % 8 == 0
        assert raw[8:].rstrip(b" ").endswith(b"}") and set(raw[8 + len(raw[8:].rstrip(b" ")) :]) <= {ord(" ")}


def test_tensors_may_be_written_in_row_blocks(tmp_path):
    t = torch.randn(10, 6)
    with CheckpointWriter(tmp_path / "out.safetensors", _entries({"t": t})) as writer:
        for start in range(0, 10, 3):
            writer.write("t", t[start : start + 3])
        writer.commit()
    assert torch.equal(load_file(tmp_path / "out.safetensors")["t"], t)


def test_writer_refuses_bytes_out_of_header_order(tmp_path):
    tensors = {"a": torch.randn(2), "b": torch.randn(3)}
    with CheckpointWriter(tmp_path / "out.safetensors", _entries(tensors)) as writer:
        with pytest.raises(MergeError, match="header says 'a' comes next"):
            writer.write("b", tensors["b"])
        with pytest.raises(MergeError, match="'a' has 8 bytes in the header but 12"):
            writer.write("a", torch.randn(3))
    assert not (tmp_path / "out.safetensors").exists() and not leftovers(tmp_path)


def test_nothing_appears_before_commit_and_abort_removes_everything(tmp_path):
    tensors = {"a": torch.randn(4, 4)}
    writer = CheckpointWriter(tmp_path / "out", _entries(tensors))
    writer.write("a", tensors["a"])
    assert not (tmp_path / "out").exists() and leftovers(tmp_path), "a temporary folder beside the target"
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_sharded_output_has_a_hugging_face_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(16, 16) for i in range(5)}  # 1 KiB each
    with CheckpointWriter(tmp_path / "out", _entries(tensors), {"format": "pt"}, max_shard_size=2100) as writer:
        for entry in writer.order:
            writer.write(entry.name, tensors[entry.name])
        writer.commit()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert list(index["weight_map"]) == sorted(tensors)
    for name, t in tensors.items():
        shard = load_file(tmp_path / "out" / index["weight_map"][name])
        assert torch.equal(shard[name], t)
    assert all(read_header(tmp_path / "out" / f).metadata == {"format": "pt"} for f in files if f.endswith(".safetensors"))


def test_folder_outputs_take_extra_files_and_generated_ones(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    t = torch.randn(3)
    with CheckpointWriter(tmp_path / "out", _entries({"t": t}), weights_name="adapter_model.safetensors", extra_files=[config]) as writer:
        writer.write("t", t)
        writer.add_text("adapter_config.json", '{"r": 4}')
        writer.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "config.json"]
    assert (tmp_path / "out" / "adapter_config.json").read_text() == '{"r": 4}'


def test_a_tensor_larger_than_the_shard_limit_gets_its_own_shard():
    entries = [TensorEntry("small", torch.float32, (2,)), TensorEntry("big", torch.float32, (100,)), TensorEntry("s2", torch.float32, (2,))]
    shards = plan_shards(entries, 64)
    assert [[e.name for e in group] for _, group in shards] == [["small"], ["big"], ["s2"]]
    assert plan_shards(entries, None)[0][0] == "model.safetensors"


def test_safetensors_order_puts_wide_dtypes_first_then_names():
    entries = _entries({"b": torch.zeros(1, dtype=torch.bool), "a16": torch.zeros(1).half(), "z32": torch.zeros(1), "a32": torch.zeros(1)})
    assert [e.name for e in safetensors_order(entries)] == ["a32", "z32", "a16", "b"]


@pytest.mark.parametrize("text, value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("4096", 4096), (" 1.5kb ", 1500), (77, 77)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["five", "5XB", "-1", "0", ""])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(InputError, match="size"):
        parse_size(text)


def test_an_unwritable_target_fails_when_the_writer_is_created(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create the output folder"):
        CheckpointWriter(blocker / "out.safetensors", [TensorEntry("a", torch.float32, (1,))])


# ---------------------------------------------------------------- reader


def test_reader_reads_every_tensor_and_row_ranges(tmp_path):
    tensors = SMALL_DICTS["mixed dtypes"]
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
    "negative shape": (lambda p: _with_header(p, {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"), r"shape \[-1\] has an integer -1 as dimension 0"),
    "overlapping tensors": (
        lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6),
        "overlaps the previous tensor",
    ),
    "bytes after the last tensor": (
        lambda p: _with_header(p, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 9),
        "5 bytes after the last tensor",
    ),
    "metadata not strings": (lambda p: _with_header(p, {"__metadata__": {"a": 1}}, b""), r"__metadata__\['a'\] is an integer 1, not a string"),
}


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
