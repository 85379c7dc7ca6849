"""Rows in pieces: Gram matrices accumulated piece by piece give the op's result on the whole rows."""

import pytest
import torch

from extsub_kernels import ext_sub
from extsub_kernels.engine.gram import RowGram, combine_into, pieces, rows_in_memory
from extsub_kernels.engine.transfer import Workspace

from helpers import TOLERANCES, assert_close_explained, method_oracle


def test_pieces_cover_a_view_once_with_whole_rows_where_they_fit():
    def cover(rows, cols, elements, reduce_dim):
        seen = torch.zeros(rows, cols, dtype=torch.int32)
        for r, c in pieces(rows, cols, elements, reduce_dim):
            assert seen[r, c].numel() <= max(elements, 1)
            seen[r, c] += 1
        return seen

    for args in ((7, 5, 12, 1), (3, 50, 12, 1), (7, 5, 12, 0), (7, 50, 12, 0), (1, 1, 1, 1)):
        assert torch.equal(cover(*args), torch.ones(args[0], args[1], dtype=torch.int32)), args
    assert list(pieces(4, 5, 12, 1)) == [(slice(0, 2), slice(0, 5)), (slice(2, 4), slice(0, 5))]


@pytest.mark.parametrize("reduce_dim", [1, 0], ids=["rows", "columns"])
@pytest.mark.parametrize("n_anti", [1, 3])
@pytest.mark.parametrize("with_base", [False, True], ids=["task vectors", "base"])
def test_in_memory_both_passes_equal_the_op_on_whole_rows(reduce_dim, n_anti, with_base):
    shape = (13, 37)
    plus = torch.randn(shape)
    minus = [torch.randn(shape) for _ in range(n_anti)]
    base = torch.randn(shape) if with_base else None
    lams = [0.5, 1.0, 2.0][:n_anti]
    out = torch.empty(shape)
    rows_in_memory(out, [plus, *minus], base, lams, reduce_dim=reduce_dim, workspace=Workspace(16, n_anti + 3))
    expected = method_oracle(plus, minus, lams, base=base, transposed=reduce_dim == 0)
    assert_close_explained(out, expected, *TOLERANCES[torch.float32])


def test_pieces_streamed_into_one_gram_equal_the_op_on_the_whole_row():
    # one row of 1000 elements met as four pieces, the way the engine streams a row longer than a block
    p, m = torch.randn(1000).bfloat16(), torch.randn(1000).bfloat16()
    gram, ws = RowGram(2, 1), Workspace(64, 4)
    cuts = [(0, 300), (300, 600), (600, 900), (900, 1000)]
    for a, b in cuts:
        gram.add([p[a:b].view(1, -1), m[a:b].view(1, -1)], None, reduce_dim=1, workspace=ws)
    coefficients = gram.coefficients([0.7]).float()
    out = torch.empty(1000, dtype=torch.bfloat16)
    for a, b in cuts:
        combine_into(
            out[a:b].view(1, -1),
            [p[a:b].view(1, -1), m[a:b].view(1, -1)],
            None,
            coefficients,
            reduce_dim=1,
            workspace=ws,
        )
    assert_close_explained(out, ext_sub(p, m, 0.7), *TOLERANCES[torch.bfloat16])


def test_degenerate_rows_follow_the_op_zero_expert_rows_stay_zero_anti_rows_change_nothing():
    plus = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [1.0, 0.0, 0.0]])
    minus = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    out = torch.empty(3, 3)
    rows_in_memory(out, [plus, minus], None, [1.5], reduce_dim=1, workspace=Workspace(2, 4))
    assert torch.equal(out, ext_sub(plus, minus, 1.5))  # p' = 0; p' = p; antiparallel: p − λm
    assert torch.equal(out[2], torch.tensor([4.0, 0.0, 0.0]))


def test_coefficients_need_one_lambda_per_anti_expert():
    with pytest.raises(ValueError, match="2 anti-experts but 1 λ values"):
        RowGram(3, 1).coefficients([1.0])


def test_a_nonfinite_input_makes_the_gram_nonfinite():
    gram = RowGram(2, 1)
    gram.add([torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2)], None, reduce_dim=1, workspace=Workspace(8, 4))
    assert not gram.finite()
