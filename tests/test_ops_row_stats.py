"""The op's opt-in row sums (|p|², |m|², p·m per row, docs/design.md §7): every backend and variant, one update."""

import pytest
import torch

from extsub_kernels.ops import ext_sub_, row_products

from helpers import DEVICES, assert_row_sums_close, backend_available, float64_row_sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 33), (1, 1), (3, 5, 4), (16,)], ids=str)
def test_every_backend_hands_back_the_row_sums_and_the_same_result(backend, dtype, shape, device):
    if not backend_available(backend, device):
        pytest.skip(f"{backend} does not run on {device} here")
    p = torch.randn(shape, device=device).to(dtype)
    m = torch.randn(shape, device=device).to(dtype)
    p[0] = 0 if len(shape) > 1 else p[0]  # a zero expert row still gets its sums
    plain = ext_sub_(p.clone(), m, 0.8, backend=backend)
    stats = torch.empty(p.shape[0] if p.dim() > 1 else 1, 3, dtype=torch.float64, device=device)
    with_stats = ext_sub_(p.clone(), m, 0.8, backend=backend, row_stats=stats)
    assert torch.equal(with_stats, plain), "asking for the sums never changes the update"
    assert_row_sums_close(stats, p, m, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_kernel_s_two_loop_variant_sums_long_rows(dtype, device):
    kernel = pytest.importorskip("extsub_kernels.kernels.ext_sub", reason="triton is not installed")
    if not backend_available("triton", device):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    p = torch.randn(5, 70, device=device).to(dtype)
    m = torch.randn(5, 70, device=device).to(dtype)
    stats = torch.empty(5, 3, dtype=torch.float64, device=device)
    kernel.ext_sub_rows_(p.clone(), m, 1.0, max_block=16, row_stats=stats)
    assert_row_sums_close(stats, p, m, dtype, "two-loop variant")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_row_products_alone_equal_the_sums_of_the_op(dtype):
    p, m = torch.randn(9, 300).to(dtype), torch.randn(9, 300).to(dtype)
    assert_row_sums_close(row_products(p, m), p, m, dtype, "row_products")
    assert row_products(p, m).dtype == torch.float64 and row_products(p, m).shape == (9, 3)


def test_empty_tensors_have_zero_sums():
    stats = torch.full((4, 3), 7.0, dtype=torch.float64)
    ext_sub_(torch.empty(4, 0), torch.empty(4, 0), 1.0, row_stats=stats)
    assert torch.equal(stats, torch.zeros(4, 3, dtype=torch.float64))
    assert row_products(torch.empty(0, 5), torch.empty(0, 5)).shape == (0, 3)


@pytest.mark.parametrize(
    "bad, found",
    [
        (torch.empty(3, 2, dtype=torch.float64), "(3, 2)"),
        (torch.empty(4, 3, dtype=torch.float64), "(4, 3)"),
        (torch.empty(3, 3, dtype=torch.float16), "torch.float16"),
        (torch.empty(3, 3, dtype=torch.float64).t(), "(3, 3)"),
    ],
    ids=["columns", "rows", "dtype", "not contiguous"],
)
def test_a_row_stats_tensor_that_cannot_hold_the_sums_is_refused(bad, found):
    with pytest.raises(ValueError, match=r"row_stats must be a contiguous \(3, 3\) float32 or float64 tensor") as e:
        ext_sub_(torch.randn(3, 8), torch.randn(3, 8), 1.0, row_stats=bad)
    assert found in str(e.value)


@pytest.mark.parametrize("lam", [0.8, 3.0, 0.01, -1.0], ids=["λ=0.8", "λ=3", "small λ", "negative λ"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_torch_path_keeps_cos_accurate_however_it_takes_the_dot_product(lam, dtype):
    # Well-conditioned blocks take p·m from |p'|² (one cheap reduction), the others a direct dot product
    # (ops._RESULT_DOT_MAX_LOSS); either way cos(p, m) stays within a few float32 reduction errors.
    p = torch.randn(64, 4096).to(dtype)
    m = (torch.randn(64, 4096) + 0.4 * p.float()).to(dtype)
    stats = torch.empty(64, 3, dtype=torch.float64)
    ext_sub_(p.clone(), m, lam, backend="torch", row_stats=stats)
    expected = float64_row_sums(p, m)
    cos = stats[:, 2] / torch.sqrt(stats[:, 0] * stats[:, 1])
    cos_expected = expected[:, 2] / torch.sqrt(expected[:, 0] * expected[:, 1])
    assert float((cos - cos_expected).abs().max()) < 2.0**-16
