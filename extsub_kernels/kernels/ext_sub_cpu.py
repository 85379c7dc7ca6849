"""The CPU kernel for Ext-Sub (paper Algorithm 1): ext_sub_cpu.cpp, built at first use, cached, called via ctypes.
Per row p' = α·p + β·m (docs/design.md §1), with each row's |p|², |m|², p·m on request (§7) or only those
(`row_sums`); with a base θ₀, one fused pass (`ext_sub_task_rows_into`). Any C++17 compiler builds it (no torch
headers) into a per-user cache keyed by source, flags and compiler; without one `load()` is None, the reason in
`status()`. ctypes releases the GIL: up to `torch.get_num_threads()` threads claim chunks of rows from a shared
counter. EXTSUB_CPP_KERNEL=0 disables it, CXX names the compiler, EXTSUB_CACHE_DIR moves the cache."""

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from extsub_kernels._tensors import shares_storage
from extsub_kernels.constants import ENV_CACHE_DIR, ENV_CPP_KERNEL, ENV_CXX, ENV_XDG_CACHE
from extsub_kernels.errors import Notice

_SOURCE = Path(__file__).with_name("ext_sub_cpu.cpp")
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
# -ffp-contract=off: no compiler-chosen FMAs, so every instantiation (row sums or not) rounds alike, bit for bit.
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-fvisibility=hidden")
_BASE_FLAGS += ("-fno-exceptions",)
# Vector extensions per torch's own CPU capability (torch.backends.cpu.get_cpu_capability()).
_ARCH_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
}
_BUILD_TIMEOUT_S = 300
# Said once, when a build starts (a library from the cache loads in milliseconds, silently).
_BUILD_NOTICE = "building the CPU kernel (first use, ~10 s)…"
# Below this many elements per thread, the hand-off to another thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 16
# Rows at least this long, fewer than four per thread, are split across threads by columns (not by the fused pass).
_LONG_ROW = 1 << 20
_CHUNK_BYTES = 256 << 10  # threads claim rows in chunks of about this many bytes of p and m (a few fit in L2)
_MAX_LONG_ROW_CHUNKS = 1024  # a long row's column chunks at most (their partial sums are a small array)


@dataclass(frozen=True)
class KernelStatus:
    """Whether the C++ kernel is loaded, and what was built or loaded (or why not) in a line."""

    available: bool
    detail: str


class _Library:
    """The loaded shared library, its entry points typed for ctypes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        i64, i32, dbl, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
        operands = [ptr, ptr, ptr, ptr, i32, i32, i32, i32]  # out, p, m, base and their dtype codes
        for name, argtypes in (
            ("rows", [ptr, ptr, i32, i32, i64, i64, i64, i64, i64, dbl, ptr, i32, i32]),
            ("rows_shared", [ptr, ptr, i32, i32, i64, i64, i64, i64, dbl, ptr, i32, i32, i64, ptr, i32]),
            ("sums_shared", [ptr, ptr, i32, i32, i64, i64, i32, ptr, ptr, i32]),
            ("update_shared", [ptr, ptr, i32, i32, i64, i64, dbl, dbl, ptr, i32]),
            ("task_rows_shared", [*operands, *[i64] * 6, dbl, ptr, i32, i64, ptr, i32]),
            ("convert", [ptr, i32, ptr, i32, i64]),
        ):
            function = getattr(lib, f"extsub_{name}")
            function.argtypes, function.restype = argtypes, i32
            setattr(self, name, function)
        self.hardware_f16 = bool(lib.extsub_hardware_f16())


_lock = threading.Lock()
_library: _Library | None = None
_status: KernelStatus | None = None
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _forget_pool() -> None:
    """After fork the child has none of the parent's threads: start a fresh pool when needed."""
    global _pool, _pool_workers
    _pool, _pool_workers = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def cache_dir() -> Path:
    """Where built libraries are kept: EXTSUB_CACHE_DIR, else $XDG_CACHE_HOME/extsub, else ~/.cache/extsub."""
    base = os.environ.get(ENV_XDG_CACHE) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get(ENV_CACHE_DIR) or Path(base) / "extsub")


def _compiler() -> str | None:
    if os.environ.get(ENV_CXX):
        return shutil.which(os.environ[ENV_CXX]) or os.environ[ENV_CXX]
    return next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def _capability() -> str:
    """torch's CPU capability on x86-64 ("AVX512", "AVX2", ...); the bare architecture elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine() or "unknown"
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def build(
    compiler: str, out_dir: Path, *, capability: str | None = None, defines: tuple[str, ...] = ()
) -> tuple[Path, float | None]:
    """Compile ext_sub_cpu.cpp into out_dir (a private temporary renamed into place) unless built already; returns
    (its path, the build's seconds or None when cached). RuntimeError with the compiler's message on failure."""
    capability = capability or _capability()
    flags = (*_BASE_FLAGS, *_ARCH_FLAGS.get(capability, ()), *(f"-D{d}" for d in defines))
    source = _SOURCE.read_bytes()
    key = hashlib.sha256()
    for part in (source, repr(flags).encode(), compiler.encode(), sys.platform.encode(), platform.machine().encode()):
        key.update(part + b"\0")
    try:  # a reinstalled or upgraded compiler gets a fresh build
        stat = os.stat(shutil.which(compiler) or compiler)
        key.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    except OSError:
        pass
    target = out_dir / f"ext_sub_cpu-{capability.lower()}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target, None
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    warnings.warn(_BUILD_NOTICE, Notice, stacklevel=2)  # seconds with no output otherwise
    start = time.perf_counter()
    try:
        command = [compiler, *flags, str(_SOURCE), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} did not run: {exc}") from exc
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        message = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"{compiler} failed (exit {done.returncode}): {message}")
    os.replace(partial, target)
    return target, time.perf_counter() - start


def _self_check(lib: _Library) -> None:
    """One row with a known answer, so a miscompiled library is refused rather than used."""
    p, m, base, out = ((ctypes.c_float * 4)(*v) for v in ((3, 4, 0, 0), (0, 0, 6, 8), (1, 1, 1, 1), ()))
    sums, counters = (ctypes.c_double * 3)(), (ctypes.c_int64 * 2)()
    # the row as task vectors over θ₀ = 1 first (out = 1 + the result), then in place
    plus, minus = ((ctypes.c_float * 4)(*(x + 1 for x in v)) for v in (p, m))
    addresses = (ctypes.addressof(x) for x in (out, plus, minus, base))
    lib.task_rows_shared(*addresses, 2, 2, 2, 2, 1, 4, 4, 4, 4, 4, 0.5, None, 0, 1, ctypes.addressof(counters), 1)
    lib.rows(ctypes.addressof(p), ctypes.addressof(m), 2, 2, 0, 1, 4, 4, 4, 0.5, ctypes.addressof(sums), 3, 1)
    got = (*p, *sums, *(x - 1 for x in out))  # α = 1 + 0.5·10/5 = 2, β = −0.5
    expected = (6.0, 8.0, -3.0, -4.0, 25.0, 100.0, 0.0, 6.0, 8.0, -3.0, -4.0)
    if any(abs(a - b) > 1e-6 for a, b in zip(got, expected, strict=True)):
        raise RuntimeError(f"self-check failed: got {list(got)}, expected {list(expected)}")


def load() -> _Library | None:
    """The C++ kernel, built on the first call of the process (or loaded from the cache); None if unavailable."""
    global _library, _status
    if _status is not None:
        return _library
    with _lock:
        if _status is None:
            _library, _status = _load_once()
    return _library


def _load_once() -> tuple[_Library | None, KernelStatus]:
    if os.environ.get(ENV_CPP_KERNEL, "1").strip().lower() in ("0", "off", "false", "no"):
        return None, KernelStatus(False, "disabled by EXTSUB_CPP_KERNEL=0")
    compiler = _compiler()
    if compiler is None:
        return None, KernelStatus(False, "no C++ compiler found (set CXX, or install g++ or clang++)")
    capability = _capability()
    try:
        try:
            path, seconds = build(compiler, cache_dir(), capability=capability)
        except OSError:  # cache not writable: build for this process only
            path, seconds = build(compiler, Path(tempfile.mkdtemp(prefix="extsub-")), capability=capability)
        lib = _Library(path)
        _self_check(lib)
    except (RuntimeError, OSError, AttributeError) as exc:
        return None, KernelStatus(False, f"C++ kernel unavailable: {exc}")
    how = "from the cache" if seconds is None else f"built in {seconds:.1f} s"
    return lib, KernelStatus(True, f"C++ kernel ({capability} build, {how}, {os.path.basename(compiler)})")


def status() -> KernelStatus:
    """The kernel's status, building it first if this process has not tried yet."""
    load()
    assert _status is not None
    return _status


def _reset_for_tests() -> None:
    global _library, _status
    with _lock:
        _library, _status = None, None


def _share(fn: Callable[..., int], *args: object, threads: int) -> None:
    """Run fn(*args, counters, wait) on this thread and on threads − 1 pool threads, sharing its chunks."""
    counters = (ctypes.c_int64 * 2)()
    if threads > 1:
        pool = _executor(threads - 1)
        for _ in range(threads - 1):
            try:
                pool.submit(fn, *args, counters, 0)
            except RuntimeError:  # the pool was replaced or the interpreter is exiting: this thread does the rest
                break
    if fn(*args, counters, 1) != 0:
        raise RuntimeError("the ext_sub C++ kernel was given an unknown dtype code")


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _lock:
        if _pool is None or _pool_workers < workers:
            old = _pool
            _pool, _pool_workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="extsub-cpu"), workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def ext_sub_rows_(p: torch.Tensor, m: torch.Tensor, lam: float, *, row_stats: torch.Tensor | None = None) -> None:
    """p ← α·p + β·m row by row, in place, for 2-D CPU views with contiguous columns; `row_stats` ((rows, 3),
    contiguous float32/float64) gets each row's |p|², |m|², p·m. Few long rows are split by columns, in two passes."""
    _run(p, m, lam, row_stats, write=True)


def row_sums(p: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> None:
    """|p|², |m|², p·m of each row of 2-D CPU views with contiguous columns into `out` (rows, 3); p is not written."""
    _run(p, m, 0.0, out, write=False)


def ext_sub_task_rows_into(
    out: torch.Tensor,
    p: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor,
    lam: float,
    *,
    row_stats: torch.Tensor | None = None,
) -> None:
    """out ← θ₀ + (p − θ₀) − λ·Ext(m − θ₀) per row in one fused pass (2-D CPU views of one shape, contiguous columns,
    `out` apart from the inputs), rounded as the workspace path; `row_stats` of p − θ₀ and m − θ₀."""
    lib = _loaded()
    n_rows, n_cols = p.shape
    operands = (("out", out), ("p", p), ("m", m), ("base", base))
    for name, t in operands:
        if t.device.type != "cpu" or t.shape != p.shape or (n_cols > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be a CPU tensor of shape {tuple(p.shape)} with contiguous columns")
    if any(shares_storage(out, t) for _, t in operands[1:]):
        raise ValueError("out must not share memory with p, m or base (each row is read twice before it is written)")
    stats_ptr, stats_dtype = _stats_pointer(row_stats, n_rows)
    if n_rows == 0 or n_cols == 0:
        if row_stats is not None:
            row_stats.zero_()
        return
    threads, chunk_rows = _split(p, m, base)
    pointers = [t.data_ptr() for _, t in operands] + [_DTYPE_CODES[t.dtype] for _, t in operands]
    strides = [t.stride(0) for _, t in operands]
    args = (*pointers, n_rows, n_cols, *strides, 0.5 * lam, stats_ptr, stats_dtype, chunk_rows)
    _share(lib.task_rows_shared, *args, threads=threads)


def long_rows(n_cols: int) -> bool:
    """Whether `ext_sub_rows_` may share rows this long between threads by columns (summed in another order)."""
    return n_cols >= _LONG_ROW


def _loaded() -> _Library:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the C++ kernel is unavailable: {status().detail}")
    return lib


def _stats_pointer(stats: torch.Tensor | None, n_rows: int) -> tuple[int | None, int]:
    if stats is None:
        return None, 0
    if stats.dtype not in (torch.float32, torch.float64) or stats.shape != (n_rows, 3) or not stats.is_contiguous():
        raise ValueError(f"row sums go in a contiguous ({n_rows}, 3) float32/float64 tensor, not {stats.shape}")
    return stats.data_ptr(), _DTYPE_CODES[stats.dtype]


def _run(p: torch.Tensor, m: torch.Tensor, lam: float, stats: torch.Tensor | None, *, write: bool) -> None:
    lib = _loaded()
    n_rows, n_cols = p.shape
    if n_rows == 0:
        return
    for name, t in (("p", p), ("m", m)):
        if t.device.type != "cpu" or (n_cols > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be a CPU tensor with contiguous columns (stride {t.stride()})")
    stats_ptr, stats_dtype = _stats_pointer(stats, n_rows)
    if n_cols == 0:
        if stats is not None:
            stats.zero_()
        return
    p_dtype, m_dtype = _DTYPE_CODES[p.dtype], _DTYPE_CODES[m.dtype]
    half_lam = 0.5 * lam
    threads, chunk_rows = _split(p, m)
    p_ptr, m_ptr = p.data_ptr(), m.data_ptr()
    if threads > 1 and long_rows(n_cols) and n_rows < 4 * threads:
        for row in range(n_rows):
            row_p = p_ptr + row * p.stride(0) * p.element_size()
            row_m = m_ptr + row * m.stride(0) * m.element_size()
            sums = _long_row(lib, (row_p, row_m, p_dtype, m_dtype), n_cols, half_lam, threads, stats is not None, write)
            if stats is not None:
                stats[row] = torch.tensor(sums, dtype=torch.float64)
        return
    common = (p_ptr, m_ptr, p_dtype, m_dtype)
    if threads == 1:
        lib.rows(*common, 0, n_rows, n_cols, p.stride(0), m.stride(0), half_lam, stats_ptr, stats_dtype, write)
        return
    args = (*common, n_rows, n_cols, p.stride(0), m.stride(0), half_lam, stats_ptr, stats_dtype, write, chunk_rows)
    _share(lib.rows_shared, *args, threads=threads)


def _split(*operands: torch.Tensor) -> tuple[int, int]:
    """(threads, rows per chunk) of a call: a thread per 64 Ki elements at most, chunks of about _CHUNK_BYTES."""
    n_rows, n_cols = operands[0].shape
    threads = max(1, min(torch.get_num_threads(), operands[0].numel() // _MIN_ELEMENTS_PER_THREAD))
    row_bytes = max(1, n_cols * sum(t.element_size() for t in operands))
    return threads, max(1, min(_CHUNK_BYTES // row_bytes, -(-n_rows // (4 * threads))))


def _long_row(lib: _Library, row: tuple, n: int, half_lam: float, threads: int, dot: bool, write: bool) -> tuple:
    """One contiguous row (p, m pointers, dtype codes) shared by threads by chunk: sums, then update; its sums."""
    chunk = max(_MIN_ELEMENTS_PER_THREAD, (-(-n // _MAX_LONG_ROW_CHUNKS) + 63) & ~63)
    n_chunks = -(-n // chunk)
    partials = (ctypes.c_double * (3 * n_chunks))()
    _share(lib.sums_shared, *row, n, chunk, int(dot), partials, threads=threads)
    # in chunk order: the same result whichever thread summed which chunk
    sp, sm, spm = (math.fsum(partials[k::3]) for k in range(3))
    if write and sp > 0.0:  # |p| = 0: the row stays
        alpha = 1.0 + half_lam * (math.sqrt(sm) / math.sqrt(sp))
        _share(lib.update_shared, *row, n, chunk, alpha, -half_lam, threads=threads)
    return sp, sm, spm
