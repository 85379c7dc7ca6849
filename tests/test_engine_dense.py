"""The dense run's memory and its two-pass rows: pooled buffers whatever the model's size or a stage's pace,
and rows longer than a block streamed in pieces with the op's result on the whole row."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import merge
from extsub_kernels.engine import dense, streamer
from extsub_kernels.engine.pipeline import in_flight
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io.writer import CheckpointWriter
from extsub_kernels.kernels import ext_sub_cpu
from extsub_kernels.ops import cpu_backend, op_backend

from checkpoints import random_delta, save
from helpers import TOLERANCES, assert_close_explained, method_oracle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def streamers(monkeypatch) -> list[dense.BlockStreamer]:
    """Every BlockStreamer a merge creates, kept for a look at its pools afterwards."""
    made: list[dense.BlockStreamer] = []

    class Recording(dense.BlockStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dense, "BlockStreamer", Recording)
    return made


def _models(tmp_path: Path, shapes: dict, dtype=torch.bfloat16, roles=("expert", "anti", "base")) -> dict:
    tensors = {role: random_delta(shapes, dtype) for role in roles}
    paths = {role: save(tmp_path / f"{role}.safetensors", t) for role, t in tensors.items()}
    return {"tensors": tensors, "paths": paths}


# ------------------------------------------------------------------ rows longer than a block


@pytest.mark.parametrize(
    ("antis", "lam", "settings", "with_base", "dtype"),
    [
        (["anti"], 0.7, [[0.7]], False, "keep"),
        (["anti"], 0.6, [[0.6]], True, "keep"),
        (["anti", "anti2"], "1:0.5", [[1.0, 0.5]], False, "keep"),
        (["anti"], [0.5, 2.0], [[0.5], [2.0]], False, "float32"),
    ],
    ids=["one anti-expert", "with a base", "two anti-experts", "two λ settings, float32 out"],
)
def test_a_1d_tensor_longer_than_a_block_streams_twice_and_equals_the_op_on_the_whole_row(
    tmp_path, streamers, antis, lam, settings, with_base, dtype
):
    shapes = {"big": (10_000,), "small.weight": (6, 30)}
    models = _models(tmp_path, shapes, roles=("expert", "anti", "anti2", "base"))
    t, p = models["tensors"], models["paths"]
    report = merge(
        p["expert"],
        [p[role] for role in antis],
        tmp_path / "out",
        lam=lam,
        base=p["base"] if with_base else None,
        dtype=dtype,
        block_bytes=4096,  # the 1-D tensor is 20 kB of bf16: five pieces, each read twice
    )
    for path, lams in zip(report.outputs, settings, strict=True):
        out = load_file(path / "model.safetensors")
        for name in shapes:
            base = t["base"][name] if with_base else None
            expected = method_oracle(t["expert"][name], [t[role][name] for role in antis], lams, base=base)
            assert_close_explained(out[name], expected.to(out[name].dtype), *TOLERANCES[out[name].dtype], what=name)
    assert streamers[0].input_pool.capacity <= 4096, "a block holds a piece of the row, never the whole row"
    row_bytes = 10_000 * 2 * (1 + len(antis) + with_base)
    assert report.bytes_read >= 2 * row_bytes, "both passes read the row"


def test_rows_longer_than_a_block_pair_row_by_row(tmp_path):
    models = _models(tmp_path, {"wide.weight": (3, 5000)}, dtype=torch.float32, roles=("expert", "anti"))
    t, p = models["tensors"], models["paths"]
    merge(p["expert"], p["anti"], tmp_path / "out.safetensors", lam=1.3, block_bytes=4096)
    out = load_file(tmp_path / "out.safetensors")["wide.weight"]
    expected = method_oracle(t["expert"]["wide.weight"], [t["anti"]["wide.weight"]], [1.3])
    assert_close_explained(out, expected.float(), *TOLERANCES[torch.float32])


def _gpt2_folder(path: Path, tensors: dict) -> Path:
    save(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return path


@pytest.mark.parametrize("block_bytes", [64 << 10, 256, 24], ids=["one block", "blocks of rows", "pieces of rows"])
def test_conv1d_weights_larger_than_a_block_take_their_column_norms_over_every_block_first(tmp_path, block_bytes):
    shapes = {"h.0.mlp.c_fc.weight": (40, 24), "h.0.attn.c_attn.weight": (24, 72)}
    tensors = {role: random_delta(shapes) for role in ("expert", "anti", "anti2", "base")}
    folders = {role: _gpt2_folder(tmp_path / role, t) for role, t in tensors.items()}
    merge(
        folders["expert"],
        [folders["anti"], folders["anti2"]],
        tmp_path / "out.safetensors",
        base=folders["base"],
        lam="0.5:1.5",
        block_bytes=block_bytes,
    )
    out = load_file(tmp_path / "out.safetensors")
    for name in shapes:
        minus = [tensors["anti"][name], tensors["anti2"][name]]
        expected = method_oracle(
            tensors["expert"][name], minus, [0.5, 1.5], base=tensors["base"][name], transposed=True
        )
        assert_close_explained(out[name], expected.float(), *TOLERANCES[torch.float32], what=name)


def test_a_nan_in_one_piece_of_a_long_row_names_the_input_in_the_norms_pass(tmp_path):
    expert, anti = torch.randn(5000), torch.randn(5000)
    anti[4321] = float("nan")
    e = save(tmp_path / "e.safetensors", {"big": expert})
    a = save(tmp_path / "a.safetensors", {"big": anti})
    named = re.escape(f"tensor 'big' in ANTI ({a}) contains NaN or Inf (1 value")  # the path as it was given
    with pytest.raises(InputError, match=named):
        merge(e, a, tmp_path / "out.safetensors", block_bytes=4096)
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------ memory fixed by construction


def _layers(n: int) -> dict[str, tuple[int, ...]]:
    return {f"layers.{i}.{k}": shape for i in range(n) for k, shape in (("w", (64, 32)), ("norm", (32,)))}


def test_the_pools_are_sized_once_from_the_plan_whatever_the_models_size(tmp_path, streamers):
    for layers in (2, 16):
        models = _models(tmp_path / str(layers), _layers(layers))
        p = models["paths"]
        merge(
            p["expert"],
            p["anti"],
            tmp_path / f"out-{layers}.safetensors",
            base=p["base"],
            method="sub",
            block_bytes=1024,
        )
    small, large = streamers
    for a, b in zip(small.pools, large.pools, strict=True):
        assert (a.capacity, a.count) == (b.capacity, b.count)
        assert a.allocated <= a.count and b.allocated <= b.count  # how many of them a run needs depends on timing
        assert a.in_use == b.in_use == 0, "every buffer came back"
    # three inputs and one result per item in flight (and an input kept until written: none here)
    assert (small.input_pool.count, small.result_pool.count) == (3 * in_flight() + in_flight() - 1, in_flight())
    assert large.workspace.nbytes == small.workspace.nbytes


@pytest.mark.parametrize("slow", ["writer", "reader"])
def test_while_one_stage_waits_nothing_grows(tmp_path, streamers, monkeypatch, slow):
    models = _models(tmp_path, _layers(12))
    p = models["paths"]
    read, written = [0], [0]
    ahead: list[int] = []
    write, read_into = CheckpointWriter.write, dense.CheckpointReader.read_into

    def slow_write(self, name, data, **kwargs):
        if slow == "writer":
            time.sleep(0.005)
        ahead.append(read[0] - written[0])
        write(self, name, data, **kwargs)
        written[0] += 1

    def slow_read(self, *args, **kwargs):
        if slow == "reader":
            time.sleep(0.002)
        return read_into(self, *args, **kwargs)

    original_read = dense.BlockStreamer.read

    def counted_read(self, block):
        read[0] += 1
        return original_read(self, block)

    monkeypatch.setattr(CheckpointWriter, "write", slow_write)
    monkeypatch.setattr(dense.CheckpointReader, "read_into", slow_read)
    monkeypatch.setattr(dense.BlockStreamer, "read", counted_read)
    merge(p["expert"], p["anti"], tmp_path / "out.safetensors", base=p["base"], lam=0.6, block_bytes=1024)
    assert written[0] >= 40 and read[0] == written[0]
    # items between the start of a read and the end of its write: one per stage and one per queue
    assert max(ahead) <= 2 * in_flight() - 1
    if slow == "writer":
        assert max(ahead) >= in_flight(), "the reader ran ahead until the queues and the pool held it back"
    for pool in streamers[0].pools:
        assert pool.allocated <= pool.count and pool.peak_in_use <= pool.count and pool.in_use == 0


def test_an_error_in_one_stage_wakes_a_stage_waiting_for_a_buffer(tmp_path, monkeypatch, streamers):
    models = _models(tmp_path, _layers(8))
    p = models["paths"]
    monkeypatch.setattr(streamer, "in_flight", lambda: 1)  # a pool too small to run ahead: the reader waits on it
    write, calls = CheckpointWriter.write, [0]

    def failing_write(self, name, data, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise MergeError("disk gone")
        write(self, name, data, **kwargs)

    monkeypatch.setattr(CheckpointWriter, "write", failing_write)
    done: list[BaseException] = []

    def run() -> None:
        try:
            merge(p["expert"], p["anti"], tmp_path / "out.safetensors", base=p["base"], block_bytes=1024)
        except BaseException as e:
            done.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the merge hung: a stage kept waiting for a buffer"
    assert isinstance(done[0], MergeError) and str(done[0]) == "disk gone"
    assert streamers[0].input_pool.count == 3 and not (tmp_path / "out.safetensors").exists()


_FAULTS = """
import resource, sys
from extsub_kernels import merge
method, folders = sys.argv[1], sys.argv[2:]
def run(folder, name):
    merge(f"{folder}/e.safetensors", f"{folder}/a.safetensors", f"{folder}/{name}.safetensors",
          base=f"{folder}/b.safetensors", method=method, block_bytes=1 << 20)
for folder in folders:
    run(folder, "warm")  # imports and first-use costs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(folder, "out")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("method", ["sub", "ext-sub"])
def test_page_faults_of_a_merge_follow_its_pools_not_its_inputs(tmp_path, method):
    sizes = (4, 32)
    for n in sizes:
        shapes = {f"t{i}": (512, 1024) for i in range(n)}  # 1 MB of bf16 each: one block per tensor and input
        for role in ("e", "a", "b"):
            save(tmp_path / str(n) / f"{role}.safetensors", random_delta(shapes, torch.bfloat16))
    done = subprocess.run(  # one process measures both sizes, each after a run that warms it up
        [sys.executable, "-c", _FAULTS, method, *(str(tmp_path / str(n)) for n in sizes)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    counts = dict(zip(sizes, map(int, done.stdout.split()), strict=True))
    buffers = (3 * in_flight() + in_flight() - 1) + in_flight()  # the input and result pools, full
    pool_pages = buffers * (1 << 20) // 4096
    input_pages = 32 * 3 * (1 << 20) // 4096
    assert pool_pages + 1000 < input_pages // 4
    assert max(counts.values()) < pool_pages + 1000, f"more faults than the pools' pages ({pool_pages}): {counts}"


# ------------------------------------------------------------------ the op's implementation on CPU


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """(updated, row sums wanted) of every call of the C++ kernel during a test: the op, and the fused pass on
    task vectors."""
    calls: list[tuple[bool, bool]] = []
    run_kernel, run_fused = ext_sub_cpu._run, ext_sub_cpu.ext_sub_task_rows_into

    def recording(p, m, lam, stats, *, write):
        calls.append((write, stats is not None))
        return run_kernel(p, m, lam, stats, write=write)

    def recording_fused(out, p, m, base, lam, *, row_stats=None):
        calls.append((True, row_stats is not None))
        return run_fused(out, p, m, base, lam, row_stats=row_stats)

    monkeypatch.setattr(ext_sub_cpu, "_run", recording)
    monkeypatch.setattr(ext_sub_cpu, "ext_sub_task_rows_into", recording_fused)
    return calls


@pytest.mark.parametrize(
    ("method", "with_base", "expected"),
    [
        ("ext-sub", False, (True, True)),  # the op in place on the block, its row sums from the same pass
        ("ext-sub", True, (True, True)),  # the fused pass on task vectors, its row sums from the same pass
        ("sub", False, (False, True)),  # row sums alone (row_products): sub pairs no rows
    ],
    ids=["in place", "with a base", "sub"],
)
def test_a_cpu_merge_runs_the_cpp_kernel_and_names_it(tmp_path, kernel_calls, method, with_base, expected):
    """The engine's CPU path goes through ops.ext_sub_ / row_products, which take the C++ kernel where it loads;
    the report says which implementation ran (the eager torch path, and why, where the kernel cannot be built)."""
    models = _models(tmp_path, {"a.weight": (48, 64), "b.weight": (64, 48)})
    t, p = models["tensors"], models["paths"]
    report = merge(
        p["expert"],
        p["anti"],
        tmp_path / "out.safetensors",
        lam=0.8,
        method=method,
        base=p["base"] if with_base else None,
        stats=True,
    )
    assert report.kernel == op_backend("cpu") == cpu_backend()
    assert f"op on cpu: {report.kernel}" in report.details()
    if ext_sub_cpu.load() is None:
        assert report.kernel.startswith("torch: eager torch ops; ") and not kernel_calls
    else:
        assert report.kernel.startswith("cpp: C++ kernel (") and expected in kernel_calls, kernel_calls
    out = load_file(tmp_path / "out.safetensors")
    for name in t["expert"]:
        base = t["base"][name] if with_base else None
        want = method_oracle(t["expert"][name], [t["anti"][name]], [0.8], method=method, base=base)
        assert_close_explained(out[name], want, *TOLERANCES[torch.bfloat16], what=name)
        pair = next(s for s in report.stats if s.name == name).pairs[0]
        plus, minus = (t[role][name].double() - (base.double() if with_base else 0.0) for role in ("expert", "anti"))
        cos = torch.nn.functional.cosine_similarity(plus, minus, dim=1)
        measured = [pair.expert_norm, pair.anti_norm, pair.cos.mean, pair.cos.min, pair.cos.max]
        float64 = [plus.norm(), minus.norm(), cos.mean(), cos.min(), cos.max()]
        assert measured == pytest.approx([float(x) for x in float64], rel=1e-5, abs=1e-6), name


def test_without_the_kernel_a_merge_takes_the_eager_path_and_says_why(tmp_path, kernel_calls, monkeypatch):
    models = _models(tmp_path, {"a.weight": (48, 64)})
    p = models["paths"]
    merge(p["expert"], p["anti"], tmp_path / "cpp.safetensors", lam=0.8)
    calls_with = len(kernel_calls)
    monkeypatch.setenv("EXTSUB_CPP_KERNEL", "0")
    ext_sub_cpu._reset_for_tests()
    try:
        without = merge(p["expert"], p["anti"], tmp_path / "torch.safetensors", lam=0.8)
    finally:
        monkeypatch.undo()
        ext_sub_cpu._reset_for_tests()
    assert without.kernel == "torch: eager torch ops; disabled by EXTSUB_CPP_KERNEL=0"
    assert len(kernel_calls) == calls_with, "no call of the C++ kernel once it is disabled"
    ours, eager = load_file(tmp_path / "cpp.safetensors"), load_file(tmp_path / "torch.safetensors")
    assert_close_explained(ours["a.weight"], eager["a.weight"], *TOLERANCES[torch.bfloat16], what="C++ vs eager")
