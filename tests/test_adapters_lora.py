"""The factored LoRA path against the dense op on materialized ΔW (docs/design.md §3).

The oracle is `ext_sub_reference` (paper §3, Algorithm 1 written literally) in float64 on
ΔW = s·B·A formed densely, applied anti-expert after anti-expert; the dense fast op
`ext_sub_` is checked alongside. Adapters here are in memory; files and PEFT are in
test_adapter.py.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from extsub_kernels import ext_sub_, ext_sub_reference, subtract_
from extsub_kernels.adapters import merge_adapters
from extsub_kernels.adapters.factors import LoraModule, ext_sub_factors, lora_row_norms, truncate_factors
from extsub_kernels.adapters.lora import LoraAdapter, LoraSweep, module_scaling

from helpers import DEVICES, assert_close_explained

EPS64 = torch.finfo(torch.float64).eps
# The same float32 arithmetic on another device's kernels: a few ulps apart.
TOLERANCES_32 = (2.0**-18, 2.0**-18)


def _module(out, inp, r, scaling, zero_rows=(), dtype=torch.float64, generator=None) -> LoraModule:
    b = torch.randn(out, r, dtype=dtype, generator=generator)
    b[list(zero_rows)] = 0
    return LoraModule(torch.randn(r, inp, dtype=dtype, generator=generator), b, scaling)


def _dense(module: LoraModule | None, shape: tuple[int, int]) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64) if module is None else module.delta(torch.float64)


def _expected(expert, antis, lams, method, name, shape) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ΔW' of module `name` by the dense oracles, anti-expert after anti-expert.

    Returns (by Algorithm 1 literally, by the dense fast op `ext_sub_`, the literal form's
    condition number). The literal form divides by |u| = |p̂ + m̂|, so its error grows as
    1/|u| when p and m are nearly antiparallel (docs/design.md §1); the closed form has no such
    factor. The condition number is the product over steps of max(1, max over rows 1/|u|).
    """
    literal = fast = _dense(expert.modules.get(name), shape)
    condition = 1.0
    for anti, lam in zip(antis, lams, strict=False):
        if name not in anti.modules:
            continue
        m = _dense(anti.modules[name], shape)
        if method == "ext-sub":
            # Rows with |p| = 0 keep p exactly (docs/design.md §1); Algorithm 1 written literally returns
            # m − (m·m̂)m̂ there, zero only up to rounding, and a later step would amplify that noise.
            zero = (literal == 0).all(dim=1, keepdim=True)
            u = torch.nn.functional.normalize(literal, dim=1) + torch.nn.functional.normalize(m, dim=1)
            live = ~zero.squeeze(1) & (m != 0).any(dim=1)
            if live.any():
                condition *= max(1.0, float(1 / torch.linalg.vector_norm(u[live], dim=1).min()))
            literal = torch.where(zero, literal, ext_sub_reference(literal, m, lam))
            fast = ext_sub_(fast.clone(), m, lam)
        else:
            literal = fast = subtract_(fast.clone(), m, lam if method == "sub" else -lam)
    return literal, fast, condition


def _magnitude(module: LoraModule) -> float:
    """max(|s|·|B|·|A|): the natural scale of the rounding errors of s·B·A."""
    return float(((module.lora_B.abs().double() * abs(module.scaling)) @ module.lora_A.abs().double()).max())


def _tolerance(module: LoraModule, inner: int, *inputs: tuple[LoraModule, float]) -> tuple[float, float]:
    """(atol_scale, scale) for a float64 comparison of B'·A' with the dense oracle.

    Both sides round O(R + in) times at 2⁻⁵³ (the product over R = rank terms, the oracle's
    norms over `inner` = in_features terms), each error bounded by the largest natural scale
    involved: the result's max(|B'|·|A'|) and each input's, times (1 + |λ|) for anti-experts.
    8·(R + in)·eps64 of that scale leaves a wide margin.
    """
    scale = max([_magnitude(module)] + [(1 + abs(lam)) * _magnitude(m) for m, lam in inputs])
    return 8 * (module.rank + inner) * EPS64, scale


def _assert_matches_oracle(merged, expert, antis, lams, method, what=""):
    for name, module in merged.modules.items():
        shape = (module.out_features, module.in_features)
        literal, fast, condition = _expected(expert, antis, lams, method, name, shape)
        inputs = [(a.modules[name], lam) for a, lam in zip(antis, lams, strict=False) if name in a.modules]
        if name in expert.modules:
            inputs.append((expert.modules[name], 0.0))
        atol, scale = _tolerance(module, module.in_features, *inputs)
        actual = module.delta(torch.float64)
        assert_close_explained(actual, fast, 0.0, atol, f"{what} {name} vs ext_sub_", scale=scale)
        assert_close_explained(actual, literal, 0.0, atol * condition, f"{what} {name} vs Algorithm 1", scale=scale)


# --- row norms ----------------------------------------------------------------------------


@pytest.mark.parametrize("out,inp,r", [(1, 1, 1), (7, 13, 3), (64, 5, 8), (5, 64, 8)])
def test_row_norms_from_gram_match_dense_norms(out, inp, r):
    module = _module(out, inp, r, 0.75, zero_rows=[0])
    norms = lora_row_norms(module.lora_B, module.lora_A, module.scaling)
    dense = torch.linalg.vector_norm(module.delta(torch.float64), dim=1)
    assert norms[0] == 0
    assert_close_explained(norms, dense, 8 * (r + inp) * EPS64, 0.0, "row norms")


# --- one anti-expert: the factored result is the dense op --------------------------------


@pytest.mark.parametrize(
    "case",
    [
        dict(r=(4, 4), scaling=(2.0, 2.0)),
        dict(r=(4, 9), scaling=(2.0, 2.0)),  # different ranks
        dict(r=(8, 4), scaling=(0.5, 3.0)),  # different alpha
        dict(r=(16, 4), scaling=(16 / math.sqrt(16), 8 / 4)),  # rsLoRA on the expert side
    ],
    ids=["same", "different-r", "different-alpha", "rslora-expert"],
)
@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
def test_factored_equals_dense(case, method):
    (r_plus, r_minus), (s_plus, s_minus) = case["r"], case["scaling"]
    expert = LoraAdapter({"w": _module(24, 40, r_plus, s_plus)})
    anti = LoraAdapter({"w": _module(24, 40, r_minus, s_minus)})
    merged = merge_adapters(expert, anti, 1.3, method)
    out = merged.modules["w"]
    assert out.rank == r_plus + r_minus and out.scaling == 1.0
    _assert_matches_oracle(merged, expert, [anti], [1.3], method, method)


def test_scaling_from_configs_with_patterns_and_rslora():
    # The scaling each side gets from its config (rank_pattern/alpha_pattern/rsLoRA), then the merge.
    plus_config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"v_proj": 3}}
    minus_config = {"r": 8, "lora_alpha": 16, "use_rslora": True}
    names = {"layers.0.q_proj": 4, "layers.0.v_proj": 6}
    expert = LoraAdapter({n: _module(12, 10, r, module_scaling(plus_config, n, r)) for n, r in names.items()})
    anti = LoraAdapter({n: _module(12, 10, 8, module_scaling(minus_config, n, 8)) for n in names})
    assert expert.modules["layers.0.v_proj"].scaling == 3 / 6
    assert anti.modules["layers.0.q_proj"].scaling == 16 / math.sqrt(8)
    merged = merge_adapters(expert, anti, 0.7)
    assert {n: m.rank for n, m in merged.modules.items()} == {"layers.0.q_proj": 12, "layers.0.v_proj": 14}
    _assert_matches_oracle(merged, expert, [anti], [0.7], "ext-sub")


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
def test_several_anti_experts_in_order(method):
    expert = LoraAdapter({"w": _module(20, 30, 4, 2.0)})
    antis = [LoraAdapter({"w": _module(20, 30, r, s)}) for r, s in ((3, 1.0), (5, 0.25), (2, 4.0))]
    lams = [0.5, 1.5, 2.0]
    merged = merge_adapters(expert, antis, lams, method)
    assert merged.modules["w"].rank == 4 + 3 + 5 + 2
    _assert_matches_oracle(merged, expert, antis, lams, method, method)


def test_order_of_anti_experts_matters_for_ext_sub():
    expert = LoraAdapter({"w": _module(10, 12, 2, 1.0)})
    a, b = LoraAdapter({"w": _module(10, 12, 2, 1.0)}), LoraAdapter({"w": _module(10, 12, 2, 1.0)})
    ab = merge_adapters(expert, [a, b], 1.0).modules["w"].delta(torch.float64)
    ba = merge_adapters(expert, [b, a], 1.0).modules["w"].delta(torch.float64)
    assert (ab - ba).abs().max() > 1e-6  # α of the second step depends on the first step's result


# --- degenerate rows -----------------------------------------------------------------------


def test_zero_expert_rows_stay_zero_and_are_reported():
    expert = LoraAdapter({"w": _module(9, 11, 3, 1.0, zero_rows=[0, 4])})
    anti = LoraAdapter({"w": _module(9, 11, 2, 1.0)})
    merged = merge_adapters(expert, anti, 2.0)
    delta = merged.modules["w"].delta(torch.float64)
    assert torch.equal(delta[[0, 4]], torch.zeros(2, 11, dtype=torch.float64))
    assert torch.equal(merged.modules["w"].lora_B[[0, 4]], torch.zeros(2, 5, dtype=torch.float64))
    assert merged.report.zero_rows == {"w": 2}
    _assert_matches_oracle(merged, expert, [anti], [2.0], "ext-sub")


def test_zero_anti_rows_leave_expert_rows_unchanged():
    expert = LoraAdapter({"w": _module(6, 7, 2, 1.5)})
    anti = LoraAdapter({"w": _module(6, 7, 2, 1.0, zero_rows=[1, 2])})
    delta = merge_adapters(expert, anti, 3.0).modules["w"].delta(torch.float64)
    p = expert.modules["w"].delta(torch.float64)
    assert_close_explained(delta[[1, 2]], p[[1, 2]], 16 * EPS64, 0.0, "rows with |m| = 0")


def test_antiparallel_rows_subtract_fully():
    # m = −c·p on every row: p̂ = −m̂, Ext(m) = m, so p' = p − λm (docs/design.md §1). The literal
    # Algorithm 1 is ill-conditioned exactly here, so the expectation is the closed-form limit.
    b, a = torch.randn(8, 3, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    expert = LoraAdapter({"w": LoraModule(a, b, 1.0)})
    anti = LoraAdapter({"w": LoraModule(a, b, -0.5)})
    delta = merge_adapters(expert, anti, 1.5).modules["w"].delta(torch.float64)
    p = expert.modules["w"].delta(torch.float64)
    assert_close_explained(delta, p - 1.5 * (-0.5 * p), 1e-13, 1e-13, "antiparallel rows")


# --- modules on one side only ------------------------------------------------------------


def test_modules_on_one_side_only():
    expert = LoraAdapter({"both": _module(6, 8, 2, 1.0), "expert_only": _module(6, 8, 3, 2.0)})
    anti = LoraAdapter({"both": _module(6, 8, 2, 1.0), "anti_only": _module(5, 8, 4, 0.5)})

    merged = merge_adapters(expert, anti, 0.8, "ext-sub")
    assert merged.modules["expert_only"] is expert.modules["expert_only"]  # copied unchanged
    assert "anti_only" not in merged.modules
    assert merged.report.dropped == ["anti_only"] and merged.report.copied == ["expert_only"]
    assert "anti_only" in merged.report.summary() and "Ext = 0" in merged.report.summary()

    for method, sign in (("sub", -1.0), ("add", 1.0)):
        merged = merge_adapters(expert, anti, 0.8, method)
        only = merged.modules["anti_only"]
        assert only.rank == 4 and merged.report.added == ["anti_only"]
        expected = sign * 0.8 * anti.modules["anti_only"].delta(torch.float64)
        assert_close_explained(only.delta(torch.float64), expected, 1e-14, 1e-14, method)
        _assert_matches_oracle(merged, expert, [anti], [0.8], method, method)


def test_module_only_in_second_anti_expert():
    expert = LoraAdapter({"w": _module(6, 8, 2, 1.0)})
    first = LoraAdapter({"w": _module(6, 8, 2, 1.0)})
    second = LoraAdapter({"x": _module(6, 8, 2, 1.0)})
    merged = merge_adapters(expert, [first, second], [1.0, 2.0], "sub")
    assert set(merged.modules) == {"w", "x"}
    _assert_matches_oracle(merged, expert, [first, second], [1.0, 2.0], "sub")


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_sweep_is_merge_adapters_bitwise(method, dtype):
    """LoraSweep (norms prepared once) gives exactly merge_adapters' modules at every λ: one anti-expert, two in
    order (the second step's norms depend on λ), modules on one side only, an expert row of zeros."""
    expert = LoraAdapter({n: _module(6, 8, 2, 1.5, zero_rows=[1] if n == "q" else (), dtype=dtype) for n in "qkv"})
    expert.modules["only_expert"] = _module(4, 8, 3, 2.0, dtype=dtype)
    first = LoraAdapter(
        {n: _module(6, 8, 3, 0.5, dtype=dtype) for n in "qk"} | {"x": _module(5, 8, 2, 1.0, dtype=dtype)}
    )
    second = LoraAdapter({n: _module(6, 8, 2, 2.0, dtype=dtype) for n in "kv"})
    for antis in ([first], [first, second]):
        sweep = LoraSweep(expert, antis, method)
        for lam in [0.0, 0.3, 1.0, 2.5] + ([[0.5, 1.5]] if len(antis) == 2 else []):  # one λ per anti-expert too
            expected = merge_adapters(expert, antis, lam, method).modules
            got = sweep.modules(lam)
            assert list(got) == list(expected)
            for name, module in expected.items():
                other = got[name]
                assert torch.equal(other.lora_A, module.lora_A) and torch.equal(other.lora_B, module.lora_B), name
                assert (other.scaling, other.storage_dtype) == (module.scaling, module.storage_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_a_sweep_moved_to_a_device_merges_there(device):
    expert = LoraAdapter({"q": _module(6, 8, 2, 1.5, dtype=torch.float32)})
    anti = LoraAdapter({"q": _module(6, 8, 3, 0.5, dtype=torch.float32)})
    sweep = LoraSweep(expert, anti, "ext-sub").to(device)
    merged = sweep.modules(0.8)["q"]
    assert merged.lora_B.device.type == device
    expected = merge_adapters(expert, anti, 0.8, "ext-sub").modules["q"]
    assert_close_explained(merged.lora_B.cpu(), expected.lora_B, *TOLERANCES_32)


# --- property test -------------------------------------------------------------------------


@st.composite
def adapter_problems(draw):
    out, inp = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    n_antis = draw(st.integers(1, 3))
    scalings = st.floats(0.05, 8.0)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))  # reproducible examples

    def module(rank):
        zero = draw(st.lists(st.integers(0, out - 1), max_size=out))
        return _module(out, inp, rank, draw(scalings), zero_rows=sorted(set(zero)), generator=generator)

    expert = LoraAdapter({"w": module(draw(st.integers(1, 5)))})
    antis = [LoraAdapter({"w": module(draw(st.integers(1, 5)))}) for _ in range(n_antis)]
    lams = [draw(st.floats(-4.0, 4.0)) for _ in range(n_antis)]
    return expert, antis, lams, draw(st.sampled_from(["ext-sub", "sub", "add"]))


@settings(max_examples=200, deadline=None)
@given(adapter_problems())
def test_property_factored_equals_dense(problem):
    expert, antis, lams, method = problem
    merged = merge_adapters(expert, antis, lams, method)
    assert merged.modules["w"].rank == expert.modules["w"].rank + sum(a.modules["w"].rank for a in antis)
    _assert_matches_oracle(merged, expert, antis, lams, method, method)


# --- max_rank: truncated SVD in the factored space ---------------------------------------


@pytest.mark.parametrize("out,inp,rank,keep", [(30, 20, 10, 3), (7, 40, 12, 5), (9, 9, 12, 4), (16, 16, 6, 1)])
def test_truncation_matches_a_dense_svd(out, inp, rank, keep):
    b, a = torch.randn(out, rank, dtype=torch.float64), torch.randn(rank, inp, dtype=torch.float64)
    b2, a2, error = truncate_factors(b, a, keep)
    assert b2.shape == (out, keep) and a2.shape == (keep, inp)
    dense = b @ a
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    expected_error = float(s[keep:].norm() / s.norm())
    assert abs(error - expected_error) <= 1e-12
    # The truncated product is the best rank-`keep` approximation, and its error is the reported one.
    best = (u[:, :keep] * s[:keep]) @ vh[:keep]
    assert_close_explained(b2 @ a2, best, 0.0, 1e-11, "rank-k approximation")
    assert abs(float((dense - b2 @ a2).norm() / dense.norm()) - error) <= 1e-12


def test_merge_with_max_rank_reports_errors_per_module():
    expert = LoraAdapter({"w": _module(30, 25, 6, 1.0), "small": _module(30, 25, 2, 1.0)})
    anti = LoraAdapter({"w": _module(30, 25, 6, 1.0)})
    exact = merge_adapters(expert, anti, 1.0)
    cut = merge_adapters(expert, anti, 1.0, max_rank=4)
    assert cut.modules["w"].rank == 4 and cut.modules["small"].rank == 2
    assert cut.report.truncation_error["small"] == 0.0
    full = exact.modules["w"].delta(torch.float64)
    measured = float((full - cut.modules["w"].delta(torch.float64)).norm() / full.norm())
    assert abs(cut.report.truncation_error["w"] - measured) <= 1e-12
    s = torch.linalg.svdvals(full)
    assert abs(measured - float(s[4:].norm() / s.norm())) <= 1e-12
    assert "truncation error" in cut.report.summary()


def test_truncation_of_a_zero_product_has_zero_error():
    b2, a2, error = truncate_factors(torch.zeros(5, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), 2)
    assert error == 0.0 and torch.equal(b2 @ a2, torch.zeros(5, 6, dtype=torch.float64))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_rank_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        truncate_factors(torch.randn(4, 3), torch.randn(3, 5), bad)
    adapter = LoraAdapter({"w": _module(4, 5, 1, 1.0)})
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        merge_adapters(adapter, adapter, 1.0, max_rank=bad)


# --- dtypes ------------------------------------------------------------------------------


def test_bf16_adapters_compute_in_float32_and_keep_bf16_as_storage():
    expert = LoraAdapter({"w": _module(64, 48, 8, 2.0, dtype=torch.bfloat16)})
    anti = LoraAdapter({"w": _module(64, 48, 8, 1.0, dtype=torch.bfloat16)})
    out = merge_adapters(expert, anti, 1.0).modules["w"]
    assert out.lora_B.dtype == torch.float32 and out.storage_dtype == torch.bfloat16
    expected = ext_sub_reference(expert.modules["w"].delta(torch.float64), anti.modules["w"].delta(torch.float64), 1.0)
    # Inputs are exact in float32; the float32 factors round ≤ (R + in) times at 2⁻²⁴ (see _tolerance).
    scale = _tolerance(out, 48)[1]
    assert_close_explained(
        out.delta(torch.float32), expected, 0.0, 8 * (16 + 48) * 2.0**-24, "bf16 inputs", scale=scale
    )


def test_ext_sub_factors_keeps_the_dtype_of_the_expert_factors():
    b, a, zeros = ext_sub_factors(
        torch.ones(3, 2), torch.ones(2, 4), torch.ones(3, 1, dtype=torch.float64), torch.ones(1, 4), 1.0
    )
    assert b.dtype == a.dtype == torch.float32 and zeros == 0


# --- bad input ---------------------------------------------------------------------------


def test_bad_merge_arguments_are_explained():
    expert = LoraAdapter({"w": _module(4, 5, 2, 1.0)}, source="exp")
    anti = LoraAdapter({"w": _module(4, 5, 2, 1.0)}, source="anti")
    with pytest.raises(ValueError, match="unknown method 'mix'"):
        merge_adapters(expert, anti, 1.0, "mix")
    with pytest.raises(ValueError, match="2 λ values for 3 anti-experts"):
        merge_adapters(expert, [anti, anti, anti], [1.0, 2.0])
    with pytest.raises(ValueError, match="λ must be a finite number"):
        merge_adapters(expert, anti, float("nan"))
    with pytest.raises(ValueError, match="at least one anti-expert"):
        merge_adapters(expert, [], 1.0)


def test_shape_mismatch_names_the_module_and_both_shapes():
    expert = LoraAdapter({"layers.0.q": _module(4, 5, 2, 1.0)}, source="exp")
    anti = LoraAdapter({"layers.0.q": _module(4, 6, 2, 1.0)}, source="anti")
    with pytest.raises(ValueError, match=r"layers\.0\.q.*\(4, 5\).*anti.*\(4, 6\).*different base models"):
        merge_adapters(expert, anti, 1.0)


def test_different_base_models_are_refused_unless_allowed():
    expert = LoraAdapter({"w": _module(4, 5, 2, 1.0)}, source="exp", base_model_name_or_path="org/llama-7b")
    anti = LoraAdapter({"w": _module(4, 5, 2, 1.0)}, source="anti", base_model_name_or_path="org/mistral-7b")
    with pytest.raises(ValueError, match=r"anti was trained on base model 'org/mistral-7b'.*'org/llama-7b'"):
        merge_adapters(expert, anti, 1.0)
    assert merge_adapters(expert, anti, 1.0, any_base_model=True).base_model_name_or_path == "org/llama-7b"


def test_lora_module_validates_its_factors():
    with pytest.raises(ValueError, match="do not chain"):
        LoraModule(torch.zeros(3, 5), torch.zeros(4, 2), 1.0)
    with pytest.raises(TypeError, match="floating point"):
        LoraModule(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(4, 2), 1.0)


def test_non_lora_tensors_are_copied_from_the_expert_with_a_warning():
    head = torch.randn(3, 4)
    expert = LoraAdapter({"w": _module(4, 5, 2, 1.0)}, source="exp", extra={"base_model.model.score.weight": head})
    anti = LoraAdapter({"w": _module(4, 5, 2, 1.0)}, source="anti", extra={"base_model.model.score.weight": -head})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_adapters(expert, anti, 1.0)
    messages = " ".join(str(w.message) for w in caught)
    assert "copied to the result unchanged" in messages and "anti" in messages and "ignored" in messages
    assert merged.extra["base_model.model.score.weight"] is head
    assert merged.report.extra_copied == ["base_model.model.score.weight"]
