"""The method step: ext-sub, sub and add per tensor, in place only when asked, on task vectors with a base."""

import torch

from extsub_kernels import ext_sub
from extsub_kernels.engine.methods import apply_method

from helpers import TOLERANCES, assert_close_explained


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
