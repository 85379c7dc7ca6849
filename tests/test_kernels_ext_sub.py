"""The Triton kernel's launch settings and both of its variants, on GPU or under TRITON_INTERPRET=1."""

import pytest
import torch

from extsub_kernels import ext_sub_, ext_sub_reference

from helpers import DEVICES, TOLERANCES, assert_close_explained, backend_available


@pytest.fixture
def kernel_module():
    return pytest.importorskip("extsub_kernels.kernels.ext_sub", reason="triton is not installed")


def test_settings_pack_short_rows_and_loop_long_ones(kernel_module):
    settings = kernel_module._launch_settings
    block_rows, block_cols, single_pass, _ = settings(4096, 64, 16384)
    assert single_pass and block_cols == 64 and block_rows > 1, "short rows share a program"
    block_rows, block_cols, single_pass, warps = settings(4096, 11008, 16384)
    assert single_pass and block_rows == 1 and block_cols == 16384 and warps == 16
    block_rows, block_cols, single_pass, _ = settings(10, 40000, 16384)
    assert not single_pass and block_rows == 1 and block_cols < 40000, "long rows loop over column tiles"
    block_rows, _, _, _ = settings(3, 8, 16384)
    assert block_rows == 4, "no more rows per program than the problem has (next power of two)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_block", [16, 64])
@pytest.mark.parametrize("shape", [(5, 17), (3, 64), (2, 65), (1, 1000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_two_loop_variant_on_rows_wider_than_the_block(kernel_module, shape, max_block, dtype, device):
    if not backend_available("triton", device):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    p = torch.randn(shape, device=device).to(dtype)
    m = torch.randn(shape, device=device).to(dtype)
    expected = ext_sub_reference(p, m, 0.9)
    kernel_module.ext_sub_rows_(p, m, 0.9, max_block=max_block)
    assert_close_explained(p, expected, *TOLERANCES[dtype], what=f"max_block={max_block}")


@pytest.mark.parametrize("device", DEVICES)
def test_rows_with_a_stride_between_them(kernel_module, device):
    """The launcher passes row strides through: rows of a wider buffer are processed in place."""
    if not backend_available("triton", device):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    buffer = torch.randn(6, 100, device=device)
    p = buffer[:, 10:60]
    m = torch.randn(6, 200, device=device)[:, ::1][:, 50:100]
    untouched = buffer[:, 60:].clone()
    expected = ext_sub_reference(p, m, 1.0)
    kernel_module.ext_sub_rows_(p, m, 1.0)
    assert_close_explained(p, expected, *TOLERANCES[torch.float32])
    assert torch.equal(buffer[:, 60:], untouched), "columns outside the view must not be written"


# --- what only hardware exercises (skipped without CUDA; benchmarks/gpu_session.sh runs them) ---


@pytest.mark.gpu
def test_more_than_2_pow_31_elements_use_int64_offsets(kernel_module):
    """Rows past element 2³¹ are addressed with int64 offsets: the last rows come out right."""
    rows, cols = 2**16 + 8, 2**15  # 2³¹ + 2¹⁸ elements, 4.3 GB per bf16 operand
    p = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    m = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    picked = torch.tensor([0, 1, rows // 2, rows - 9, rows - 2, rows - 1], device="cuda")
    expected = ext_sub_reference(p[picked], m[picked], 0.8)
    kernel_module.ext_sub_rows_(p, m, 0.8)
    assert_close_explained(p[picked], expected, *TOLERANCES[torch.bfloat16], what="rows around and past 2³¹")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rows_longer_than_the_one_pass_block_on_the_gpu(kernel_module, dtype):
    from extsub_kernels.kernels.ext_sub_tuning import MAX_BLOCK_ELEMENTS

    p = torch.randn(64, 3 * MAX_BLOCK_ELEMENTS + 7, device="cuda").to(dtype)
    m = torch.randn_like(p)
    expected = ext_sub_reference(p, m, 1.3)
    kernel_module.ext_sub_rows_(p, m, 1.3)
    assert_close_explained(p, expected, *TOLERANCES[dtype], what="two-loop variant, compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (3, 5), (1, 70000)], ids=str)
def test_triton_and_torch_backends_agree_on_the_gpu(shape, dtype):
    p = torch.randn(shape, device="cuda").to(dtype)
    m = torch.randn(shape, device="cuda").to(dtype)
    by_triton = ext_sub_(p.clone(), m, 0.6, backend="triton")
    by_torch = ext_sub_(p.clone(), m, 0.6, backend="torch")
    expected = ext_sub_reference(p, m, 0.6)
    # Each rounds the same float32 (float64) result once to the dtype: both within the dtype's tolerance of
    # the float64 oracle, hence within twice that of each other.
    assert_close_explained(by_triton, expected, *TOLERANCES[dtype], what="triton vs oracle")
    assert_close_explained(by_torch, expected, *TOLERANCES[dtype], what="torch vs oracle")


@pytest.mark.gpu
def test_a_cuda_index_past_the_last_gpu_is_a_clear_error():
    from extsub_kernels.engine.options import resolve_device
    from extsub_kernels.errors import InputError

    missing = torch.cuda.device_count()
    with pytest.raises(InputError, match=rf"'cuda:{missing}': there are only {missing} CUDA device\(s\)"):
        resolve_device(f"cuda:{missing}")
