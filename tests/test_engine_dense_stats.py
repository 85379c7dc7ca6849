"""Row statistics of the streamed paths (chunks of rows, rows in pieces, Conv1D columns, the Gram pre-pass) against
a direct float64 computation (docs/design.md §7)."""

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import merge
from extsub_kernels._tensors import as_rows
from extsub_kernels.engine.methods import CPU_CHUNK_ELEMENTS
from extsub_kernels.engine.stats import pair_stats

from checkpoints import random_delta, save

# Sums are float32 products reduced in float32 (the op, row_products) or float64 (the Gram pre-pass) over ≤ 140 000
# columns: cos and the norms are good to about 1e-6 here (a float32 norm of 140 000 numbers was seen 1.1e-6 off);
# 1e-5 leaves margin, as in test_merge_report.
COS_ATOL = 1e-5
NORM_RTOL = 1e-5

CASES = {
    # a 1-D tensor and rows longer than most blocks; row 0 of "wide.weight" is zero in the expert
    "long rows": ({"big": (5000,), "wide.weight": (3, 3000), "small.weight": (6, 5)}, False),
    # GPT-2 Conv1D weights, stored (in, out): the op pairs columns; column 0 of c_fc is zero in the expert
    "conv1d": ({"h.0.mlp.c_fc.weight": (40, 24), "h.0.attn.c_attn.weight": (24, 72)}, True),
}
BLOCKS = {"pieces of rows": 24, "blocks of rows": 4096, "whole tensors": 32 << 20}


def _inputs(tmp_path, shapes, n_anti: int, with_base: bool):
    roles = ["expert", *(f"anti{k}" for k in range(n_anti)), *(["base"] if with_base else [])]
    tensors = {role: random_delta(shapes) for role in roles}
    for name, zero in (("wide.weight", (0,)), ("h.0.mlp.c_fc.weight", (slice(None), 0))):
        if name in shapes:  # a zero task vector in the expert: a degenerate row (a column for Conv1D)
            tensors["expert"][name][zero] = tensors["base"][name][zero] if with_base else 0
    paths = {role: save(tmp_path / "in" / f"{role}.safetensors", t) for role, t in tensors.items()}
    return tensors, paths


def _float64_pair(p: torch.Tensor, m: torch.Tensor, role: str, transposed: bool):
    """The oracle: |p|², |m|², p·m per op row in float64, straight from the tensors."""
    p, m = (t.double().t() if transposed else t.double() for t in (p, m))
    p, m = as_rows(p), as_rows(m)
    return pair_stats(torch.stack([(p * p).sum(1), (m * m).sum(1), (p * m).sum(1)], dim=1), role)


def _assert_pair(actual, expected, what: str) -> None:
    assert (actual.rows, actual.zero_expert_rows, actual.degenerate_rows) == (
        expected.rows,
        expected.zero_expert_rows,
        expected.degenerate_rows,
    ), what
    for field in ("mean", "min", "q1", "median", "q3", "max"):
        assert getattr(actual.cos, field) == pytest.approx(getattr(expected.cos, field), abs=COS_ATOL), (
            f"{what}: cos {field}"
        )
    assert actual.deficiency_share == pytest.approx(expected.deficiency_share, abs=COS_ATOL), what
    assert actual.expert_norm == pytest.approx(expected.expert_norm, rel=NORM_RTOL), what
    assert actual.anti_norm == pytest.approx(expected.anti_norm, rel=NORM_RTOL), what


def _check(report, tensors, shapes, transposed: bool, n_anti: int, with_base: bool) -> None:
    by_name = {s.name: s for s in report.stats}
    assert sorted(by_name) == sorted(shapes)
    out = load_file(report.outputs[0])
    for name in shapes:
        base = tensors["base"][name].double() if with_base else 0.0
        p = tensors["expert"][name].double() - base
        roles = ["ANTI"] if n_anti == 1 else [f"ANTI #{k + 1}" for k in range(n_anti)]
        for k, role in enumerate(roles):
            m = tensors[f"anti{k}"][name].double() - base
            assert by_name[name].pairs[k].anti == role
            _assert_pair(by_name[name].pairs[k], _float64_pair(p, m, role, transposed), f"{name} against {role}")
        change = float((out[name].double() - tensors["expert"][name].double()).norm() / p.norm())
        assert by_name[name].relative_change[0] == pytest.approx(change, rel=1e-5), f"{name}: relative change"


@pytest.mark.parametrize("n_anti, with_base", [(1, False), (2, True)], ids=["one anti-expert", "two and a base"])
@pytest.mark.parametrize("method", ["ext-sub", "sub"])
@pytest.mark.parametrize("block_bytes", list(BLOCKS.values()), ids=list(BLOCKS))
@pytest.mark.parametrize("case", list(CASES))
def test_statistics_of_streamed_rows_equal_a_direct_float64_computation(
    tmp_path, case, block_bytes, method, n_anti, with_base
):
    shapes, transposed = CASES[case]
    tensors, paths = _inputs(tmp_path, shapes, n_anti, with_base)
    antis = [paths[f"anti{k}"] for k in range(n_anti)]
    report = merge(
        paths["expert"],
        antis if n_anti > 1 else antis[0],
        tmp_path / "out.safetensors",
        base=paths.get("base"),
        lam="0.7:1.3" if n_anti > 1 else 0.7,
        method=method,
        stats=True,
        transposed=transposed,
        block_bytes=block_bytes,
    )
    _check(report, tensors, shapes, transposed, n_anti, with_base)


@pytest.mark.parametrize(
    "n_anti, with_base", [(1, False), (2, True)], ids=["one anti-expert: the op in place", "two and a base: Gram"]
)
def test_rows_longer_than_a_workspace_chunk_within_one_block(tmp_path, n_anti, with_base):
    """One block per tensor, rows longer than a workspace chunk: the op in place on the whole rows (its own sums),
    or the Gram pre-pass in memory (several anti-experts, a base)."""
    shapes = {"long": (CPU_CHUNK_ELEMENTS + 1000,), "rows.weight": (2, CPU_CHUNK_ELEMENTS + 7)}
    tensors, paths = _inputs(tmp_path, shapes, n_anti, with_base)
    antis = [paths[f"anti{k}"] for k in range(n_anti)]
    report = merge(
        paths["expert"],
        antis,
        tmp_path / "out.safetensors",
        base=paths.get("base"),
        lam="0.7:1.3" if n_anti > 1 else 0.7,
        stats=True,
        block_bytes=8 << 20,  # one block each: the rows go through the Gram path in memory, not in two passes
    )
    _check(report, tensors, shapes, False, n_anti, with_base)
