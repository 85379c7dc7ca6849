"""The method step: ext-sub, sub and add per tensor, in place only when asked, on task vectors with a base."""

import dataclasses

import pytest
import torch

from extsub_kernels import ext_sub
from extsub_kernels.engine.method_spec import EXT_SUB
from extsub_kernels.engine.methods import apply_method, apply_method_into, in_place_step, workspace_slots
from extsub_kernels.engine.transfer import Workspace

from helpers import TOLERANCES, assert_close_explained, method_oracle


def test_apply_method_in_place_only_when_asked():
    p, m = torch.randn(4, 8), torch.randn(4, 8)
    kept = p.clone()
    assert torch.equal(apply_method(p, [m], [1.0]), ext_sub(kept, m, 1.0)) and torch.equal(p, kept)
    assert apply_method(p, [m], [1.0], inplace=True) is p


def test_apply_method_with_a_base_works_on_task_vectors():
    base, p, m = (
        torch.randn(4, 8, dtype=torch.float64),
        torch.randn(4, 8, dtype=torch.float64),
        torch.randn(4, 8, dtype=torch.float64),
    )
    out = apply_method(p, [m], [0.5], base=base)
    assert_close_explained(out, base + ext_sub(p - base, m - base, 0.5), *TOLERANCES[torch.float64])


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
@pytest.mark.parametrize("n_anti", [1, 2])
@pytest.mark.parametrize("with_base", [False, True], ids=["task vectors", "base"])
@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
    ids=["bf16", "bf16 to fp32", "fp64"],
)
@pytest.mark.parametrize(
    ("shape", "transposed", "chunk"),
    [((9, 40), False, 100), ((9, 40), False, 16), ((40,), False, 16), ((9, 40), True, 16)],
    ids=["rows in chunks", "rows longer than a chunk", "1-d longer than a chunk", "conv1d columns"],
)
def test_apply_method_into_writes_the_method_into_the_callers_buffer(
    method, n_anti, with_base, dtype, out_dtype, shape, transposed, chunk
):
    plus = torch.randn(shape).to(dtype)
    minus = [torch.randn(shape).to(dtype) for _ in range(n_anti)]
    base = torch.randn(shape).to(dtype) if with_base else None
    lams = [0.8, 1.5][:n_anti]
    kept = [t.clone() for t in (plus, *minus)]
    out = torch.full(shape, float("nan"), dtype=out_dtype)
    workspace = Workspace(chunk, workspace_slots(n_anti), itemsize=8)
    result = apply_method_into(
        out, plus, minus, lams, method=method, base=base, transposed=transposed, workspace=workspace
    )
    assert result is out
    expected = method_oracle(plus, minus, lams, method=method, base=base, transposed=transposed)
    assert_close_explained(out, expected.to(out_dtype), *TOLERANCES[out_dtype])
    assert all(torch.equal(a, b) for a, b in zip(kept, (plus, *minus), strict=True)), "inputs are never written"


def test_apply_method_into_rounds_once_a_bf16_step_computed_in_float32():
    # ext-sub of one bf16 pair written to bf16 through the workspace is the op itself, bit for bit
    plus, minus = torch.randn(16, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    out = torch.empty(16, 64, dtype=torch.bfloat16)
    apply_method_into(out, plus, [minus], [0.6], workspace=Workspace(256, 4))
    assert torch.equal(out, ext_sub(plus, minus, 0.6))


def test_only_one_ext_sub_step_in_the_experts_dtype_runs_in_place():
    assert in_place_step(torch.bfloat16, 1, method="ext-sub", base=False, out_dtype=torch.bfloat16, transposed=False)
    for n_anti, method, base, out_dtype, transposed in (
        (2, "ext-sub", False, torch.bfloat16, False),
        (1, "sub", False, torch.bfloat16, False),
        (1, "ext-sub", True, torch.bfloat16, False),
        (1, "ext-sub", False, torch.float32, False),
        (1, "ext-sub", False, torch.bfloat16, True),
    ):
        assert not in_place_step(
            torch.bfloat16, n_anti, method=method, base=base, out_dtype=out_dtype, transposed=transposed
        )


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_apply_method_single_step_in_place_overwrites_plus_for_every_method(method, transposed, layout):
    p, m = torch.randn(6, 10), torch.randn(6, 10)
    expected = method_oracle(p, [m], [0.7], method=method, transposed=transposed)
    work = p.clone() if layout == "contiguous" else p.t().clone().t()  # same values, columns contiguous
    result = apply_method(work, [m], [0.7], method=method, transposed=transposed, inplace=True)
    assert result is work
    assert_close_explained(work, expected.float(), *TOLERANCES[torch.float32])


def test_apply_method_into_refuses_an_out_it_cannot_write_in_place():
    out = torch.empty(10, 6).t()
    with pytest.raises(ValueError, match=r"out must be a contiguous tensor of the inputs' shape \(6, 10\)"):
        apply_method_into(out, torch.randn(6, 10), [torch.randn(6, 10)], [1.0], workspace=Workspace(64, 4))


_FUSED_CASES = [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float32, torch.bfloat16, torch.float16),
    (torch.float32, torch.bfloat16, torch.float64, torch.bfloat16),
    (torch.float64, torch.float64, torch.float64, torch.float64),
]


@pytest.mark.parametrize("observed", [False, True], ids=["plain", "row sums"])
@pytest.mark.parametrize("chunk", [64, 4096], ids=["chunks of one row", "chunks of many rows"])
@pytest.mark.parametrize(("p_dtype", "m_dtype", "base_dtype", "out_dtype"), _FUSED_CASES, ids=str)
def test_ext_sub_with_a_base_on_cpu_rows_takes_the_fused_pass_bit_for_bit(
    monkeypatch, p_dtype, m_dtype, base_dtype, out_dtype, chunk, observed
):
    """One ext-sub step on task vectors of whole CPU rows runs the C++ kernel's fused pass: the same result and row
    sums, bit for bit, as the workspace path (widen, θ₀ out, the op, θ₀ back, round) it replaces."""
    from extsub_kernels.kernels import ext_sub_cpu

    if ext_sub_cpu.load() is None:
        pytest.fail(f"the C++ kernel cannot be built here: {ext_sub_cpu.status().detail}")
    base = torch.randn(9, 40, dtype=torch.float64)
    plus = (base + 0.1 * torch.randn(9, 40, dtype=torch.float64)).to(p_dtype)
    minus = (base + 0.1 * torch.randn(9, 40, dtype=torch.float64)).to(m_dtype)
    base = base.to(base_dtype)
    plus[4] = base[4].to(p_dtype) if base_dtype != torch.float64 else plus[4]  # |p − θ₀| = 0 where exact

    def merged(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen: list[torch.Tensor] = []
        out = torch.full((9, 40), float("nan"), dtype=out_dtype)
        apply_method_into(
            out,
            plus,
            [minus],
            [1.2],
            method=EXT_SUB if fused else dataclasses.replace(EXT_SUB, fused=None),
            base=base,
            workspace=Workspace(chunk, workspace_slots(1), itemsize=8),
            observe=(lambda k, sums: seen.append(sums)) if observed else None,
        )
        return out, seen

    calls = []
    run_fused = ext_sub_cpu.ext_sub_task_rows_into
    monkeypatch.setattr(ext_sub_cpu, "ext_sub_task_rows_into", lambda *a, **k: (calls.append(1), run_fused(*a, **k)))
    (ours, our_sums), (workspace_path, workspace_sums) = merged(True), merged(False)
    assert len(calls) == 1, "one call of the fused pass for the whole block"
    assert torch.equal(ours, workspace_path) and not torch.isnan(ours).any()
    assert len(our_sums) == len(workspace_sums) == int(observed)
    assert all(torch.equal(a, b) for a, b in zip(our_sums, workspace_sums, strict=True))
    compute = torch.float64 if torch.float64 in (p_dtype, m_dtype, base_dtype) else torch.float32
    coarser = max((out_dtype, compute), key=lambda d: TOLERANCES[d][0])
    expected = method_oracle(plus, [minus], [1.2], base=base)
    assert_close_explained(ours, expected, *TOLERANCES[coarser])
