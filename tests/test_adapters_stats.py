"""Row statistics of adapter merges from each type's parameters: LoRA from the factors (never ΔW), (IA)³ vectors and
prefix rows directly, each against a float64 computation on the dense rows."""

import math

import pytest
import torch

from extsub_kernels import IA3Adapter, LoraAdapter, LoraModule, PrefixAdapter, ext_sub_reference, merge_adapters
from extsub_kernels.adapters.prefix import PROMPT_KEY
from extsub_kernels.adapters.stats import adapter_stats, change_sq, row_sums
from extsub_kernels.engine.stats import pair_stats

from helpers import assert_close_explained

EPS64 = torch.finfo(torch.float64).eps


def _module(out: int, r: int, inp: int, scaling: float) -> LoraModule:
    return LoraModule(torch.randn(r, inp, dtype=torch.float64), torch.randn(out, r, dtype=torch.float64), scaling)


def _degenerate_pair() -> tuple[LoraModule, LoraModule]:
    """Expert and anti-expert modules whose ΔW rows include: 0 a zero expert row, 1 a zero anti row, 2 an exactly
    antiparallel pair (same A, anti B row = −2 × expert B row at the same scaling)."""
    expert, anti = _module(24, 4, 40, 0.5), _module(24, 4, 40, 0.5)
    a = expert.lora_A.clone()
    b_plus, b_minus = expert.lora_B.clone(), torch.randn(24, 4, dtype=torch.float64)
    b_plus[0] = 0
    b_minus[1] = 0
    b_minus[2] = -2.0 * b_plus[2]
    expert = LoraModule(a, b_plus, 0.5)
    anti = LoraModule(
        torch.cat([a, anti.lora_A]), torch.cat([b_minus, torch.zeros(24, 4, dtype=torch.float64)], 1), 0.5
    )
    return expert, anti


def _dense_sums(expert: LoraModule, anti: LoraModule) -> torch.Tensor:
    p, m = expert.delta(torch.float64), anti.delta(torch.float64)
    return torch.stack([(p * p).sum(1), (m * m).sum(1), (p * m).sum(1)], dim=1)


def test_row_sums_from_the_factors_equal_those_of_dense_delta_w():
    expert, anti = _module(48, 4, 80, 2.0), _module(48, 7, 80, 0.25)
    dense = _dense_sums(expert, anti)
    scale = float((dense[:, 0] + dense[:, 1]).max())
    # float64 products of r-term and in-term sums: 64·eps of the largest |p|² + |m|² bounds them with margin
    assert_close_explained(row_sums(expert, anti), dense, 0.0, 64 * EPS64, "row sums", scale)


def test_degenerate_rows_are_named_from_the_factors():
    expert, anti = _degenerate_pair()
    stats = pair_stats(row_sums(expert, anti), "ANTI")
    dense = pair_stats(_dense_sums(expert, anti), "ANTI")
    assert (stats.zero_expert_rows, stats.zero_anti_rows, stats.antiparallel_rows) == (1, 1, 1)
    assert stats.degenerate_rows == dense.degenerate_rows == 3
    assert stats.cos.median == pytest.approx(dense.cos.median, abs=2.0**-24)
    assert stats.deficiency_share == pytest.approx(dense.deficiency_share, abs=4 * math.sqrt(EPS64))


@pytest.mark.parametrize("method", ["ext-sub", "sub"])
def test_the_change_of_a_merged_module_equals_the_dense_one(method):
    expert, anti = _degenerate_pair()
    merged = merge_adapters(LoraAdapter({"q": expert}), LoraAdapter({"q": anti}), 0.6, method).modules["q"]
    p, m = expert.delta(torch.float64), anti.delta(torch.float64)
    # the paper's Algorithm 1 in float64 on the dense rows is the oracle (reference.py)
    dense = ext_sub_reference(p, m, 0.6) if method == "ext-sub" else p - 0.6 * m
    expected = float(((dense - p) ** 2).sum())
    assert change_sq(expert, merged) == pytest.approx(expected, rel=1e-9)


def test_adapter_stats_cover_merged_modules_per_anti_expert_and_per_lambda():
    q, v = _module(16, 2, 24, 1.0), _module(16, 3, 24, 1.0)
    expert = LoraAdapter({"layers.0.q": q, "layers.0.v": v})
    anti1 = LoraAdapter({"layers.0.q": _module(16, 4, 24, 0.5)})
    anti2 = LoraAdapter({"layers.0.q": _module(16, 2, 24, 2.0), "layers.0.v": _module(16, 2, 24, 2.0)})
    merged = [merge_adapters(expert, [anti1, anti2], lam) for lam in (0.5, 2.0)]
    stats = adapter_stats(
        [expert, anti1, anti2], merged, ["layers.0.q", "layers.0.v"], ["EXPERT", "ANTI #1", "ANTI #2"]
    )
    q_stats, v_stats = stats
    assert [p.anti for p in q_stats.pairs] == ["ANTI #1", "ANTI #2"] and [p.anti for p in v_stats.pairs] == ["ANTI #2"]
    for s, lam in enumerate((0.5, 2.0)):  # two steps in sequence: the change is the dense chain's
        p = q.delta(torch.float64)
        out = ext_sub_reference(p, anti1.modules["layers.0.q"].delta(torch.float64), lam)
        out = ext_sub_reference(out, anti2.modules["layers.0.q"].delta(torch.float64), lam)
        assert q_stats.relative_change[s] == pytest.approx(float((out - p).norm() / p.norm()), rel=1e-9)
    assert q_stats.kind == "module" and q_stats.pairs[0].rows == 16


def test_a_module_type_without_a_hook_is_named():
    with pytest.raises(TypeError, match="no row statistics for str and str modules"):
        row_sums("a", "b")


def test_ia3_vectors_are_one_row_each_of_their_task_vector():
    expert = IA3Adapter({"k": 1 + 0.3 * torch.randn(8, 1, dtype=torch.float64), "v": torch.ones(8, 1)})
    anti = IA3Adapter({"k": 1 + 0.3 * torch.randn(8, 1, dtype=torch.float64), "v": 1 + torch.randn(8, 1)})
    merged = [merge_adapters(expert, anti, lam) for lam in (0.5, 2.0)]
    stats = {s.name: s for s in adapter_stats([expert, anti], merged, ["k", "v"], ["EXPERT", "ANTI"])}
    d_plus, d_minus = expert.vectors["k"].reshape(1, -1) - 1, anti.vectors["k"].reshape(1, -1) - 1
    cos = float((d_plus * d_minus).sum() / (d_plus.norm() * d_minus.norm()))
    assert stats["k"].pairs[0].rows == 1 and stats["k"].pairs[0].cos.mean == pytest.approx(cos, rel=1e-12)
    for s, lam in enumerate((0.5, 2.0)):  # Algorithm 1 in float64 on the task vectors (reference.py)
        expected = float((ext_sub_reference(d_plus, d_minus, lam) - d_plus).norm() / d_plus.norm())
        assert stats["k"].relative_change[s] == pytest.approx(expected, rel=1e-9)
    assert stats["v"].pairs[0].zero_expert_rows == 1, "l = 1 is a zero task vector"


def test_prefix_rows_are_the_per_head_vectors_reported_per_layer_and_head():
    tensors = [torch.randn(3, 2 * 2 * 16, dtype=torch.float64) for _ in range(2)]
    adapters = [PrefixAdapter(t, 3, 2, 16, 4) for t in tensors]  # 3 tokens, 2 layers, token_dim 16, 4 heads
    merged = [merge_adapters(adapters[0], adapters[1], 0.7)]
    stats = adapter_stats(adapters, merged, [PROMPT_KEY], ["EXPERT", "ANTI"])
    assert [s.name for s in stats] == [f"{PROMPT_KEY}.layers.{layer}.head{h}" for layer in range(2) for h in range(4)]
    # (tokens, layers, key/value, heads, head_dim), as PEFT splits the prefix
    p, m, out = (a.prompt_embeddings.reshape(3, 2, 2, 4, 4) for a in (*adapters, merged[0]))
    for s in stats:
        layer, head = int(s.name.split(".")[2]), int(s.name[-1])
        rows_p, rows_m = p[:, layer, :, head].reshape(-1, 4), m[:, layer, :, head].reshape(-1, 4)
        expected = pair_stats(
            torch.stack([(rows_p**2).sum(1), (rows_m**2).sum(1), (rows_p * rows_m).sum(1)], dim=1), "ANTI"
        )
        assert s.pairs[0].rows == 3 * 2 == expected.rows
        assert s.pairs[0].cos.median == pytest.approx(expected.cos.median, abs=2.0**-24)
        change = float((out[:, layer, :, head].reshape(-1, 4) - rows_p).norm() / rows_p.norm())
        assert s.relative_change[0] == pytest.approx(change, rel=1e-12)
