"""The public ops against Algorithm 1 (paper §3), every backend, dtype and awkward shape."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from extsub_kernels import ext_sub, ext_sub_, ext_sub_reference, extract_deficiency, subtract_
from extsub_kernels.ops import cpu_backend, op_backend

from helpers import DEVICES, TOLERANCES, assert_close_explained, backend_available

BACKENDS = ["auto", "triton", "cpp", "torch", "reference"]
SHAPES = [
    (1, 1),
    (1, 37),
    (37, 1),
    (7, 13),
    (257, 4099),
    (4, 3, 5),
    (19,),
    (3, 40000),  # longer than the kernel's largest one-pass tile: the two-loop variant
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _skip_unless(backend: str, device: str) -> None:
    if not backend_available(backend, device):
        pytest.skip(f"backend {backend!r} cannot run on {device} here (Triton on CPU needs TRITON_INTERPRET=1)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_with_reference(shape, dtype, backend, device):
    _skip_unless(backend, device)
    p = torch.randn(shape, device=device).to(dtype)
    m = torch.randn(shape, device=device).to(dtype)
    lam = 0.25 + 2 * torch.rand(()).item()
    expected = ext_sub_reference(p, m, lam)
    actual = ext_sub(p, m, lam, backend=backend)
    assert actual.dtype == dtype and actual.shape == p.shape
    rtol, atol = TOLERANCES[dtype]
    assert_close_explained(actual, expected, rtol, atol, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
@pytest.mark.parametrize(
    "plus_dtype,minus_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float64)],
)
def test_mixed_dtypes(plus_dtype, minus_dtype, backend, device):
    _skip_unless(backend, device)
    p = torch.randn(33, 70, device=device).to(plus_dtype)
    m = torch.randn(33, 70, device=device).to(minus_dtype)
    actual = ext_sub(p, m, 1.5, backend=backend)
    assert actual.dtype == plus_dtype
    rtol, atol = TOLERANCES[plus_dtype]
    assert_close_explained(actual, ext_sub_reference(p, m, 1.5), rtol, atol)


def _degenerate_pair(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: 0 zero expert, 1 zero anti-expert, 2 both zero, 3 exactly antiparallel, 4 parallel, 5 normal."""
    p = torch.randn(6, 24, device=device, dtype=torch.float64)
    m = torch.randn(6, 24, device=device, dtype=torch.float64)
    p[0] = 0
    m[1] = 0
    p[2] = 0
    m[2] = 0
    m[3] = -2.0 * p[3]  # exactly representable: p̂ = −m̂, u = 0
    m[4] = 4.0 * p[4]
    return p.to(dtype), m.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_rows(dtype, backend, device):
    _skip_unless(backend, device)
    p, m = _degenerate_pair(dtype, device)
    lam = 0.8
    out = ext_sub(p, m, lam, backend=backend)
    assert torch.isfinite(out).all(), "degenerate rows must not give NaN or Inf"
    rtol, atol = TOLERANCES[dtype]
    # docs/design.md §1 conventions, checked directly rather than through the reference. The closed
    # form keeps such rows bit for bit; the literal reference only to float64 rounding.
    for row, why in ((0, "|p| = 0: the row stays"), (1, "|m| = 0: Ext(m) = 0, the row stays"), (2, "both zero")):
        if backend == "reference":
            assert_close_explained(out[row], p[row].double(), 0.0, 1e-15, why, scale=float(m.abs().max()))
        else:
            assert torch.equal(out[row], p[row]), why
    antiparallel = p[3].double() - lam * m[3].double()  # u = 0: proj = 0, Ext(m) = m
    assert_close_explained(out[3], antiparallel, rtol, atol, "antiparallel row")
    assert_close_explained(out[4], p[4].double(), rtol, atol, "parallel row: Ext(m) = 0")
    assert_close_explained(out, ext_sub_reference(p, m, lam), rtol, atol, "all rows vs reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch", "auto"])
def test_near_antiparallel_rows_stay_accurate_in_float32(backend, device):
    """|u| → 0: the literal formula loses all accuracy in float32; the closed form must not."""
    _skip_unless(backend, device)
    base = torch.randn(64, 512, dtype=torch.float64, device=device)
    noise = torch.randn(64, 512, dtype=torch.float64, device=device)
    p = base.float()
    m = (-3.0 * base + 1e-6 * noise).float()
    expected = ext_sub_reference(p, m, 1.0)
    literal_fp32 = ext_sub_reference(p, m, 1.0, dtype=torch.float32)
    literal_err = ((literal_fp32.double() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    assert literal_err > 1e-3, f"inputs not hard enough: literal float32 row error only {literal_err:.2e}"
    rtol, atol = TOLERANCES[torch.float32]
    assert_close_explained(ext_sub(p, m, 1.0, backend=backend), expected, rtol, atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch", "reference"])
def test_in_place_contract(backend, device):
    _skip_unless(backend, device)
    p = torch.randn(40, 33, device=device)
    m = torch.randn(40, 33, device=device)
    m_before = m.clone()
    expected = ext_sub_reference(p, m, 0.7)
    storage = p.untyped_storage().data_ptr()
    returned = ext_sub_(p, m, 0.7, backend=backend)
    assert returned is p
    assert p.untyped_storage().data_ptr() == storage
    assert torch.equal(m, m_before), "w_minus must never be modified"
    assert_close_explained(p, expected, *TOLERANCES[torch.float32])


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


NON_CONTIGUOUS = {
    "transposed": lambda shape, device: _transposed(torch.randn(shape, device=device)),
    "strided-rows": lambda shape, device: torch.randn(shape[0] * 2, shape[1], device=device)[::2],
    "strided-cols": lambda shape, device: torch.randn(shape[0], shape[1] * 3, device=device)[:, ::3],
    "contiguous": lambda shape, device: torch.randn(shape, device=device),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch", "reference"])
@pytest.mark.parametrize("plus_layout", list(NON_CONTIGUOUS))
@pytest.mark.parametrize("minus_layout", ["transposed", "strided-cols", "contiguous"])
def test_non_contiguous_inputs(plus_layout, minus_layout, backend, device):
    _skip_unless(backend, device)
    p = NON_CONTIGUOUS[plus_layout]((23, 45), device)
    m = NON_CONTIGUOUS[minus_layout]((23, 45), device)
    expected = ext_sub_reference(p, m, 1.2)
    returned = ext_sub_(p, m, 1.2, backend=backend)
    assert returned is p
    assert_close_explained(p, expected, *TOLERANCES[torch.float32], what=f"{plus_layout}/{minus_layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch", "reference"])
def test_same_tensor_for_both_inputs(backend, device):
    """m = p: Ext(p) = 0, so the result is p itself."""
    _skip_unless(backend, device)
    p = torch.randn(9, 130, device=device)
    original = p.clone()
    ext_sub_(p, p, 2.0, backend=backend)
    assert_close_explained(p, original, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch", "reference"])
def test_empty_tensor_is_a_no_op(backend):
    _skip_unless(backend, "cpu")
    p = torch.empty(0, 5)
    assert ext_sub_(p, torch.empty(0, 5), 1.0, backend=backend) is p
    assert ext_sub(torch.empty(3, 0), torch.empty(3, 0), 1.0, backend=backend).shape == (3, 0)


def test_lambda_reading_of_the_closed_form():
    """Ext-Sub at λ = direct subtraction at λ/2 plus a boost of p by λ|m|/(2|p|) (docs/design.md §1)."""
    p = torch.randn(16, 64, dtype=torch.float64)
    m = torch.randn(16, 64, dtype=torch.float64)
    boost = 1.5 * m.norm(dim=1, keepdim=True) / (2 * p.norm(dim=1, keepdim=True))
    expected = subtract_(p.clone(), m, 0.75) + boost * p
    assert_close_explained(ext_sub(p, m, 1.5), expected, *TOLERANCES[torch.float64])


def test_subtract_is_direct_subtraction():
    p = torch.randn(8, 16, dtype=torch.bfloat16)
    m = torch.randn(8, 16, dtype=torch.float32)
    expected = p.double() - 0.3 * m.double()
    returned = subtract_(p, m, 0.3)
    assert returned is p and p.dtype == torch.bfloat16
    assert_close_explained(p, expected, *TOLERANCES[torch.bfloat16])


def test_extract_deficiency_degenerate_rows():
    p, m = _degenerate_pair(torch.float64, "cpu")
    ext = extract_deficiency(p, m)
    assert torch.equal(ext[0], torch.zeros_like(ext[0])), "|p| = 0 → Ext = 0"
    assert torch.equal(ext[1], torch.zeros_like(ext[1])), "|m| = 0 → Ext = 0"
    assert_close_explained(ext[3], m[3], *TOLERANCES[torch.float64], what="antiparallel: Ext(m) = m")
    assert_close_explained(
        ext[4], torch.zeros_like(ext[4]), 0.0, 1e-15, "parallel: Ext(m) = 0", scale=float(m[4].abs().max())
    )


# --- properties (hypothesis) ---------------------------------------------------------------

# Magnitudes in [1e-30, 1e3] or exactly 0: rows whose squared norm underflows (every |element|
# below ~1e-154 in float64) count as zero rows by design and are not what these properties test.
_magnitude = st.floats(min_value=1e-30, max_value=1e3)
finite = st.one_of(st.just(0.0), _magnitude, _magnitude.map(lambda x: -x))


@st.composite
def row_pairs(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(2, 24))
    flat = st.lists(finite, min_size=rows * cols, max_size=rows * cols)
    p = torch.tensor(draw(flat), dtype=torch.float64).reshape(rows, cols)
    m = torch.tensor(draw(flat), dtype=torch.float64).reshape(rows, cols)
    return p, m


def _u_hat(p: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """û per row, computed literally, and the float64 error bound its use carries.

    The literal û loses accuracy as p and m turn antiparallel (|u| → 0): its error grows like
    eps/|u|², so each row's tolerance does too (exactly antiparallel rows are covered by
    test_degenerate_rows).
    """

    def unit(x):
        n = x.norm(dim=1, keepdim=True)
        return torch.where(n > 0, x / torch.where(n > 0, n, 1.0), 0.0)

    u = unit(p) + unit(m)
    u_sq = (u * u).sum(dim=1)
    bound = 1e-12 * (m.norm(dim=1) + 1) * (1 + 1 / u_sq.clamp_min(1e-300))
    return unit(u), bound


@settings(max_examples=100, deadline=None)
@given(row_pairs(), st.sampled_from(["torch", "reference"]))
def test_property_lambda_zero_is_identity(pair, backend):
    p, m = pair
    assert torch.equal(ext_sub(p, m, 0.0, backend=backend), p)
    assert torch.equal(ext_sub(p.float(), m.float(), 0.0, backend=backend), p.float())


@settings(max_examples=100, deadline=None)
@given(row_pairs())
def test_property_deficiency_is_orthogonal_to_the_bisector(pair):
    p, m = pair
    ext = extract_deficiency(p, m)
    u_hat, bound = _u_hat(p, m)
    dots = (ext * u_hat).sum(dim=1)
    assert (dots.abs() <= bound).all(), f"Ext(m)·û = {dots.tolist()}, bounds {bound.tolist()}"


@settings(max_examples=100, deadline=None)
@given(row_pairs())
# A case hypothesis once found: m nearly antiparallel to p and 833× longer, beside a zero row pair.
@example(pair=(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
               torch.tensor([[-833.0, 0.0625], [0.0, 0.0]], dtype=torch.float64)))  # fmt: skip
def test_property_deficiency_plus_projection_is_m(pair):
    p, m = pair
    u_hat, bound = _u_hat(p, m)
    proj = (m * u_hat).sum(dim=1, keepdim=True) * u_hat
    rebuilt = extract_deficiency(p, m) + proj
    # Rows with |p| = 0 have Ext = 0 and û = m̂, so proj = m: the identity holds there too.
    err = (rebuilt - m).norm(dim=1)
    assert (err <= bound).all(), f"|Ext(m) + proj − m| = {err.tolist()}, bounds {bound.tolist()}"


@settings(max_examples=100, deadline=None)
@given(row_pairs(), st.floats(min_value=-4, max_value=4, allow_nan=False))
def test_property_result_lies_in_span_of_p_and_m(pair, lam):
    p, m = pair
    out = ext_sub(p, m, lam)
    for i in range(p.shape[0]):
        # An orthonormal basis of span(p, m) from the unit vectors (well scaled even when |p| ≪ |m|).
        units = [v / v.norm() for v in (p[i], m[i]) if v.norm() > 0]
        if not units:
            assert out[i].abs().max() == 0
            continue
        q, _ = torch.linalg.qr(torch.stack(units, dim=1))
        residual = out[i] - q @ (q.T @ out[i])
        assert residual.norm() <= 1e-9 * (out[i].norm() + p[i].norm() + m[i].norm()), f"row {i} leaves span(p, m)"


# --- errors ------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        ext_sub_(torch.zeros(4, 5), torch.zeros(4, 6), 1.0)


@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(ValueError, match="device mismatch"):
        ext_sub_(torch.zeros(4, 5), torch.zeros(4, 5, device="cuda"), 1.0)


def test_device_mismatch_meta():
    """A second device that exists on every machine: the meta device."""
    with pytest.raises(ValueError, match=r"device mismatch: w_plus is on cpu but w_minus is on meta"):
        ext_sub_(torch.zeros(4, 5), torch.zeros(4, 5, device="meta"), 1.0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
@pytest.mark.parametrize("which", ["w_plus", "w_minus"])
def test_integer_or_bool_dtype_is_a_type_error(dtype, which):
    good = torch.zeros(3, 3)
    bad = torch.zeros(3, 3, dtype=dtype)
    args = (bad, good) if which == "w_plus" else (good, bad)
    with pytest.raises(TypeError, match=rf"{which} has dtype {dtype}.*floating-point"):
        ext_sub_(*args, 1.0)


@pytest.mark.parametrize("lam", [math.inf, -math.inf, math.nan])
def test_non_finite_lambda(lam):
    with pytest.raises(ValueError, match="lam must be finite"):
        ext_sub_(torch.zeros(3, 3), torch.zeros(3, 3), lam)


def test_lambda_must_be_a_number():
    with pytest.raises(TypeError, match="lam must be a real number"):
        ext_sub_(torch.zeros(3, 3), torch.zeros(3, 3), "1.0")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, triton, cpp, torch, reference"):
        ext_sub_(torch.zeros(3, 3), torch.zeros(3, 3), 1.0, backend="cuda")


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ext_sub_(torch.zeros(3, 3), torch.zeros(3, 3), 1.0, backend="triton")


def test_auto_on_cuda_without_triton_warns_how_to_install_it(monkeypatch):
    from extsub_kernels import ops

    class CudaTensor:  # _resolve_backend looks only at is_cuda
        is_cuda = True

    monkeypatch.setattr(ops, "_triton_importable", lambda: False)
    ops._warn_no_triton.cache_clear()
    with pytest.warns(UserWarning, match=r'pip install -e "\.\[cuda\]"'):
        assert ops._resolve_backend("auto", CudaTensor()) == "torch"
    ops._warn_no_triton.cache_clear()


def test_op_backend_names_what_auto_runs_on_each_device():
    assert op_backend("cpu") == cpu_backend() and op_backend(torch.device("cpu")) == cpu_backend()
    assert op_backend("meta") == "torch: eager torch ops (no kernel for meta)"
    assert op_backend("cuda").split(":")[0] in ("triton", "torch")


def test_ext_sub_task_vectors_into_runs_only_where_the_fused_pass_applies(monkeypatch):
    """The fused pass on task vectors runs on CPU views with contiguous columns, an `out` of its own and rows the op
    would not split by columns, with the kernel loaded; elsewhere it says False and leaves `out` alone."""
    from extsub_kernels import ops
    from extsub_kernels.kernels import ext_sub_cpu

    if not backend_available("cpp", "cpu"):
        pytest.fail(f"the C++ kernel cannot be built here: {cpu_backend()}")
    base = torch.randn(6, 40)
    p, m = base + 0.1 * torch.randn(6, 40), base + 0.1 * torch.randn(6, 40)
    expected = base.double() + ext_sub_reference(p.double() - base.double(), m.double() - base.double(), 0.9)
    out = torch.empty(6, 40)
    assert ops.ext_sub_task_vectors_into(out, p, m, base, 0.9)
    assert_close_explained(out, expected, *TOLERANCES[torch.float32])
    untouched = torch.full((6, 40), 7.0)
    columns = torch.randn(40, 6).t()
    assert not ops.ext_sub_task_vectors_into(untouched, columns, m, base, 0.9), "columns not contiguous"
    assert not ops.ext_sub_task_vectors_into(p, p, m, base, 0.9), "out is an input"
    with monkeypatch.context() as patch:
        patch.setattr(ext_sub_cpu, "_LONG_ROW", 40)
        assert not ops.ext_sub_task_vectors_into(untouched, p, m, base, 0.9), "rows the op splits by columns"
    with monkeypatch.context() as patch:
        patch.setattr(ops, "_cpp_kernel_loads", lambda: False)
        assert not ops.ext_sub_task_vectors_into(untouched, p, m, base, 0.9), "no kernel"
    assert torch.equal(untouched, torch.full((6, 40), 7.0))
