"""adapter_config.json read as PEFT reads it, or refused with PEFT's reason: a seeded differential test (issue 23).

Each case is a config and the weights it describes, written to a folder. PEFT's own config classes
(`PeftConfig.from_peft_type`, the loader's path) and its module rules (`check_target_module_exists`,
`get_pattern_key`, IA3's feedforward rule) say what PEFT does with it; `load_adapter` must then load
the same modules with the same rank and scaling (LoRA) or the same vectors and feedforward kinds
((IA)³), or refuse with an AdapterError that gives PEFT's reason.
"""

import copy
import dataclasses
import json
import math
import random
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from extsub_kernels.adapters import load_adapter
from extsub_kernels.errors import AdapterError

from helpers import lazy_module

peft = lazy_module("peft")

SEED = 2323
# (out, in) of each module's weight in a tiny two-layer model.
SHAPES = {"self_attn.q_proj": (8, 8), "self_attn.v_proj": (4, 8), "mlp.down_proj": (8, 12)}
MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in SHAPES]
# Fields PEFT reads as a different model around the adapter: not a LoRA on the modules its keys name.
CHANGES_THE_MODEL = {"layer_replication": [[0, 2]], "trainable_token_indices": [1, 2]}
# PEFT LoRA variants whose forward is still x·(s·B·A)ᵀ (VeLoRA changes only the backward pass).
SAME_FORWARD = {"velora_config"}


def _shape(module: str) -> tuple[int, int]:
    return SHAPES[module.split(".", 3)[3]]


def _lora_variants() -> list[str]:
    """The fields PEFT's LoraConfig marks as LoRA variants (other update rules than s·B·A)."""
    fields = dataclasses.fields(peft.LoraConfig)
    return [f.name for f in fields if f.metadata.get("is_lora_variant") and f.name not in SAME_FORWARD]


def _variant_value(name: str) -> object:
    """A value that turns the variant on, as PEFT's save_pretrained writes it (a sub-config is a dict)."""
    return [1] if name == "alora_invocation_tokens" else {} if name in ("use_bdlora",) or "config" in name else True


def _peft_config(config: dict) -> tuple[object | None, str | None]:
    """PEFT's config object for `config`, or None and PEFT's reason for refusing it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.PeftConfig.from_peft_type(**copy.deepcopy(config)), None
    except (ValueError, TypeError) as e:
        return None, str(e)


def _peft_targets(cfg: object) -> list[str]:
    from peft.tuners.tuners_utils import check_target_module_exists

    return [m for m in MODULES if check_target_module_exists(cfg, m)]


def _lora_config(rng: random.Random) -> dict:
    config = {"peft_type": "LORA", "r": rng.choice([2, 4]), "lora_alpha": rng.choice([4, 8, 6.5])}
    config["target_modules"] = rng.choice(
        [
            ["q_proj", "v_proj"],
            ["q_proj", "down_proj", "v_proj"],
            r"model\.layers\.\d+\.self_attn\..*",
            ["model.layers.1.mlp.down_proj", "v_proj"],
        ]
    )
    if isinstance(config["target_modules"], list) and rng.random() < 0.4:
        config["layers_to_transform"] = rng.choice([[0], 1, [0, 1]])
        if rng.random() < 0.5:
            config["layers_pattern"] = rng.choice(["layers", ["blocks", "layers"]])
    elif rng.random() < 0.15:  # PEFT refuses layer options with a target_modules regular expression
        name, value = rng.choice([("layers_to_transform", [0]), ("layers_pattern", "layers")])
        config[name] = value
    if rng.random() < 0.1:  # PEFT refuses layers_pattern without layers_to_transform
        config.pop("layers_to_transform", None)
        config["layers_pattern"] = "layers"
    for name, values in (
        ("exclude_modules", [["v_proj"], r".*layers\.0\..*"]),
        ("modules_to_save", [["down_proj"]]),
        ("rank_pattern", [{"v_proj": 3}, {r"^model\.layers\.1\.self_attn\.q_proj": 1}]),
        ("alpha_pattern", [{"down_proj": 3}, {"q_proj": 16}]),
        ("use_rslora", [True, False]),
    ):
        if rng.random() < 0.3:
            config[name] = rng.choice(values)
    if rng.random() < 0.25:
        name = rng.choice([*_lora_variants(), *CHANGES_THE_MODEL])
        config[name] = CHANGES_THE_MODEL.get(name, _variant_value(name))
    return config


def _ia3_config(rng: random.Random) -> dict:
    config = {"peft_type": "IA3"}
    config["target_modules"] = rng.choice(
        [
            ["q_proj", "v_proj", "down_proj"],
            ["q_proj", "down_proj"],
            ["q_proj", "v_proj"],
            r"model\.layers\.\d+\..*_proj",
            ["model.layers.0.self_attn.q_proj", "down_proj"],
        ]
    )
    config["feedforward_modules"] = rng.choice([["down_proj"], [], r"model\.layers\.\d+\.mlp\.down_proj"])
    if rng.random() < 0.3:
        config["exclude_modules"] = rng.choice([["v_proj"], r".*layers\.1\..*"])
    return config


def _write(folder, config: dict, tensors: dict) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _refused(folder, *words: str) -> None:
    """load_adapter refuses the folder, naming every word (PEFT's reason: the fields it names)."""
    with pytest.raises(AdapterError) as caught:
        load_adapter(folder)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in: {caught.value}"


def _peft_reason_words(reason: str) -> list[str]:
    """The fields PEFT's message names (`layers_pattern`, ...): what a refusal must name too."""
    return re.findall(r"`(\w+)`", reason) or [reason]


def _check_lora(folder, config: dict, rng: random.Random) -> None:
    cfg, reason = _peft_config(config)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    if cfg is None:
        weights = {m: config["r"] for m in MODULES[:1]}
    else:
        targets = _peft_targets(cfg)
        extra = [m for m in MODULES if m not in targets]
        chosen = targets + ([rng.choice(extra)] if extra and rng.random() < 0.3 else [])
        weights = {}
        for m in chosen or MODULES[:1]:
            key = peft.utils.other.get_pattern_key(cfg.rank_pattern.keys(), m)
            weights[m] = cfg.rank_pattern.get(key, cfg.r)
    tensors = {}
    for module, r in weights.items():
        out, inp = _shape(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, inp, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, r, generator=generator)
    _write(folder, config, tensors)
    if cfg is None:
        return _refused(folder, *_peft_reason_words(reason))
    changed = [n for n in [*_lora_variants(), *CHANGES_THE_MODEL] if getattr(cfg, n, None) not in (None, False)]
    if changed:
        return _refused(folder, changed[0], "not supported")
    if set(weights) - set(targets):
        return _refused(folder, "does not select it", "PEFT puts no LoRA layer there")
    adapter = load_adapter(folder)
    assert sorted(adapter.modules) == sorted(targets)
    for module in targets:
        r = cfg.rank_pattern.get(peft.utils.other.get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
        alpha = cfg.alpha_pattern.get(
            peft.utils.other.get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha
        )
        scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r  # peft.tuners.lora.layer.update_layer
        assert adapter.modules[module].rank == r, module
        assert adapter.modules[module].scaling == pytest.approx(scaling, rel=1e-15), module


def _check_ia3(folder, config: dict, rng: random.Random) -> None:
    from peft.tuners.ia3 import IA3Model

    cfg, reason = _peft_config(config)
    targets = _peft_targets(cfg) if cfg is not None else MODULES[:1]
    extra = [m for m in MODULES if m not in targets]
    chosen = targets + ([rng.choice(extra)] if extra and rng.random() < 0.3 else [])
    ff = {m: cfg is not None and IA3Model._check_target_module_feedforward(cfg, m) for m in chosen}
    tensors = {}
    for module in chosen or MODULES[:1]:
        out, inp = _shape(module)
        tensors[f"base_model.model.{module}.ia3_l"] = 1 + torch.rand((1, inp) if ff.get(module) else (out, 1))
    _write(folder, config, tensors)
    if cfg is None:
        return _refused(folder, *_peft_reason_words(reason))
    if set(chosen) - set(targets) or not chosen:
        return _refused(folder, *(["PEFT puts no (IA)³ layer there"] if chosen else []))
    adapter = load_adapter(folder)
    assert sorted(adapter.vectors) == sorted(targets)
    assert adapter.feedforward == {m for m in targets if ff[m]}


@pytest.mark.parametrize("case", range(80))
def test_lora_configs_are_read_as_peft_reads_them(tmp_path, case):
    rng = random.Random(SEED * 1000 + case)
    _check_lora(tmp_path / "adapter", _lora_config(rng), rng)


@pytest.mark.parametrize("case", range(40))
def test_ia3_configs_are_read_as_peft_reads_them(tmp_path, case):
    rng = random.Random(SEED * 2000 + case)
    _check_ia3(tmp_path / "adapter", _ia3_config(rng), rng)


@pytest.mark.parametrize("field", ["use_bdlora", "kasa_config", "arrow_config", "monteclora_config"])
def test_lora_variants_peft_knows_are_refused(tmp_path, field):
    """PEFT reads these as other update rules than s·B·A; they were merged as plain LoRA."""
    assert field in _lora_variants()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], field: _variant_value(field)}
    _check_lora(tmp_path / "adapter", config, random.Random(SEED))


@pytest.mark.parametrize("field", sorted(CHANGES_THE_MODEL))
def test_configs_that_change_the_model_around_the_lora_are_refused(tmp_path, field):
    """layer_replication (module names of repeated layers) and trainable tokens (embeddings trained beside it)."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    _check_lora(tmp_path / "adapter", {**config, field: CHANGES_THE_MODEL[field]}, random.Random(SEED))


def test_ia3_feedforward_modules_outside_target_modules_are_refused_as_peft_does(tmp_path):
    config = {"peft_type": "IA3", "target_modules": ["q_proj", "v_proj"], "feedforward_modules": ["down_proj"]}
    _check_ia3(tmp_path / "adapter", config, random.Random(SEED))


def test_ia3_vectors_on_modules_the_config_does_not_select_are_refused(tmp_path):
    """PEFT puts no (IA)³ layer on a module target_modules does not select, so it ignores that vector."""
    module = "model.layers.0.self_attn.v_proj"
    tensors = {f"base_model.model.{module}.ia3_l": torch.full((4, 1), 1.5)}
    _write(tmp_path / "a", {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}, tensors)
    _refused(tmp_path / "a", module, "PEFT puts no (IA)³ layer there")
