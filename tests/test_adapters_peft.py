"""PEFT adapters on disk, end to end against the real client (peft + transformers, tiny models, CPU).

Adapters are made by PEFT itself (`init_lora_weights=False`, so B ≠ 0); the expected ΔW of
each input comes from PEFT's own `get_delta_weight`, never from our reader. Every output
format is loaded back (`PeftModel.from_pretrained`, or added to the base weights for
`delta`) and its logits compared with the base model whose weights received ΔW' from the
dense op.
"""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from extsub_kernels import AdapterOptions, LoraScaling, merge
from extsub_kernels.adapters import merge_adapters
from extsub_kernels.adapters.formats import to_peft, write_adapter, write_tensors
from extsub_kernels.adapters.lora import exact_pattern, module_scaling, parse_peft_key
from extsub_kernels.adapters.patterns import pattern_key
from extsub_kernels.adapters.peft import load_adapter
from extsub_kernels.errors import AdapterError, InputError

from helpers import assert_close_explained, copy_adapter, lazy_module
from peft_fixtures import (
    EPS32,
    LLAMA_ADAPTERS,
    SEED,
    check_logits,
    expected_deltas,
    make_adapters,
    peft_model,
    tiny_llama,
    with_deltas,
)

peft = lazy_module("peft")
transformers = lazy_module("transformers")


def _merge(expert, antis, out, lam=1.0, method="ext-sub", *, force=False, **adapter_options):
    """`merge` of adapters with AdapterOptions; returns the adapter report of the (one) output."""
    report = merge(expert, antis, out, lam=lam, method=method, force=force, adapter=AdapterOptions(**adapter_options))
    return report.adapter.reports[0]


# --- reading: scaling and ranks as PEFT sees them ---------------------------------------


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_scaling_and_rank_agree_with_peft(model_name, request):
    base, paths = request.getfixturevalue(model_name)
    for path in paths.values():
        adapter = load_adapter(path)
        layers = {
            name: layer
            for name, layer in peft_model(base, path).base_model.model.named_modules()
            if isinstance(layer, peft.tuners.lora.LoraLayer) and "default" in layer.lora_A
        }
        assert set(adapter.modules) == set(layers)
        for name, module in adapter.modules.items():
            assert module.rank == layers[name].r["default"], name
            assert module.scaling == pytest.approx(layers[name].scaling["default"], rel=1e-15), name
            assert torch.equal(module.lora_A, layers[name].lora_A["default"].weight), name


def test_pattern_matching_follows_peft():
    assert pattern_key({"down_proj": 6}, "model.layers.0.mlp.down_proj") == "down_proj"
    assert pattern_key({"proj": 6}, "model.layers.0.mlp.down_proj") is None  # whole dotted segments only
    assert pattern_key({"layers.1.*q_proj": 2, "q_proj": 3}, "model.layers.1.self_attn.q_proj") == "layers.1.*q_proj"
    assert pattern_key({exact_pattern("model.layers.1.mlp.up_proj"): 2}, "x.model.layers.1.mlp.up_proj") is None
    config = {"r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"q": 4}, "alpha_pattern": {"q": 2}}
    assert module_scaling(config, "layers.0.q", 4) == 2 / 2.0


def test_key_formats():
    assert parse_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == (
        "model.layers.0.self_attn.q_proj",
        "A",
        None,
    )
    assert parse_peft_key("model.layers.0.self_attn.q_proj.lora_B.default.weight") == (
        "model.layers.0.self_attn.q_proj",
        "B",
        "default",
    )
    assert parse_peft_key("base_model.model.lm_head.weight") is None


def test_adapter_name_segments_and_missing_prefix_read_the_same(llama, tmp_path):
    _, paths = llama
    original = load_file(os.path.join(paths["expert"], "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.", "").replace(".weight", ".default.weight"): v for k, v in original.items()}
    folder = tmp_path / "renamed"
    folder.mkdir()
    save_file(renamed, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(Path(paths["expert"], "adapter_config.json").read_text())
    a, b = load_adapter(paths["expert"]), load_adapter(folder)
    assert set(a.modules) == set(b.modules)
    for name in a.modules:
        assert torch.equal(a.modules[name].lora_B, b.modules[name].lora_B)
        assert a.modules[name].scaling == b.modules[name].scaling


def test_bare_file_with_sibling_config_or_explicit_scaling(llama, tmp_path):
    _, paths = llama
    weights = os.path.join(paths["anti2"], "adapter_model.safetensors")
    from_folder = load_adapter(paths["anti2"])
    beside = load_adapter(weights)  # adapter_config.json is beside it
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(Path(weights).read_bytes())
    explicit = load_adapter(bare, scaling=LoraScaling(4, r=2))
    inferred = load_adapter(bare, scaling=LoraScaling(4))  # ranks from the shapes
    for other in (beside, explicit, inferred):
        assert {n: m.scaling for n, m in other.modules.items()} == {
            n: m.scaling for n, m in from_folder.modules.items()
        }


# --- merging, every format, loaded by the real client ----------------------------------


FORMATS = ["lora", "dense-lora", "delta"]
METHODS = ["ext-sub", "sub", "add"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_every_format_loads_and_applies_the_dense_result(model_name, method, request, tmp_path):
    base, paths = request.getfixturevalue(model_name)
    transposed = model_name == "gpt2"  # Conv1D stores (in, out)
    lam = 0.7
    expected = expected_deltas(base, paths["expert"], [paths["anti"]], [lam], method)
    expected_model = with_deltas(base, expected, transposed)
    for output_format in FORMATS:
        out = tmp_path / (f"{output_format}.safetensors" if output_format == "delta" else output_format)
        report = _merge(paths["expert"], paths["anti"], out, lam, method, output_format=output_format)
        what = f"{model_name} {method} {output_format}"
        if output_format == "delta":
            deltas = load_file(str(out))
            state = base.state_dict()
            assert set(deltas) == {f"{name}.weight" for name in expected}, what
            for key, delta in deltas.items():
                assert delta.shape == state[key].shape, f"{what}: {key} is not laid out like the base weight"
            got = {key[: -len(".weight")]: (d.T if transposed else d) for key, d in deltas.items()}
            model = with_deltas(base, got, transposed)
        else:
            model = peft_model(base, out)
            if output_format == "lora":
                got = {name: m.delta(torch.float64) for name, m in load_adapter(out).modules.items()}
            else:
                tensors = load_file(str(out / "adapter_model.safetensors"))
                got = {parse_peft_key(k)[0]: v for k, v in tensors.items() if parse_peft_key(k)[1] == "B"}
                for name, a in tensors.items():
                    if parse_peft_key(name)[1] == "A":
                        assert torch.equal(a, torch.eye(a.shape[0])), what
        for name, delta in got.items():
            # float32 output of a float64 computation: one rounding, plus float32 products.
            assert_close_explained(delta, expected[name], 0.0, 64 * EPS32, f"{what} {name}")
        check_logits(model, expected_model, what)
        assert (method == "ext-sub") == bool(report.dropped)  # the anti-only modules


def test_lora_output_is_exact_low_rank_with_patterns(llama, tmp_path):
    base, paths = llama
    _merge(paths["expert"], [paths["anti"], paths["anti2"]], tmp_path / "out", [[0.5, 1.5]])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["base_model_name_or_path"] is None
    merged = load_adapter(tmp_path / "out")
    expert, anti, anti2 = (load_adapter(paths[k]) for k in ("expert", "anti", "anti2"))
    for name, module in merged.modules.items():
        rank = expert.modules[name].rank + sum(a.modules[name].rank for a in (anti, anti2) if name in a.modules)
        assert module.rank == rank, name
    assert set(merged.modules) == set(expert.modules)  # anti-only modules vanish under ext-sub
    expected = expected_deltas(base, paths["expert"], [paths["anti"], paths["anti2"]], [0.5, 1.5], "ext-sub")
    check_logits(peft_model(base, tmp_path / "out"), with_deltas(base, expected, False), "two anti-experts")


def test_copied_modules_keep_their_bytes_and_scaling(gpt2, tmp_path):
    base, paths = gpt2
    # GPT-2's expert uses rsLoRA; c_fc is only in the expert, so it is copied with lora_alpha = s·r.
    _merge(paths["expert"], paths["anti"], tmp_path / "out", 1.0)
    original = load_file(os.path.join(paths["expert"], "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"
    assert torch.equal(written[key], original[key])
    layer = peft_model(base, tmp_path / "out").base_model.model.transformer.h[0].mlp.c_fc
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5, rel=1e-15)


def test_round_trip_of_an_input_adapter_gives_the_same_model(llama, tmp_path):
    base, paths = llama
    for name in ("expert", "anti"):  # rank/alpha patterns; rsLoRA
        write_adapter(tmp_path / name, *to_peft(load_adapter(paths[name])))
        check_logits(peft_model(base, tmp_path / name), peft_model(base, paths[name]), f"round trip {name}")


def test_max_rank_output_loads_and_reports_errors(llama, tmp_path):
    base, paths = llama
    report = _merge(paths["expert"], paths["anti"], tmp_path / "out", 1.0, max_rank=5)
    truncated = load_adapter(tmp_path / "out")
    assert max(m.rank for m in truncated.modules.values()) == 5
    assert set(report.truncation_error) == set(truncated.modules)
    exact = merge_adapters(load_adapter(paths["expert"]), load_adapter(paths["anti"]), 1.0)
    for name, module in truncated.modules.items():
        full = exact.modules[name].delta(torch.float64)
        err = float((full - module.delta(torch.float64)).norm() / full.norm())
        # The factors are written in float32: the measured error moves by ≤ ~1e-6 from that rounding.
        assert abs(err - report.truncation_error[name]) <= 1e-5, name
    deltas = {name: m.delta(torch.float64) for name, m in truncated.modules.items()}
    check_logits(peft_model(base, tmp_path / "out"), with_deltas(base, deltas, False), "max_rank")


def test_non_lora_tensors_of_the_expert_are_kept(tmp_path):
    torch.manual_seed(SEED)
    base = tiny_llama()
    expert = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False
        ),
    )
    head = expert.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(torch.randn_like(head))  # a trained head differs from the base one
    expert.save_pretrained(tmp_path / "expert")
    paths = {"expert": str(tmp_path / "expert")}
    paths.update(make_adapters(base, {"anti": dict(r=2, lora_alpha=2, target_modules=["q_proj"])}, tmp_path))
    with pytest.warns(UserWarning, match="copied to the result unchanged"):
        _merge(paths["expert"], paths["anti"], tmp_path / "out", 1.0)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    expected = with_deltas(base, expected_deltas(base, paths["expert"], [paths["anti"]], [1.0], "ext-sub"), False)
    with torch.no_grad():
        expected.lm_head.weight.copy_(head)
    check_logits(peft_model(base, tmp_path / "out"), expected, "modules_to_save")


# --- bad adapters: a clear error, nothing written --------------------------------------


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _without(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _replace(key, fn):
    return lambda s: {**s, key: fn(s[key])}


def _set(**fields):
    return lambda c: {**c, **fields}


def _drop(field):
    return lambda c: {k: v for k, v in c.items() if k != field}


def _nan(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t[1, 1] = float("inf")
    return t


BAD_ADAPTERS = {
    "A without B": (dict(tensors=_without(Q_B)), r"q_proj has lora_A but no lora_B"),
    "B without A": (dict(tensors=_without(Q_A)), r"q_proj has lora_B but no lora_A"),
    "shapes do not chain": (
        dict(tensors=_replace(Q_B, lambda t: t[:, :3].contiguous())),
        r"q_proj: lora_B \(64, 3\) and lora_A \(4, 64\) do not chain",
    ),
    "rank disagrees with config": (dict(config=_set(r=5)), r"_proj has rank 4 .* gives it r = 5"),
    "missing config": (dict(config=lambda c: None), r"bad has no adapter_config.json: the LoRA scaling .* is unknown"),
    "unreadable config": (dict(config=lambda c: "{not json"), r"adapter_config.json: unreadable adapter config"),
    "config without lora_alpha": (dict(config=_drop("lora_alpha")), r"'lora_alpha' is missing"),
    "unsupported peft_type": (
        dict(config=_set(peft_type="ADALORA")),
        r"peft_type is 'ADALORA'; extsub merges LORA, IA3, PREFIX_TUNING adapters",
    ),
    "an (IA)³ config on LoRA weights": (
        dict(config=_set(peft_type="IA3")),
        r"no \(IA\)³ vectors .* says peft_type IA3",
    ),
    "DoRA": (dict(config=_set(use_dora=True)), r"use_dora is set; not supported"),
    "bad rank_pattern": (
        dict(config=_set(rank_pattern={"q_proj": 0})),
        r"rank_pattern\['q_proj'\] must be one of positive integers",
    ),
    "Conv2d LoRA": (
        dict(tensors=_replace(Q_A, lambda t: t.reshape(4, 64, 1, 1))),
        r"q_proj has lora_A \(4, 64, 1, 1\) .* only 2-D factors",
    ),
    "non-float tensor": (
        dict(tensors=_replace(Q_A, lambda t: t.to(torch.int32))),
        r"q_proj.lora_A.weight has dtype torch.int32",
    ),
    "NaN": (dict(tensors=_replace(Q_B, _nan)), r"q_proj.lora_B.weight contains NaN or Inf \(1 value"),
    "Inf": (dict(tensors=_replace(Q_A, _inf)), r"q_proj.lora_A.weight contains NaN or Inf \(1 value"),
    "two adapter names": (
        dict(
            tensors=lambda s: {
                k.replace("q_proj.lora_A", "q_proj.lora_A.x").replace("q_proj.lora_B", "q_proj.lora_B.y"): v
                for k, v in s.items()
            }
        ),
        r"several adapters \(x, y\)",
    ),
    "DoRA tensor": (
        dict(
            tensors=lambda s: {
                **s,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64),
            }
        ),
        r"lora_magnitude_vector is a DoRA magnitude vector",
    ),
    "LoRA bias": (
        dict(tensors=lambda s: {**s, Q_B.replace(".weight", ".bias"): torch.ones(64)}),
        r"lora_B.bias is a LoRA bias",
    ),
}


def _assert_nothing_written(folder, out):
    assert not out.exists()
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.mark.parametrize("case", list(BAD_ADAPTERS), ids=list(BAD_ADAPTERS))
def test_bad_anti_expert_is_explained_and_nothing_is_written(case, llama, tmp_path):
    _, paths = llama
    edits, message = BAD_ADAPTERS[case]
    bad = copy_adapter(paths["expert"], tmp_path / "bad", **edits)
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    with pytest.raises(AdapterError, match=message) as caught:
        _merge(paths["expert"], bad, out_dir / "out", 1.0)
    assert str(bad) in str(caught.value)  # the message names the file
    _assert_nothing_written(out_dir, out_dir / "out")
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before  # inputs untouched


def test_missing_files_are_explained(llama, tmp_path):
    _, paths = llama
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(
        Path(paths["expert"], "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(AdapterError, match=r"no_config has no adapter_config.json"):
        load_adapter(no_config)
    with pytest.raises(AdapterError, match=r"a bare adapter file with no adapter_config.json beside it"):
        load_adapter(no_config / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"an explicit scaling was given but .* exists"):
        load_adapter(os.path.join(paths["expert"], "adapter_model.safetensors"), scaling=LoraScaling(8))
    with pytest.raises(AdapterError, match=r"has rank 6 .* the explicit r"):
        load_adapter(no_config / "adapter_model.safetensors", scaling=LoraScaling(8, r=4))  # down_proj has rank 6
    pickle_only = tmp_path / "pickle_only"
    pickle_only.mkdir()
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match=r"adapter_model.bin, a pickle file"):
        load_adapter(pickle_only)
    truncated = tmp_path / "truncated"
    copy_adapter(paths["expert"], truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=r"truncated.*not a readable safetensors file"):
        load_adapter(truncated)
    with pytest.raises(AdapterError, match=r"nowhere: no such file or folder"):
        load_adapter(tmp_path / "nowhere")


def test_adapters_of_different_base_models_are_refused(llama, tmp_path):
    _base, paths = llama
    other = copy_adapter(paths["anti"], tmp_path / "other", config=_set(base_model_name_or_path="org/other-model"))
    mine = copy_adapter(paths["expert"], tmp_path / "mine", config=_set(base_model_name_or_path="org/tiny-llama"))
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    with pytest.raises(ValueError, match=r"other was trained on base model 'org/other-model' .* 'org/tiny-llama'"):
        _merge(mine, other, out_dir / "out", 1.0)
    _assert_nothing_written(out_dir, out_dir / "out")
    # Same module names, other shapes: a wider model.
    torch.manual_seed(SEED)
    wide = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    wide_paths = make_adapters(wide, {"wide": LLAMA_ADAPTERS["anti"]}, tmp_path)
    with pytest.raises(
        ValueError, match=r"q_proj: the expert .* adapts a \(64, 64\) weight but .*wide a \(32, 32\) one"
    ):
        _merge(paths["expert"], wide_paths["wide"], out_dir / "out", 1.0)
    _assert_nothing_written(out_dir, out_dir / "out")


def test_output_overlapping_an_input_or_existing_is_refused(llama, tmp_path):
    _, paths = llama
    with pytest.raises(ValueError, match=r"is the ANTI folder; choose another "):
        _merge(paths["expert"], paths["anti"], paths["anti"], 1.0)
    with pytest.raises(ValueError, match=r"contains the EXPERT file"):
        _merge(paths["expert"], paths["anti"], os.path.dirname(paths["anti"]), 1.0, force=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")  # an empty folder would be taken (nothing to lose)
    with pytest.raises(ValueError, match=r"taken already exists; pass force=True to replace it"):
        _merge(paths["expert"], paths["anti"], tmp_path / "taken", 1.0)
    with pytest.raises(ValueError, match=r"writes a PEFT adapter folder .* give a folder OUT"):
        _merge(paths["expert"], paths["anti"], tmp_path / "x.safetensors", 1.0, output_format="dense-lora")
    with pytest.raises(ValueError, match=r"applies to format=lora, not to format=delta"):
        _merge(paths["expert"], paths["anti"], tmp_path / "x", 1.0, output_format="delta", max_rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# --- writing -------------------------------------------------------------------------


def test_write_adapter_is_atomic(tmp_path):
    state = {"base_model.model.m.lora_A.weight": torch.ones(2, 3), "base_model.model.m.lora_B.weight": torch.ones(4, 2)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
    target = write_adapter(tmp_path / "a", state, config, metadata={"note": "x"})
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((target / "adapter_config.json").read_text()) == config
    # Overwriting replaces the folder; a failing write leaves the old one and no temporary files.
    write_adapter(tmp_path / "a", {**state, "base_model.model.m.lora_B.weight": torch.zeros(4, 2)}, config, force=True)
    assert load_file(str(target / "adapter_model.safetensors"))["base_model.model.m.lora_B.weight"].sum() == 0
    with pytest.raises(TypeError, match="'bad' is a str, not a torch.Tensor"):
        write_adapter(tmp_path / "a", {"bad": "not a tensor"}, config, force=True)
    assert load_file(str(target / "adapter_model.safetensors"))["base_model.model.m.lora_B.weight"].sum() == 0
    with pytest.raises(TypeError, match="'bad' is a str, not a torch.Tensor"):
        write_adapter(tmp_path / "b", {"bad": "not a tensor"}, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert write_adapter(tmp_path / "new" / "c", state, config).is_dir()  # parent folders are created


def test_write_tensors_is_atomic(tmp_path):
    write_tensors(tmp_path / "d.safetensors", {"w": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="exists"):
        write_tensors(tmp_path / "d.safetensors", {"w": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="'w' is a str, not a torch.Tensor"):
        write_tensors(tmp_path / "e.safetensors", {"w": "not a tensor"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


# --- configs validated as PEFT validates them ---------------------------------------------

# name: (edit of the config, message, whether PEFT's own loader refuses the config too)
BAD_CONFIGS = {
    "peft_type missing": (_drop("peft_type"), r"peft_type is missing", True),
    "peft_type in lower case": (_set(peft_type="lora"), r"peft_type is 'lora'; PEFT spells .* \('LORA'\)", True),
    "peft_type not a string": (_set(peft_type=5), r"peft_type is 5; extsub merges LORA, IA3", True),
    "r null": (_set(r=None), r"r must be a positive integer .* got None", True),
    "r zero": (_set(r=0), r"r must be a positive integer .* got 0", True),
    "r a float": (_set(r=4.0), r"r must be a positive integer .* got 4.0", True),
    "target_modules a number": (
        _set(target_modules=5),
        r"target_modules must be a list of module names .* got 5",
        True,
    ),
    "target_modules with numbers": (_set(target_modules=["q_proj", 3]), r"target_modules must be a list", True),
    "layers_to_transform with a regex target": (
        _set(target_modules=".*q_proj", layers_to_transform=[0]),
        r"layers_to_transform and layers_pattern cannot be used with a target_modules regular expression",
        True,
    ),
    "bad task_type": (_set(task_type="CHAT"), r"task_type is 'CHAT'; PEFT accepts", True),
    "use_rslora a string": (_set(use_rslora="false"), r"use_rslora must be true or false, got 'false'", False),
    "lora_alpha Infinity": (
        lambda c: json.dumps(c).replace('"lora_alpha": 8', '"lora_alpha": Infinity'),
        r"lora_alpha must be a finite number",
        False,
    ),
    "QALoRA": (_set(use_qalora=True), r"use_qalora is set; not supported", False),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_configs_peft_refuses_are_refused_naming_the_file_and_field(case, llama, tmp_path):
    base, paths = llama
    edit, message, peft_refuses = BAD_CONFIGS[case]
    bad = copy_adapter(paths["expert"], tmp_path / "bad", config=edit)
    with pytest.raises(AdapterError, match=message) as caught:
        load_adapter(bad)
    assert str(bad / "adapter_config.json") in str(caught.value)
    if peft_refuses:
        with pytest.raises(Exception):  # noqa: B017 - PEFT fails in its own ways (KeyError, TypeError, ValueError)
            peft_model(base, bad)


def test_weights_outside_target_modules_are_refused_and_peft_would_ignore_them(llama, tmp_path):
    base, paths = llama
    config = json.loads(Path(paths["expert"], "adapter_config.json").read_text())
    narrowed = [m for m in config["target_modules"] if m != "q_proj"]
    bad = copy_adapter(paths["expert"], tmp_path / "bad", config=_set(target_modules=narrowed))
    with pytest.raises(AdapterError, match=r"module model.layers.0.self_attn.q_proj has LoRA weights, but .* does not"):
        load_adapter(bad)
    model = peft_model(base, bad)  # what PEFT does with them: no LoRA layer on q_proj, its weights unused
    lora_layers = {n for n, m in model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert lora_layers and not any(n.endswith("q_proj") for n in lora_layers)


def test_a_module_of_rank_0_is_refused(llama, tmp_path):
    _, paths = llama
    edit = _replace(Q_A, lambda t: t[:0].contiguous())
    empty = lambda s: _replace(Q_B, lambda t: t[:, :0].contiguous())(edit(s))  # noqa: E731
    bad = copy_adapter(paths["expert"], tmp_path / "bad", tensors=empty, config=lambda c: None)
    with pytest.raises(AdapterError, match=r"q_proj has rank 0 \(lora_A \(0, 64\)\)"):
        load_adapter(bad / "adapter_model.safetensors", scaling=LoraScaling(lora_alpha=8))


def test_a_huge_lora_alpha_is_refused_where_the_merge_overflows_never_written_as_inf(llama, tmp_path):
    _, paths = llama
    huge = copy_adapter(paths["expert"], tmp_path / "huge", config=_set(lora_alpha=1e308))
    out = tmp_path / "outputs" / "out"
    with pytest.raises(InputError, match=r"module .*: the merged factors overflow float32"):
        _merge(huge, paths["anti"], out, 1.0)
    assert not out.parent.exists()
