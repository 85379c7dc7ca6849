"""Module names against an adapter config's patterns: PEFT's results, in bounded time."""

import itertools
import time

import pytest

from extsub_kernels.adapters import patterns
from extsub_kernels.adapters.patterns import PatternMatcher, pattern_key, selects
from extsub_kernels.errors import AdapterError

from helpers import lazy_module

peft = lazy_module("peft")


def get_pattern_key(keys, module):
    """PEFT's own rule for which pattern key a module takes (imported on first use)."""
    return pytest.importorskip("peft.utils.other").get_pattern_key(keys, module)


def check_target_module_exists(config, module):
    """PEFT's own rule for whether a module is targeted (imported on first use)."""
    return pytest.importorskip("peft.tuners.tuners_utils").check_target_module_exists(config, module)


MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.12.mlp.down_proj",
    "model.layers.3.self_attn.v_proj",
    "model.embed_tokens",
    "lm_head",
    "transformer.h.0.attn.c_attn",
    "transformer.h.2.mlp.c_fc",
    "model.layers.1.block_sparse_moe.experts.0.w1",
]

KEYS = ["q_proj", "layers.1.*q_proj", r"model\.layers\.12\.mlp\.down_proj", "proj", "c_.*", "^lm_head", "w1|w2", ".*"]


@pytest.mark.parametrize("module", MODULES)
def test_pattern_keys_match_as_peft_matches_them(module):
    for keys in itertools.permutations(KEYS[:4], 2):
        expected = get_pattern_key(keys, module)
        assert pattern_key(dict.fromkeys(keys, 1), module) == (expected if expected in keys else None), keys
    for key in KEYS:
        expected = get_pattern_key([key], module)
        assert pattern_key({key: 1}, module) == (key if expected == key else None), key


CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["model.embed_tokens", "c_attn"]),
    dict(target_modules=r".*\.(q_proj|down_proj)"),
    dict(target_modules=".*proj", exclude_modules=["v_proj"]),
    dict(target_modules=["q_proj", "down_proj"], exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["q_proj", "down_proj", "c_fc"], layers_to_transform=[1, 2]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=12, layers_pattern="layers"),
    dict(target_modules=["q_proj", "c_attn", "w1"], layers_to_transform=[0], layers_pattern=["h", "experts"]),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_target_modules_select_what_peft_selects(fields):
    config = peft.LoraConfig(**fields)
    for module in MODULES:
        expected = check_target_module_exists(config, module)
        expected = bool(expected) and not isinstance(expected, peft.tuners.tuners_utils._ExcludedModule)
        assert selects(fields, module, PatternMatcher("config")) == expected, module


def test_no_target_modules_or_all_linear_select_every_module():
    for fields in ({}, {"target_modules": None}, {"target_modules": "all-linear"}):
        assert all(selects(fields, m, PatternMatcher("config")) for m in MODULES)


@pytest.mark.parametrize("key", [r"([a-z_.0-9]+)+!", r"(.*)*!", r"(x+x+)+y"])
def test_patterns_that_hang_pythons_re_are_matched_at_once(key):
    started = time.monotonic()
    assert pattern_key({key: 4}, "base_model.model.model.layers.0.self_attn.q_proj" * 3) is None
    assert time.monotonic() - started < 1.0


def test_a_pattern_past_the_budget_is_refused_with_its_name(monkeypatch):
    monkeypatch.setattr(patterns, "PATTERN_BUDGET_S", 0.05)
    slow = r"(?:.{1,3}){1,40}[!?]"  # backtracks exponentially in the regex engine too
    started = time.monotonic()
    with pytest.raises(AdapterError, match=r"cfg.json: matching module names against rank_pattern key .*\{1,40\}.* "):
        pattern_key({slow: 4}, "model.layers.0.self_attn.q_proj", PatternMatcher("cfg.json"), "rank_pattern key")
    assert time.monotonic() - started < 10


def test_an_invalid_pattern_is_refused_with_its_field():
    with pytest.raises(AdapterError, match=r"cfg.json: target_modules '\(q_proj' is not a valid regular expression"):
        selects({"target_modules": "(q_proj"}, "q_proj", PatternMatcher("cfg.json"))


def test_ia3_feedforward_modules_are_matched_within_the_budget_too(monkeypatch):
    from extsub_kernels.adapters.ia3 import is_feedforward_module

    monkeypatch.setattr(patterns, "PATTERN_BUDGET_S", 0.05)
    assert is_feedforward_module(r"([a-z_.0-9]+)+!", "model.layers.0.mlp.down_proj" * 3) is False
    with pytest.raises(AdapterError, match=r"ia3.json: matching module names against feedforward_modules"):
        is_feedforward_module(r"(?:.{1,3}){1,40}[!?]", "model.layers.0.mlp.down_proj", PatternMatcher("ia3.json"))
