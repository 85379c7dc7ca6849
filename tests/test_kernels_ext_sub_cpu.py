"""The C++ CPU kernel: every dtype pair, thread splits, long rows, conversions, the fallback when it cannot build.

The oracle is `ext_sub_reference`, Algorithm 1 of the paper (§3) computed literally in float64.
"""

import os
import re
import shutil
import signal
import sys
import threading

import numpy as np
import pytest
import torch

from extsub_kernels import ext_sub, ext_sub_, ext_sub_reference
from extsub_kernels.kernels import ext_sub_cpu
from extsub_kernels.ops import cpu_backend, row_products

from helpers import TOLERANCES, assert_close_explained, assert_row_sums_close

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@pytest.fixture
def kernel():
    lib = ext_sub_cpu.load()
    if lib is None:  # a failure, not a skip: CI must not pass without the kernel it ships
        pytest.fail(
            f"the C++ kernel cannot be built here: {ext_sub_cpu.status().detail} "
            "(install a C++ compiler such as g++, or name one in CXX)"
        )
    return lib


@pytest.fixture(scope="session")
def cached_library():
    """The path of the library this run uses (built into the user's cache once, before any test moves the cache)."""
    lib = ext_sub_cpu.load()
    if lib is None:
        pytest.fail(f"the C++ kernel cannot be built here: {ext_sub_cpu.status().detail}")
    return lib.path


@pytest.fixture
def fresh_status(monkeypatch, tmp_path):
    """Let a test decide the kernel's fate again (environment, compiler), and restore it afterwards."""
    monkeypatch.setenv("EXTSUB_CACHE_DIR", str(tmp_path / "cache"))
    ext_sub_cpu._reset_for_tests()
    yield
    monkeypatch.undo()
    ext_sub_cpu._reset_for_tests()


@pytest.fixture
def threads():
    """Run a test at a given torch thread count (more than the machine's cores is fine), then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _pair(shape, p_dtype, m_dtype=None):
    p = torch.randn(shape, dtype=torch.float64)
    m = torch.randn(shape, dtype=torch.float64)
    return p.to(p_dtype), m.to(m_dtype or p_dtype)


@pytest.mark.parametrize("m_dtype", DTYPES)
@pytest.mark.parametrize("p_dtype", DTYPES)
def test_every_dtype_pair(kernel, p_dtype, m_dtype):
    """Arithmetic in float32, or float64 when either side is; the result is rounded once to p's dtype."""
    p, m = _pair((29, 301), p_dtype, m_dtype)
    out = ext_sub(p, m, 1.3, backend="cpp")
    assert out.dtype == p_dtype
    assert_close_explained(out, ext_sub_reference(p, m, 1.3), *TOLERANCES[p_dtype], what=f"{p_dtype}/{m_dtype}")


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("shape", [(2, 5), (5, 7), (64, 33), (3, 4096)], ids=str)
def test_row_ranges_on_several_threads(kernel, threads, monkeypatch, shape, n_threads):
    """Small problems forced onto several threads: chunks of one row and more, a last partial chunk, degenerate rows."""
    threads(n_threads)
    monkeypatch.setattr(ext_sub_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    p, m = _pair(shape, torch.float32)
    p[0] = 0
    m[-1] = 0
    expected = ext_sub_reference(p, m, 0.9)
    ext_sub_(p, m, 0.9, backend="cpp")
    assert_close_explained(p, expected, *TOLERANCES[torch.float32])
    assert torch.equal(p[0], torch.zeros_like(p[0])), "|p| = 0: the row stays"


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1000,), (2, 777), (7, 500)], ids=str)
def test_long_rows_split_by_columns(kernel, threads, monkeypatch, shape, dtype, n_threads):
    """Rows longer than _LONG_ROW and fewer than 4 per thread: partial sums by chunk, then the update by chunk."""
    threads(n_threads)
    monkeypatch.setattr(ext_sub_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(ext_sub_cpu, "_LONG_ROW", 100)
    p, m = _pair(shape, dtype)
    if len(shape) == 2:
        p[1] = 0  # a zero expert row keeps p in the split path too
    expected = ext_sub_reference(p, m, 0.6)
    before = p.clone()
    ext_sub_(p, m, 0.6, backend="cpp")
    assert_close_explained(p, expected, *TOLERANCES[dtype])
    if len(shape) == 2:
        assert torch.equal(p[1], before[1])


# --- row sums (|p|², |m|², p·m per row, docs/design.md §7) ------------------------------------


def _sums_dtype(p_dtype: torch.dtype, m_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose SUM_RTOL applies: float64 lanes when either side is float64, float32 lanes otherwise."""
    return torch.float64 if torch.float64 in (p_dtype, m_dtype) else torch.float32


@pytest.mark.parametrize("m_dtype", DTYPES)
@pytest.mark.parametrize("p_dtype", DTYPES)
def test_row_sums_of_every_dtype_pair_match_the_torch_path(kernel, p_dtype, m_dtype):
    """The sums come from the pass that updates; the update is the same bit for bit with or without them."""
    p, m = _pair((29, 301), p_dtype, m_dtype)
    p[3] = 0  # a zero expert row keeps p and still gets its sums
    plain = ext_sub(p, m, 1.3, backend="cpp")
    ours, torch_path = (torch.empty(29, 3, dtype=torch.float64) for _ in range(2))
    with_sums = ext_sub_(p.clone(), m, 1.3, backend="cpp", row_stats=ours)
    ext_sub_(p.clone(), m, 1.3, backend="torch", row_stats=torch_path)
    assert torch.equal(with_sums, plain), "asking for the sums never changes the update"
    dtype = _sums_dtype(p_dtype, m_dtype)
    assert_row_sums_close(ours, p, m, dtype, f"C++ {p_dtype}/{m_dtype}")
    assert_row_sums_close(torch_path, p, m, dtype, f"torch {p_dtype}/{m_dtype}")


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(5, 7), (64, 33), (3, 4096)], ids=str)
def test_row_sums_on_several_threads(kernel, threads, monkeypatch, shape, n_threads, stats_dtype):
    """Chunks of rows shared by threads each store their own rows' sums, in float32 or float64."""
    threads(n_threads)
    monkeypatch.setattr(ext_sub_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    p, m = _pair(shape, torch.bfloat16)
    stats = torch.full((shape[0], 3), float("nan"), dtype=stats_dtype)
    ext_sub_(p.clone(), m, 0.9, backend="cpp", row_stats=stats)
    assert_row_sums_close(stats, p, m, torch.float32, f"{n_threads} threads")


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1000,), (2, 777)], ids=str)
def test_row_sums_of_long_rows_split_by_columns(kernel, threads, monkeypatch, shape, dtype, n_threads):
    threads(n_threads)
    monkeypatch.setattr(ext_sub_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(ext_sub_cpu, "_LONG_ROW", 100)
    p, m = _pair(shape, dtype)
    rows = shape[0] if len(shape) == 2 else 1
    stats = torch.empty(rows, 3, dtype=torch.float64)
    expected = ext_sub_reference(p, m, 0.6)
    out = ext_sub_(p.clone(), m, 0.6, backend="cpp", row_stats=stats)
    assert_close_explained(out, expected, *TOLERANCES[dtype])
    assert_row_sums_close(stats, p, m, dtype, f"long rows, {n_threads} threads")


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_products_take_the_sums_alone_and_leave_p(kernel, threads, monkeypatch, dtype, n_threads):
    """ops.row_products runs the kernel with the update switched off: p comes back untouched."""
    threads(n_threads)
    monkeypatch.setattr(ext_sub_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    p, m = _pair((40, 130), dtype)
    before = p.clone()
    called = []
    monkeypatch.setattr(ext_sub_cpu, "row_sums", lambda *a: (called.append(1), _row_sums(*a))[1])
    sums = row_products(p, m)
    assert called, "row_products on CPU rows with contiguous columns runs the C++ kernel"
    assert torch.equal(p, before)
    assert_row_sums_close(sums, p, m, _sums_dtype(dtype, dtype), f"row_products {dtype}")


_row_sums = ext_sub_cpu.row_sums


def test_busy_pool_threads_do_not_hold_up_the_call(kernel, threads, monkeypatch):
    """Every pool thread is busy elsewhere (as on an oversubscribed machine): the calling thread
    claims every chunk itself and returns, without waiting for a pool thread to start."""
    threads(2)
    monkeypatch.setattr(ext_sub_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    pool = ext_sub_cpu._executor(1)
    gate = threading.Event()
    for _ in range(ext_sub_cpu._pool_workers):
        pool.submit(gate.wait, 60)
    p, m = _pair((64, 256), torch.float32)
    expected = ext_sub_reference(p, m, 1.0)
    call = threading.Thread(target=ext_sub_, args=(p, m, 1.0), kwargs={"backend": "cpp"})
    call.start()
    call.join(30)
    returned = not call.is_alive()
    gate.set()
    assert returned, "the call waited for a pool thread that had not started"
    assert_close_explained(p, expected, *TOLERANCES[torch.float32])


def test_one_long_row_keeps_its_accuracy(kernel):
    """A 1-D tensor is one row: 2²² float32 elements of one value. Sequential float32 sums of squares
    would drift by ~1e-3 here; blocks of float32 lanes added up in float64 must not."""
    n = 1 << 22
    p = torch.full((n,), 0.1, dtype=torch.float32)
    m = torch.full((n,), -0.3, dtype=torch.float32)  # exactly antiparallel: p' = p − λm
    expected = p.double() - 1.5 * m.double()
    ext_sub_(p, m, 1.5, backend="cpp")
    assert_close_explained(p, expected, *TOLERANCES[torch.float32])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _all_16_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _random_floats(n: int) -> torch.Tensor:
    """float32 values over the whole range, ties and the float16 subnormal and overflow boundaries included."""
    g = torch.Generator().manual_seed(0)
    random_bits = (
        torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=g).to(torch.int32).view(torch.float32)
    )
    halves = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ties = (halves[:-1].double() + (halves[1:].double() - halves[:-1].double()) / 2).float()  # midpoints
    special = torch.tensor([65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-40, 3.4e38, float("inf")])
    finite = torch.cat([random_bits, ties, special])
    return torch.cat([finite, -finite])


def _convert(lib, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(src.shape, dtype=dtype)
    assert lib.convert(src.data_ptr(), CODES[src.dtype], out.data_ptr(), CODES[dtype], src.numel()) == 0
    return out


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit for bit, except that any NaN matches any NaN (payloads differ between conversions)."""
    nan = torch.isnan(expected.float())
    assert torch.equal(torch.isnan(actual.float()), nan), f"{what}: NaN in one and not the other"
    same = _bits(actual) == _bits(expected)
    bad = (~same & ~nan).nonzero().flatten()
    shown = [(hex(int(_bits(actual)[i]) & 0xFFFF), hex(int(_bits(expected)[i]) & 0xFFFF)) for i in bad[:5]]
    assert bad.numel() == 0, f"{what}: {bad.numel()} values differ, first (ours, torch): {shown}"


@pytest.fixture(scope="session")
def soft_f16_kernel(tmp_path_factory):
    """A build with the bit-level half conversions: compiled once per test run (a build takes seconds)."""
    compiler = ext_sub_cpu._compiler()
    if compiler is None:
        pytest.fail("the C++ kernel cannot be built here: no C++ compiler (install g++, or name one in CXX)")
    path, _ = ext_sub_cpu.build(compiler, tmp_path_factory.mktemp("soft-f16"), defines=("EXTSUB_SOFT_F16",))
    lib = ext_sub_cpu._Library(path)
    assert not lib.hardware_f16
    return lib


@pytest.fixture(params=["hardware", "software"])
def f16_kernel(request, kernel):
    """The cached kernel (the compiler's _Float16 where it has one) and the build with bit-level half conversions."""
    return kernel if request.param == "hardware" else request.getfixturevalue("soft_f16_kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversions_match_torch_bit_for_bit(f16_kernel, dtype):
    """Widening: all 2¹⁶ patterns. Rounding: random float32 bits, every midpoint between halves, the edges."""
    patterns = _all_16_bit_patterns(dtype)
    _assert_same_bits(_convert(f16_kernel, patterns, torch.float32), patterns.float(), f"{dtype} → float32")
    floats = _random_floats(1 << 16)
    _assert_same_bits(_convert(f16_kernel, floats, dtype), floats.to(dtype), f"float32 → {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lambda_zero_keeps_every_16_bit_value(f16_kernel, dtype):
    """λ = 0: α = 1, β = −0, so each value, subnormals and ±Inf included, comes back bit for bit."""
    patterns = _all_16_bit_patterns(dtype)
    p = patterns[~torch.isnan(patterns.float())].reshape(1, -1).clone()
    m = torch.ones_like(p)
    expected = p.clone()
    code = CODES[dtype]
    assert f16_kernel.rows(p.data_ptr(), m.data_ptr(), code, code, 0, 1, p.shape[1], 0, 0, 0.0, None, 0, 1) == 0
    _assert_same_bits(p, expected, f"{dtype} at λ = 0")


def test_software_half_build_matches_the_hardware_build(kernel, f16_kernel):
    """The two half conversions give the same results on the whole op (fp16 expert, fp32 anti-expert)."""
    p, m = _pair((16, 1000), torch.float16, torch.float32)
    p[:8] *= 1e-4  # rows whose results fall among the float16 subnormals
    m[8:] *= 3e4  # and rows whose results overflow to ±Inf
    ours, theirs = p.clone(), p.clone()
    for lib, out in ((kernel, ours), (f16_kernel, theirs)):
        assert lib.rows(out.data_ptr(), m.data_ptr(), 0, 2, 0, 16, 1000, 1000, 1000, 0.7, None, 0, 1) == 0
    _assert_same_bits(ours, theirs, "software vs hardware float16")


def test_kernel_after_fork(kernel, threads, tmp_path):
    """A forked child starts a fresh thread pool: the parent's threads do not exist there."""
    threads(2)
    p, m = _pair((256, 1024), torch.float32)
    expected = ext_sub_reference(p, m, 1.0)
    ext_sub_(p.clone(), m, 1.0, backend="cpp")  # the parent's pool now exists
    result = tmp_path / "child.bin"
    pid = os.fork()
    if pid == 0:  # the child runs only the op (torch's own OpenMP pool is not fork-safe) and saves it
        signal.alarm(60)
        try:
            ext_sub_(p, m, 1.0, backend="cpp").numpy().tofile(result)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child ended with wait status {status} (14: hung)"
    child = torch.from_numpy(np.fromfile(result, dtype=np.float32)).reshape(p.shape)
    assert_close_explained(child, expected, *TOLERANCES[torch.float32])


# --- the fallback -------------------------------------------------------------------------


def test_disabled_kernel_falls_back_to_torch(fresh_status, monkeypatch):
    monkeypatch.setenv("EXTSUB_CPP_KERNEL", "0")
    assert cpu_backend() == "torch: eager torch ops; disabled by EXTSUB_CPP_KERNEL=0"
    p, m = _pair((33, 70), torch.bfloat16)
    assert_close_explained(ext_sub(p, m, 1.5), ext_sub_reference(p, m, 1.5), *TOLERANCES[torch.bfloat16])
    with pytest.raises(ValueError, match=r"backend='cpp' is unavailable here: .*EXTSUB_CPP_KERNEL=0.*'torch' runs"):
        ext_sub_(p, m, 1.0, backend="cpp")


@pytest.mark.parametrize(
    "compiler,reason",
    [
        ("/nonexistent/c++", r"C\+\+ kernel unavailable: /nonexistent/c\+\+ did not run"),
        ("failing-cxx", r"C\+\+ kernel unavailable: .*failing-cxx failed \(exit 1\)"),
    ],
)
def test_broken_compiler_falls_back_to_torch(fresh_status, monkeypatch, tmp_path, compiler, reason):
    if compiler == "failing-cxx":  # a compiler that runs and fails
        script = tmp_path / compiler
        script.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(1)\n")
        script.chmod(0o755)
        compiler = str(script)
    monkeypatch.setenv("CXX", compiler)
    assert ext_sub_cpu.status().available is False
    assert re.match("torch: eager torch ops; " + reason, cpu_backend()), cpu_backend()
    p, m = _pair((5, 9), torch.float32)
    assert_close_explained(ext_sub(p, m, 0.5), ext_sub_reference(p, m, 0.5), *TOLERANCES[torch.float32])


def test_no_compiler_on_path_falls_back_to_torch(fresh_status, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cpu_backend() == "torch: eager torch ops; no C++ compiler found (set CXX, or install g++ or clang++)"


def test_cache_is_reused_and_reported(cached_library, fresh_status, monkeypatch, tmp_path):
    """A fresh cache builds once; the next process (here: the next load) finds the library there. The "compiler" copies
    the library already built (a real build is tested by every other test here; this one tests the cache)."""
    compiler = tmp_path / "copying-cxx"
    copy = f"shutil.copy({str(cached_library)!r}, sys.argv[sys.argv.index('-o') + 1])"
    compiler.write_text(f"#!{sys.executable}\nimport shutil, sys\n{copy}\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    first = cpu_backend()
    assert first.startswith("cpp: C++ kernel (") and "built in" in first, first
    ext_sub_cpu._reset_for_tests()
    assert "from the cache" in cpu_backend()


def test_cpp_backend_refuses_other_devices():
    with pytest.raises(ValueError, match=r"backend='cpp' runs on CPU tensors \(got a tensor on meta\)"):
        ext_sub_(torch.zeros(3, 3, device="meta"), torch.zeros(3, 3, device="meta"), 1.0, backend="cpp")


# --- the fused pass on task vectors: out = θ₀ + (p − θ₀) − λ·Ext(m − θ₀) (docs/design.md §5) ----------


def _task_inputs(shape, p_dtype, m_dtype, base_dtype, seed=0):
    """θ₀ and an expert and anti-expert near it (task vectors about 5 % of the weights), with named degenerate rows:
    0: p = θ₀ (|p − θ₀| = 0); 1: m = θ₀ (|m − θ₀| = 0); 2: m − θ₀ = −2(p − θ₀) exactly (antiparallel).
    The degenerate rows hold multiples of ¼ below 8, exact in every dtype (as many as there are rows)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, dtype=torch.float64, generator=g)
    p = base + 0.05 * torch.randn(shape, dtype=torch.float64, generator=g)
    m = base + 0.05 * torch.randn(shape, dtype=torch.float64, generator=g)
    quarters = torch.randint(-16, 16, (3, shape[1]), generator=g).double() / 4
    offsets = [(0.0, 0.5), (0.25, 0.0), (1.0, -2.0)]  # (p − θ₀, m − θ₀) of rows 0, 1, 2
    for row, (dp, dm) in enumerate(offsets[: shape[0]]):
        base[row], p[row], m[row] = quarters[row], quarters[row] + dp, quarters[row] + dm
    return p.to(p_dtype), m.to(m_dtype), base.to(base_dtype)


def _by_the_op(out_dtype, p, m, base, lam, row_stats=None):
    """What the engine's workspace path computes: widen, subtract θ₀, the op (C++), add θ₀, round once."""
    compute = torch.float64 if torch.float64 in (p.dtype, m.dtype, base.dtype) else torch.float32
    wide_base = base.to(compute)
    result = p.to(compute) - wide_base
    ext_sub_(result, m.to(compute) - wide_base, lam, backend="cpp", row_stats=row_stats)
    return (result + wide_base).to(out_dtype)


def _fused(out_dtype, p, m, base, lam, row_stats=None):
    out = torch.full(p.shape, float("nan"), dtype=out_dtype)
    ext_sub_cpu.ext_sub_task_rows_into(out, p, m, base, lam, row_stats=row_stats)
    return out


def _coarser(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=lambda d: TOLERANCES[d][0])


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("m_dtype", DTYPES)
@pytest.mark.parametrize("p_dtype", DTYPES)
def test_fused_task_vectors_every_dtype_combination(kernel, p_dtype, m_dtype, base_dtype, out_dtype):
    """Bit for bit the op's path (result and row sums), within one rounding of the coarser of out's dtype and the
    compute dtype of Algorithm 1 in float64, and the degenerate rows as docs/design.md §1 defines them."""
    p, m, base = _task_inputs((7, 301), p_dtype, m_dtype, base_dtype)
    sums, expected_sums = (torch.full((7, 3), float("nan"), dtype=torch.float64) for _ in range(2))
    ours = _fused(out_dtype, p, m, base, 0.75, sums)
    what = f"{p_dtype}/{m_dtype}/{base_dtype} → {out_dtype}"
    _assert_same_bits(ours, _by_the_op(out_dtype, p, m, base, 0.75, expected_sums), what)
    _assert_same_bits(sums, expected_sums, f"row sums {what}")
    _assert_same_bits(_fused(out_dtype, p, m, base, 0.75), ours, f"without row sums {what}")
    # the oracle: Algorithm 1 (paper §3) literally, in float64, on the task vectors
    theta0 = base.double()
    oracle = theta0 + ext_sub_reference(p.double() - theta0, m.double() - theta0, 0.75, dtype=torch.float64)
    compute = torch.float64 if torch.float64 in (p_dtype, m_dtype, base_dtype) else torch.float32
    assert_close_explained(ours, oracle, *TOLERANCES[_coarser(out_dtype, compute)], what=what)
    assert torch.equal(ours[0].double(), p[0].double()), "|p − θ₀| = 0: the row stays"
    assert torch.equal(ours[1].double(), p[1].double()), "|m − θ₀| = 0: the row stays"
    # here m − θ₀ = −2(p − θ₀) with p − θ₀ = 1: α = 1 + (λ/2)·2, β = −λ/2, exact in every dtype at λ = ¾
    antiparallel = (p[2].double() - 0.75 * (m[2].double() - theta0[2])).to(out_dtype)
    assert torch.equal(ours[2], antiparallel), "antiparallel: Ext(m) = m, out = p − λ(m − θ₀)"


@pytest.mark.parametrize("with_sums", [False, True], ids=["plain", "row sums"])
@pytest.mark.parametrize("n_threads", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(2, 5), (5, 7), (64, 33), (3, 4097), (1, 9000), (40, 257)], ids=str)
def test_fused_task_vectors_on_several_threads(kernel, threads, monkeypatch, shape, n_threads, with_sums):
    """Chunks of rows claimed by several threads (one row each and more, a last partial chunk, rows longer than a
    block of the lanes): every split gives the op's path bit for bit."""
    threads(n_threads)
    monkeypatch.setattr(ext_sub_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    p, m, base = _task_inputs(shape, torch.bfloat16, torch.bfloat16, torch.bfloat16, seed=shape[0])
    sums, expected_sums = (torch.empty(shape[0], 3, dtype=torch.float32) for _ in range(2))
    ours = _fused(torch.bfloat16, p, m, base, 1.1, sums if with_sums else None)
    _assert_same_bits(ours, _by_the_op(torch.bfloat16, p, m, base, 1.1, expected_sums), f"{n_threads} threads")
    if with_sums:
        _assert_same_bits(sums, expected_sums, f"row sums, {n_threads} threads")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_task_vectors_stay_finite_where_sums_underflow(kernel, dtype):
    """Task vectors of 1e-30 (fp32) or of one half subnormal: their squares round to 0, so the rows count as
    degenerate; finite inputs give finite outputs, and a zero task vector keeps p."""
    tiny = 1e-30 if dtype == torch.float32 else 2.0**-24
    base = torch.ones(3, 64, dtype=dtype)
    p = torch.stack([base[0] + tiny, base[1] + 0.5, base[2]])
    m = torch.stack([base[0] + 0.5, base[1] + tiny, base[2] - 0.25])
    out = _fused(dtype, p, m, base, 2.0)
    assert torch.isfinite(out).all()
    _assert_same_bits(out, _by_the_op(dtype, p, m, base, 2.0), "underflowing sums")
    assert torch.equal(out[2], p[2])


def test_fused_task_vectors_refuse_an_out_that_overlaps_an_input(kernel):
    p, m, base = _task_inputs((4, 16), torch.float32, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="out must not share memory with p, m or base"):
        ext_sub_cpu.ext_sub_task_rows_into(p, p, m, base, 1.0)
    with pytest.raises(ValueError, match=r"base must be a CPU tensor of shape \(4, 16\) with contiguous columns"):
        ext_sub_cpu.ext_sub_task_rows_into(torch.empty(4, 16), p, m, base[:, :8], 1.0)
