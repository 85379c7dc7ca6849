"""The oracle itself, against a plain per-row loop of Algorithm 1 (paper §3) in NumPy."""

import numpy as np
import pytest
import torch

from extsub_kernels import ext_sub_reference


def _algorithm_1_loop(w_plus: np.ndarray, w_minus: np.ndarray, lam: float) -> np.ndarray:
    """Algorithm 1 line by line, one row at a time, with docs/design.md §1's zero-vector convention."""

    def normalize(v):
        n = np.linalg.norm(v)
        return v / n if n > 0 else np.zeros_like(v)

    out = np.empty_like(w_plus)
    for i in range(w_plus.shape[0]):
        v_plus, v_minus = w_plus[i], w_minus[i]
        v_general = normalize(v_plus) + normalize(v_minus)
        u_hat = normalize(v_general)
        projection = np.dot(v_minus, u_hat) * u_hat
        out[i] = v_plus - lam * (v_minus - projection)
    return out


@pytest.mark.parametrize("shape", [(1, 1), (5, 9), (64, 33)], ids=str)
@pytest.mark.parametrize("lam", [0.0, 0.6, 2.0, -1.0])
def test_reference_matches_the_row_loop(shape, lam):
    p = torch.randn(shape, dtype=torch.float64)
    m = torch.randn(shape, dtype=torch.float64)
    p[0] = 0 if shape[0] > 1 else p[0]
    expected = _algorithm_1_loop(p.numpy(), m.numpy(), lam)
    np.testing.assert_allclose(ext_sub_reference(p, m, lam).numpy(), expected, rtol=1e-13, atol=1e-13)


def test_reference_keeps_shape_and_uses_the_requested_dtype():
    p = torch.randn(3, 4, 5, dtype=torch.bfloat16)
    out = ext_sub_reference(p, torch.randn(3, 4, 5), 1.0, dtype=torch.float32)
    assert out.shape == (3, 4, 5) and out.dtype == torch.float32


def test_reference_does_not_modify_its_inputs():
    p, m = torch.randn(4, 6), torch.randn(4, 6)
    p0, m0 = p.clone(), m.clone()
    ext_sub_reference(p, m, 1.0)
    assert torch.equal(p, p0) and torch.equal(m, m0)
