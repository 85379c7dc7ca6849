"""Small tensors merged as batches: bit for bit what the op gives tensor by tensor, errors naming the tensor,
and a handful of reads and writes for thousands of tensors."""

import os
import re

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import ext_sub, merge
from extsub_kernels.engine.batches import SMALL_TENSOR_BYTES, Batch, Batcher
from extsub_kernels.engine.plan import Block, TensorJob
from extsub_kernels.errors import InputError
from extsub_kernels.io import read_header

from checkpoints import save


def _small_model(n: int, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Many small tensors of a few shapes (norms, biases, tiny matrices), and one large one among them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16,), (3, 16), (16,), (), (5, 7), (16,)]
    tensors = {f"t.{i:05d}": torch.randn(shapes[i % len(shapes)], generator=g).to(dtype) for i in range(n)}
    tensors["t.00007"] = torch.randn(300, 300, generator=g).to(dtype)  # 360 kB: streams on its own
    tensors["ids"] = torch.arange(9)
    return tensors


def test_batched_small_tensors_equal_the_op_tensor_by_tensor(tmp_path):
    expert, anti = _small_model(500, seed=1), _small_model(500, seed=2)
    e, a = save(tmp_path / "e.safetensors", expert), save(tmp_path / "a.safetensors", anti)
    merge(e, a, tmp_path / "out.safetensors", lam=[0.5, 2.0])
    for lam in (0.5, 2.0):
        out = load_file(tmp_path / f"out-lam{lam:g}.safetensors")
        for name, p in expert.items():
            expected = ext_sub(p, anti[name], lam) if p.is_floating_point() else p
            assert torch.equal(out[name], expected), name


def test_batches_with_two_anti_experts_a_base_and_an_output_dtype(tmp_path):
    models = [_small_model(120, torch.bfloat16, seed=s) for s in range(4)]
    paths = [save(tmp_path / f"{i}.safetensors", m) for i, m in enumerate(models)]
    merge(paths[0], paths[1:3], tmp_path / "out.safetensors", lam="1:0.5", base=paths[3], dtype="float32")
    out = load_file(tmp_path / "out.safetensors")
    expert, anti1, anti2, base = models
    for name, p in expert.items():
        if not p.is_floating_point():
            assert torch.equal(out[name], p)
            continue
        work = p.float() - base[name].float()
        work = ext_sub(work, anti1[name].float() - base[name].float(), 1.0)
        work = ext_sub(work, anti2[name].float() - base[name].float(), 0.5)
        assert torch.equal(out[name], work + base[name].float()), name


def test_a_run_of_small_tensors_crosses_shards(tmp_path):
    expert, anti = _small_model(400, seed=3), _small_model(400, seed=4)
    e, a = save(tmp_path / "e.safetensors", expert), save(tmp_path / "a.safetensors", anti)
    merge(e, a, tmp_path / "out", max_shard_size=4000)
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 5
    out = {k: v for s in shards for k, v in load_file(s).items()}
    for name, p in expert.items():
        assert torch.equal(out[name], ext_sub(p, anti[name], 1.0) if p.is_floating_point() else p), name


def test_a_nan_in_a_batched_tensor_names_that_tensor_and_row(tmp_path):
    expert, anti = _small_model(60, seed=5), _small_model(60, seed=6)
    anti["t.00031"][1, 4] = float("nan")  # a (3, 16) tensor in the middle of a batch
    e, a = save(tmp_path / "e.safetensors", expert), save(tmp_path / "a.safetensors", anti)
    named = re.escape(f"tensor 't.00031' in ANTI ({a}) contains NaN or Inf")  # the path as it was given
    with pytest.raises(InputError, match=named + ".*row 1"):
        merge(e, a, tmp_path / "out.safetensors")


def test_a_copied_batched_tensor_that_overflows_the_output_dtype_is_named(tmp_path):
    expert = _small_model(60, seed=7)
    expert["t.00040"][3] = 1e6
    e = save(tmp_path / "e.safetensors", expert)
    a = save(tmp_path / "a.safetensors", {"t.00001": torch.zeros(3, 16)})
    with pytest.raises(InputError, match=r"tensor 't.00040' \(copied from EXPERT\) has values up to 1e\+06 beyond"):
        merge(e, a, tmp_path / "out.safetensors", dtype="float16")


def test_thousands_of_tiny_tensors_take_a_handful_of_reads_and_writes(tmp_path, monkeypatch):
    n = 20_000
    expert = {f"w.{i:06d}": torch.randn(2) for i in range(n)}
    anti = {f"w.{i:06d}": torch.randn(2) for i in range(n)}
    e, a = save(tmp_path / "e.safetensors", expert), save(tmp_path / "a.safetensors", anti)
    calls = {"read": 0, "write": 0}
    real_preadv, real_write = os.preadv, os.write

    def counted_preadv(*args):
        calls["read"] += 1
        return real_preadv(*args)

    def counted_write(*args):
        calls["write"] += 1
        return real_write(*args)

    monkeypatch.setattr(os, "preadv", counted_preadv)
    monkeypatch.setattr(os, "write", counted_write)
    merge(e, a, tmp_path / "out.safetensors")
    assert calls["read"] <= 4 and calls["write"] <= 4, calls  # not one per tensor
    out = read_header(tmp_path / "out.safetensors")
    assert len(out.tensors) == n


def test_the_batcher_keeps_order_and_splits_on_kind_and_size():
    def job(name, shape=(4,), antis=(1,)):
        return TensorJob(name, shape, torch.float32, 0, antis)

    batcher = Batcher(limit=48)
    small = [job(f"s{i}") for i in range(5)]
    for j in small[:3]:
        batcher.add_small(j, ("f32", 4), 4, 16, 32)
    batcher.add(Block(job("big", (100, 100)), 0, 100))
    for j in small[3:]:
        batcher.add_small(j, ("f32", 4), 4, 16, 32)
    batcher.add_small(job("copy", antis=()), ("copy", 4), 4, 16, 16)
    batcher.flush()
    kinds = [(type(i).__name__, i.names if isinstance(i, Batch) else i.job.name) for i in batcher.items]
    assert kinds == [("Batch", ["s0", "s1", "s2"]), ("Block", "big"), ("Batch", ["s3", "s4"]), ("Block", "copy")]


def test_tensors_either_side_of_the_small_size_merge_alike(tmp_path):
    just_under = int(SMALL_TENSOR_BYTES // 4) - 1
    sizes = {"a": just_under, "b": just_under, "c": SMALL_TENSOR_BYTES // 4, "d": just_under}
    tensors = {k: torch.randn(n) for k, n in sizes.items()}
    e, a = save(tmp_path / "e.safetensors", tensors), save(tmp_path / "a.safetensors", tensors)
    merge(e, a, tmp_path / "out.safetensors")
    assert all(torch.equal(load_file(tmp_path / "out.safetensors")[k], ext_sub(t, t, 1.0)) for k, t in tensors.items())
