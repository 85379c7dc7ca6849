"""Shared test helpers: devices and backends, assertions whose failure messages say what differs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

# The run's seed: fixed, so every run tries the same inputs; EXTSUB_TEST_SEED=N tries others (conftest seeds every
# test with it and prints it in the header and beside every failure).
DEFAULT_SEED = 20261207
SEED = int(os.environ.get("EXTSUB_TEST_SEED", DEFAULT_SEED))

# Every device a test may run on; CUDA parameters carry the `gpu` marker (skipped without CUDA).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class _LazyModule:
    """A module imported on first use, so collecting the tests does not load it (peft costs seconds to import); a test
    that uses it where it is not installed is skipped, as `pytest.importorskip` would have skipped it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # what collection asks of every module-level name (__test__, ...): not the module's
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name), attr)


def lazy_module(name: str) -> Any:
    """`name` (peft, transformers), imported when a test first reaches into it."""
    return _LazyModule(name)


def interpreting() -> bool:
    """Whether the Triton kernel runs under its CPU interpreter (TRITON_INTERPRET=1, set by conftest on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_available(backend: str, device: str) -> bool:
    """Whether `backend` can run on `device` here (Triton on CPU needs the interpreter; C++, CPU and a compiler)."""
    if backend == "cpp":
        from extsub_kernels.kernels import ext_sub_cpu

        return device == "cpu" and ext_sub_cpu.load() is not None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return device == "cuda" or interpreting()
    return True


# (rtol, atol / scale) per result dtype. Rounding the result to its dtype costs at most one ulp
# (≤ eps·|x|: GPUs round to nearest, Triton's interpreter truncates); rtol doubles that to leave
# room for the float32 arithmetic before the rounding. atol, relative to the largest |expected|,
# covers cancellation near zero at compute precision: float32 reductions over ≤ 4·10⁴ terms
# lose ≲ log2(n)·eps ≈ 16 eps, and 2⁻¹⁶ ≈ 128 eps32 leaves 8× margin. float64 runs float64
# arithmetic with λ passed to ~2⁻⁴⁸, hence 2⁻⁴⁴.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (2 * torch.finfo(torch.float16).eps, 2.0**-16),
    torch.bfloat16: (2 * torch.finfo(torch.bfloat16).eps, 2.0**-16),
    torch.float32: (2.0**-16, 2.0**-16),
    torch.float64: (2.0**-44, 2.0**-44),
}


def assert_close_explained(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float,
    atol_scale: float,
    what: str = "result",
    scale: float | None = None,
) -> None:
    """|actual − expected| ≤ rtol·|expected| + atol_scale·scale elementwise (scale: max|expected|
    unless given), with a report of what differs."""
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    assert a.shape == e.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    problems = []
    nonfinite = ~torch.isfinite(a)
    if nonfinite.any():
        problems.append(f"{int(nonfinite.sum())} non-finite values (first at flat index {int(nonfinite.nonzero()[0])})")
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    err = (a - e).abs()
    bad = err > rtol * e.abs() + atol_scale * scale
    if bad.any():
        idx = bad.nonzero().reshape(-1)
        shown = ", ".join(f"[{int(i)}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in idx[:5])
        rel = (err / e.abs().clamp_min(1e-300)).max().item()
        problems.append(
            f"{int(bad.sum())}/{a.numel()} elements differ (rtol={rtol:.3g}, atol={atol_scale:.3g}·{scale:.3g}); "
            f"first: {shown}; max abs err {err.max().item():.3g}, max rel err {rel:.3g}"
        )
    assert not problems, f"{what}: " + "; ".join(problems)


# Row sums (|p|², |m|², p·m): float32 reductions over n terms are off by at most about n·eps relative to Σ|terms|
# (far less in practice); they are compared with float64 sums scaled by |p|² + |m|², the size of what was summed.
SUM_RTOL: dict[torch.dtype, float] = {
    torch.float16: 2.0**-14,
    torch.bfloat16: 2.0**-14,
    torch.float32: 2.0**-14,
    torch.float64: 2.0**-40,
}


def float64_row_sums(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """|p|², |m|², p·m per row (dim 0; a 1-D tensor is one row) in float64: the oracle for the op's row sums."""
    rows = p.shape[0] if p.dim() > 1 else 1
    p, m = p.double().reshape(rows, -1), m.double().reshape(rows, -1)
    return torch.stack([(p * p).sum(1), (m * m).sum(1), (p * m).sum(1)], dim=1)


def assert_row_sums_close(
    actual: torch.Tensor, p: torch.Tensor, m: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Row sums within SUM_RTOL[dtype]·(|p|² + |m|²) of float64 ones, naming the rows that differ."""
    expected = float64_row_sums(p, m).cpu()
    scale = (expected[:, 0] + expected[:, 1]).unsqueeze(1)
    error = (actual.double().cpu() - expected).abs()
    bad = error > SUM_RTOL[dtype] * scale
    assert not bad.any(), (
        f"{what}: rows {bad.any(1).nonzero().flatten().tolist()[:5]} differ: {actual[bad][:3]} vs {expected[bad][:3]}"
    )


def assert_one_line_error(
    code: int, err: str, expected_code: int, parts: list[str], prog: str = "extsub-merge"
) -> None:
    """The CLI exited with `expected_code` and its last stderr line is one `PROG: error:` naming every part."""
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[-1], f"{part!r} not in {lines[-1]!r}"


def method_oracle(
    plus: torch.Tensor,
    minus: list[torch.Tensor],
    lams: list[float],
    *,
    method: str = "ext-sub",
    base: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """What a merge must produce for one tensor, from whole tensors: ΔW = θ − θ₀ in float64, the op once per
    anti-expert in order (ext-sub: `ext_sub` on rows, or on columns when `transposed`; sub/add: θ ∓ λθ⁻),
    then θ₀ + ΔW'. Returned in float64: compare within the result dtype's tolerance."""
    from extsub_kernels import ext_sub

    theta0 = base.double() if base is not None else torch.zeros((), dtype=torch.float64)
    work = plus.double() - theta0
    for m, lam in zip(minus, lams, strict=True):
        delta = m.double() - theta0
        if method == "ext-sub":
            work = ext_sub(work.t(), delta.t(), lam).t() if transposed else ext_sub(work, delta, lam)
        else:
            work = work + (lam if method == "add" else -lam) * delta
    return work + theta0


ROOT = Path(__file__).resolve().parents[1]

# A CLI run in a child process that stops itself (SIGSTOP) when `extsub_kernels.io.atomic.<function>` has been
# called `count` times (before or after the call), so a test can deliver a signal exactly in that window.
_STOPPING_CLI = """
import os, signal, sys
from extsub_kernels.io import atomic
name, count, when, no_swap = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
if no_swap:  # a file system without renameat2: every path takes the fallback
    atomic._renameat2_fn = None
real = getattr(atomic, name) if name != "rename" else os.rename
calls = [0]
def stopping(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == count:
        os.kill(os.getpid(), signal.SIGSTOP)
    result = real(*args, **kwargs)
    if when == "after" and calls[0] == count:
        os.kill(os.getpid(), signal.SIGSTOP)
    return result
if name == "rename":
    os.rename = stopping
else:
    setattr(atomic, name, stopping)
from extsub_kernels.cli import main
sys.exit(main(sys.argv[5:]))
"""


def stopped_cli(argv: list, *, at: str, count: int = 1, when: str = "after", no_swap: bool = False) -> subprocess.Popen:
    """`extsub-merge argv` in a child process, returned once it has stopped itself at the window asked for.

    Args:
        at: a function of `extsub_kernels.io.atomic` ("exchange", "_move_in"), or "rename" for `os.rename`.
        count: stop at its count-th call.
        when: "before" or "after" that call.
        no_swap: act as on a file system without renameat2 (the rename-aside fallback).
    """
    args = [sys.executable, "-c", _STOPPING_CLI, at, str(count), when, "1" if no_swap else "0", *map(str, argv)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        err = proc.stderr.read().decode(errors="replace")
        raise AssertionError(f"the CLI ended (status {status}) before reaching {at} #{count}: {err}")
    return proc


def finish(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    """Deliver `sig` to a stopped child, let it continue, and return (exit code or -signal, stderr)."""
    proc.send_signal(sig)
    if sig != signal.SIGKILL:
        proc.send_signal(signal.SIGCONT)
    err = proc.stderr.read().decode(errors="replace")
    return proc.wait(timeout=120), err


def copy_adapter(source, target, *, tensors=None, config=None, bare: bool = False):
    """A copy of a PEFT adapter folder with its tensors and/or config edited (functions of the originals).

    `config` returning None leaves the config out, returning a str writes that text; `bare`
    writes the weights alone as `adapter.safetensors` and returns that file.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    target.mkdir(parents=True)
    state = load_file(source / "adapter_model.safetensors")
    weights = target / ("adapter.safetensors" if bare else "adapter_model.safetensors")
    save_file({k: v.contiguous() for k, v in (tensors(state) if tensors else state).items()}, str(weights))
    if bare:
        return weights
    original = json.loads((source / "adapter_config.json").read_text())
    text = config(original) if config is not None else original
    if text is not None:
        (target / "adapter_config.json").write_text(text if isinstance(text, str) else json.dumps(text))
    return target


def quiet_peft_model(base, folder):
    """`PeftModel.from_pretrained(base, folder)` in eval mode, its warnings silenced (base is used in place)."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


def causal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a causal LM for `ids` (1, T), without gradients (PEFT's own deprecation warnings silenced)."""
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers on PEFT's prefix: past_key_values → cache
        return model(input_ids=ids).logits


def scan_until_rows(args: list, out: Path, rows: int = 2) -> subprocess.Popen:
    """An `extsub-scan ARGS` subprocess, returned once OUT/scan.json shows `rows` rows measured and it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extsub_kernels.cli.scan", *map(str, args)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600  # only so that a broken scan cannot hang the suite
    measured, status = 0, None
    while measured < rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if (out / "scan.json").is_file():  # replaced whole after each row: always valid JSON
            progress = json.loads((out / "scan.json").read_text())
            measured, status = progress["measured"], progress["status"]
    assert proc.poll() is None and status == "running", proc.communicate()[1]
    return proc
