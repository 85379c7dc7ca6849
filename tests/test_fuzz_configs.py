"""A seeded fuzz suite of crafted adapter configs and option strings, each held to the command line's contract.

Every case runs `extsub-merge` and must end in one of two ways: exit 0 with a correct output,
or exit 2 with one line `extsub-merge: error: ...` naming the file (for a bad config) or the
option; never exit 1, a traceback or a hang. Either way nothing is left behind but the output,
the inputs are byte-identical, and the case stays within a time and memory budget.

"Correct" is judged by PEFT itself: the expert's and the anti-expert's ΔW per module are what
PEFT's own LoRA layers compute from the (fuzzed) configs, the expected result is Algorithm 1 in
float64 on those, and the output adapter is loaded back by PEFT. Cases are generated from fixed
seeds (case i uses seed SEED + i), so a failure reproduces from its id.
"""

import copy
import json
import math
import random
import re
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from extsub_kernels import ext_sub, ext_sub_reference
from extsub_kernels.adapters import patterns
from extsub_kernels.cli import main
from extsub_kernels.engine.memory import peak_rss_bytes

from checkpoints import hashes, leftovers, save
from helpers import lazy_module

peft = lazy_module("peft")

SEED = 20261125
CONFIG_CASES = 200
OPTION_CASES = 150
CASE_SECONDS = 30  # a hang guard, far above what a case takes
PEAK_RSS_BYTES = 4 << 30

IN, OUT, RANK = 6, 8, 2
MODULES = ["m.0.q", "m.0.v", "m.1.q"]


class Tiny(nn.Module):
    """A model with Linear layers named m.0.q, m.0.v, m.1.q, m.1.v (PEFT wraps any nn.Module)."""

    def __init__(self):
        super().__init__()
        self.m = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(IN, OUT), "v": nn.Linear(IN, OUT)}) for _ in range(2))


VALID_CONFIG = {
    "peft_type": "LORA",
    "r": RANK,
    "lora_alpha": 4,
    "use_rslora": False,
    "target_modules": ["q", "v"],
    "fan_in_fan_out": False,
    "bias": "none",
    "task_type": None,
    "base_model_name_or_path": "tiny",
    "init_lora_weights": True,
    "inference_mode": True,
}

# Values a field may be given: the wrong type, out of range, hostile strings and patterns, or sound ones.
HOSTILE = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    4,
    2**64,
    -(2**63),
    1e308,
    1e-308,
    float("nan"),
    float("inf"),
    -0.0,
    0.5,
    "",
    "LORA",
    "lora",
    "IA3",
    "ADALORA",
    "all-linear",
    "q",
    "v",
    ".*",
    "m\\.0\\..*",
    "(",
    "[",
    "\ud800",
    "x" * 5000,
    [],
    ["q"],
    ["v"],
    ["q", "v"],
    ["q", 5],
    [["q"]],
    [0],
    [1],
    [0, 1],
    {},
    {"q": 2},
    {"v": 1},
    {"(": 1},
    {"([a-z_.0-9]+)+!": 2},
    {"(.*)*!": 3},
    {"q": "2"},
    {"q": -1},
    {"q": 1e308},
    {"m\\.0\\.q": 4},
    {"a": {"b": {"c": [[[[1]]]]}}},
]
FIELDS = [
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "task_type",
    "base_model_name_or_path",
    "bias",
    "use_dora",
    "lora_bias",
    "inference_mode",
    "target_parameters",
    "use_qalora",
]
# Values PEFT and the merge both take, each changing what ΔW is (scaling, patterns) or which modules count.
SOUND = {
    "r": [RANK],
    "lora_alpha": [1, 2.5, 16, 0, -3, 1e30],
    "use_rslora": [True, False],
    "target_modules": [["q", "v"], ["m.0.q", "m.0.v", "m.1.q"], r"m\.\d\.(q|v)", "all-linear", ["q", "v", "k"]],
    "exclude_modules": [None, ["m.1.v"], r"m\.1\.v"],
    "rank_pattern": [{}, {"q": RANK}, {r"m\.0\..": RANK}, {"([a-z_.0-9]+)+!": 7}],
    "alpha_pattern": [{}, {"v": 1.5}, {r"m\.1\.q": 7}, {"q": 0.25, "m.0.q": 9}, {"(.*)*!": 3}],
    "layers_to_transform": [None, [0, 1], 0],
    "layers_pattern": [None, "m"],
    "modules_to_save": [None, ["lm_head"]],
    "fan_in_fan_out": [False],
    "task_type": [None, "CAUSAL_LM"],
    "bias": ["none"],
}
WHOLE_FILE = [
    "[]",
    "5",
    '"LORA"',
    "null",
    "{",
    "",
    "\x00\x01",
    '{"peft_type": "LORA", "r": 2, "r": 3}',
    "[" * 100_000,
    '{"peft_type": "LORA", "r": ' + "9" * 5000 + ', "lora_alpha": 8}',
]


def _adapter(folder, seed: int, config: dict | str, modules=MODULES):
    """An adapter folder with random factors for `modules` and `config` (a dict, or raw text) as its config."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, IN, generator=g)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(OUT, RANK, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    return folder


def _fuzzed_config(rng: random.Random) -> dict | str:
    if rng.random() < 0.04:
        return rng.choice(WHOLE_FILE)
    config = copy.deepcopy(VALID_CONFIG)
    for _ in range(rng.choice([1, 2, 3, 4])):
        field = rng.choice(FIELDS)
        roll = rng.random()
        if roll < 0.1:
            config.pop(field, None)
        elif roll < 0.7 and field in SOUND:
            config[field] = copy.deepcopy(rng.choice(SOUND[field]))
        else:
            config[field] = copy.deepcopy(rng.choice(HOSTILE))
    return config


def _run(argv) -> tuple[int, str]:
    """`extsub-merge argv` in this process: (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _assert_contract(code: int, err: str, started: float, names: list[str]) -> None:
    """Exit 0, or exit 2 with one line naming one of `names`; in time and memory either way."""
    assert time.monotonic() - started < CASE_SECONDS, "the case took longer than its budget"
    assert (peak_rss_bytes() or 0) < PEAK_RSS_BYTES
    assert "Traceback" not in err, err
    assert code in (0, 2), f"exit {code}: {err}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("extsub-merge: error: "), err
        assert any(n in lines[0] for n in names), f"none of {names} named in {lines[0]!r}"


# ------------------------------------------------------------------------------ crafted configs


def _peft_deltas(folder) -> dict[str, torch.Tensor] | None:
    """ΔW per module as PEFT computes it for the adapter in `folder` (float64); None when PEFT cannot load it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(Tiny(), str(folder))
    except Exception:  # however PEFT refuses it
        return None
    return {
        name: layer.get_delta_weight("default").double()
        for name, layer in model.base_model.model.named_modules()
        if isinstance(layer, peft.tuners.lora.LoraLayer) and "default" in layer.lora_A
    }


@pytest.fixture(scope="module")
def anti_adapter(tmp_path_factory):
    return _adapter(tmp_path_factory.mktemp("anti") / "anti", SEED - 1, dict(VALID_CONFIG, lora_alpha=3))


@pytest.mark.parametrize("case", range(CONFIG_CASES))
def test_a_crafted_config_is_merged_correctly_or_refused_naming_its_file(case, tmp_path, anti_adapter, monkeypatch):
    monkeypatch.setattr(patterns, "PATTERN_BUDGET_S", 0.2)
    rng = random.Random(SEED + case)
    config = _fuzzed_config(rng)
    expert = _adapter(tmp_path / "in" / "expert", SEED + case, config)
    lam = rng.choice([0.5, 1.0, 2.0])
    before = hashes(expert) | {f"anti/{k}": v for k, v in hashes(anti_adapter).items()}
    out = tmp_path / "out" / "merged"
    started = time.monotonic()
    code, err = _run([expert, anti_adapter, "-o", out, "--lam", lam, "-q"])
    _assert_contract(code, err, started, [str(expert / "adapter_config.json"), str(expert)])
    assert hashes(expert) | {f"anti/{k}": v for k, v in hashes(anti_adapter).items()} == before
    assert not leftovers(tmp_path)
    if code != 0:
        assert not out.exists() and not (tmp_path / "out").exists()
        return
    plus, minus = _peft_deltas(expert), _peft_deltas(anti_adapter)
    assert minus is not None
    if plus is None:  # accepted, but PEFT cannot build it on this model (a module type the config targets, ...)
        assert load_file(out / "adapter_model.safetensors")
        return
    merged = _peft_deltas(out)
    assert merged is not None, "PEFT loads what was written"
    zero = torch.zeros(OUT, IN, dtype=torch.float64)
    for name in sorted(set(plus) | set(minus) | set(merged)):
        p, m = plus.get(name, zero), minus.get(name, zero)
        expected = ext_sub_reference(p, m, lam, dtype=torch.float64)
        # relative to the inputs' size: an output of 0 (|p| = 0) is exact, the float64 oracle off by an ulp
        scale = max(float(expected.abs().max()), float(p.abs().max()), lam * float(m.abs().max()), 1e-30)
        error = float((merged.get(name, zero) - expected).abs().max()) / scale
        assert error < 1e-5, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("text", WHOLE_FILE, ids=[repr(t[:24]) for t in WHOLE_FILE])
def test_a_config_file_that_is_no_valid_config_is_refused_naming_it(text, tmp_path, anti_adapter):
    expert = _adapter(tmp_path / "in" / "expert", SEED, text)
    started = time.monotonic()
    code, err = _run([expert, anti_adapter, "-o", tmp_path / "out" / "merged", "-q"])
    _assert_contract(code, err, started, [str(expert / "adapter_config.json")])
    assert code == 2 and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_the_generator_varies_every_field_and_the_whole_file():
    configs = [_fuzzed_config(random.Random(SEED + case)) for case in range(CONFIG_CASES)]
    varied = {f for c in configs if isinstance(c, dict) for f in FIELDS if c.get(f) != VALID_CONFIG.get(f)}
    assert set(FIELDS) <= varied and any(isinstance(c, str) for c in configs)


# ------------------------------------------------------------------------------ option strings


LAM_PARTS = [
    "1",
    "0.5",
    "-2",
    "0",
    "-0",
    "1e308",
    "3.4e38",
    "1e-300",
    "nan",
    "inf",
    "-inf",
    "x",
    "",
    " ",
    "1_0",
    "0x10",
    "١",
    "1e",
    ".5",
    "5.",
    "+1",
    "１",
]
SIZES = ["5GB", "1KB", "100", "0", "-5MB", "inf", "1e400GB", "nan", "5XB", "", "1.5MiB", "  2kb ", "12"]
FLAGS = [
    ["--dtype", "float16"],
    ["--dtype", "bfloat16"],
    ["--dtype", "float64"],
    ["--method", "sub"],
    ["--method", "nope"],
    ["--on-missing", "copy"],
    ["--device", "cpu"],
    ["--device", "gpu"],
    ["--device", "cuda:7"],
    ["--format", "lora"],
    ["--max-rank", "2"],
    ["--lora-alpha", "8"],
    ["--force"],
    [],
]


def _lam_string(rng: random.Random) -> str:
    items = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        parts = [rng.choice(LAM_PARTS) for _ in range(rng.choice([1, 1, 2]))]
        items.append(":".join(parts))
    return ",".join(items)


@pytest.fixture(scope="module")
def dense_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    g = torch.Generator().manual_seed(SEED)
    shapes = {"a.weight": (6, 5), "b.bias": (5,), "c.weight": (300, 40), "ids": None}
    expert, anti = {}, {}
    for name, shape in shapes.items():
        expert[name] = torch.arange(4) if shape is None else torch.randn(shape, generator=g)
        anti[name] = torch.arange(4) if shape is None else torch.randn(shape, generator=g)
    return save(folder / "e.safetensors", expert), save(folder / "a.safetensors", anti), expert, anti


@pytest.mark.parametrize("case", range(OPTION_CASES))
def test_option_strings_merge_correctly_or_are_refused_naming_the_option(case, tmp_path, dense_pair):
    e, a, expert, anti = dense_pair
    rng = random.Random(SEED + 10_000 + case)
    lam = _lam_string(rng)
    size = rng.choice(SIZES)
    flags = rng.choice(FLAGS)
    out = tmp_path / "out" / "merged"
    argv = [e, a, "-o", out, "--lam", lam, "--max-shard-size", size, *flags, "-q"]
    before = hashes(e.parent)
    started = time.monotonic()
    try:
        code, err = _run(argv)
    except SystemExit as exit_info:  # argparse refuses a choice outside the vocabulary: exit 2, its usage
        code, err = exit_info.code, ""
        assert code == 2
    else:
        named = [lam, size, *flags, "λ", "size", "dtype", "device", "method", "LoRA adapter", "--format", "--max-rank"]
        _assert_contract(code, err, started, [n for n in named if n])
    assert hashes(e.parent) == before and not leftovers(tmp_path)
    if code != 0:
        assert not (tmp_path / "out").exists()
        return
    _check_dense_outputs(out, lam, flags, expert, anti)


def _check_dense_outputs(out, lam: str, flags: list, expert: dict, anti: dict) -> None:
    values = [float(part.split(":")[0]) for part in lam.split(",")]
    paths = [out] if len(values) == 1 else sorted(out.parent.glob("merged-lam*"))
    assert len(paths) == len(values)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(flags[1] if flags[:1] == ["--dtype"] else "")
    method = flags[1] if flags[:1] == ["--method"] else "ext-sub"
    by_label = {re.sub(r".*-lam", "", p.name): p for p in paths}
    for value in values:
        path = paths[0] if len(paths) == 1 else by_label[_label(value)]
        got = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
        for name, p in expert.items():
            if not p.is_floating_point():
                assert torch.equal(got[name], p)
                continue
            if method == "sub":
                expected = p.double() - value * anti[name].double()
            else:
                expected = ext_sub(p.double(), anti[name].double(), value)
            expected = expected.to(dtype or p.dtype)
            assert got[name].dtype == expected.dtype
            close = torch.allclose(got[name].double(), expected.double(), rtol=1e-2, atol=1e-5 * (1 + abs(value)))
            assert close or not math.isfinite(float(expected.double().abs().max())), name


def _label(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
