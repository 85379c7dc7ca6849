"""The safetensors reader and header-first writer against the `safetensors` library itself."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save

from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import CheckpointWriter, TensorEntry, build_header, read_header
from extsub_kernels.io.writer import _safetensors_order, plan_layout

from checkpoints import leftovers

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
    assert all(
        read_header(tmp_path / "out" / f).metadata == {"format": "pt"} for f in files if f.endswith(".safetensors")
    )


def test_folder_outputs_take_extra_files_and_generated_ones(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    t = torch.randn(3)
    with CheckpointWriter(
        tmp_path / "out", _entries({"t": t}), weights_name="adapter_model.safetensors", extra_files=[config]
    ) as writer:
        writer.write("t", t)
        writer.add_text("adapter_config.json", '{"r": 4}')
        writer.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
    ]
    assert (tmp_path / "out" / "adapter_config.json").read_text() == '{"r": 4}'


def test_a_tensor_larger_than_the_shard_limit_gets_its_own_shard():
    entries = [
        TensorEntry("small", torch.float32, (2,)),
        TensorEntry("big", torch.float32, (100,)),
        TensorEntry("s2", torch.float32, (2,)),
    ]
    shards = plan_layout(entries, folder=True, max_shard_size=64)
    assert [[e.name for e in shard.entries] for shard in shards] == [["small"], ["big"], ["s2"]]
    assert [shard.name for shard in plan_layout(entries, folder=True)] == ["model.safetensors"]
    assert [shard.name for shard in plan_layout(entries, folder=False, max_shard_size=64)] == [""]


def test_safetensors_order_puts_wide_dtypes_first_then_names():
    entries = _entries(
        {
            "b": torch.zeros(1, dtype=torch.bool),
            "a16": torch.zeros(1).half(),
            "z32": torch.zeros(1),
            "a32": torch.zeros(1),
        }
    )
    assert [e.name for e in _safetensors_order(entries)] == ["a32", "z32", "a16", "b"]


def test_an_unwritable_target_fails_when_the_writer_is_created(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create the output folder"):
        CheckpointWriter(blocker / "out.safetensors", [TensorEntry("a", torch.float32, (1,))])


# ---------------------------------------------------------------- reader


def test_a_run_of_tensors_is_written_in_one_call_across_shards(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(10)}  # 16 bytes each
    tensors["empty"] = torch.zeros(0)
    with CheckpointWriter(tmp_path / "out", _entries(tensors), max_shard_size=40) as writer:
        order = writer.order
        data = b"".join(tensors[e.name].numpy().tobytes() for e in order)
        writer.write(order[0].name, data, last=order[-1].name)
        writer.commit()
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) == 5
    out = {k: v for s in shards for k, v in load_file(s).items()}
    assert all(torch.equal(out[k], v) for k, v in tensors.items())


def test_a_run_must_end_exactly_at_its_last_tensor(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)}
    writer = CheckpointWriter(tmp_path / "out.safetensors", _entries(tensors))
    with writer, pytest.raises(MergeError, match="run of tensors through 'b' go past its end"):
        writer.write("a", bytes(24), last="b")
    writer = CheckpointWriter(tmp_path / "out.safetensors", _entries(tensors))
    with writer, pytest.raises(MergeError, match="run of tensors through 'c' end before its end"):
        writer.write("a", bytes(20), last="c")
    assert not leftovers(tmp_path)
