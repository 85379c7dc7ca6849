"""The Conv1D layout is decided the same way for every input: --transposed, a config.json, key names and shapes."""

import json
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import ext_sub, merge
from extsub_kernels.engine.conv1d import conv1d_transposed, never_transposed, weight_layout

from checkpoints import random_delta, save

GPT2 = {
    "h.0.attn.c_attn.weight": (16, 48),
    "h.0.attn.c_proj.weight": (16, 16),
    "h.0.mlp.c_fc.weight": (16, 64),
    "h.0.mlp.c_proj.weight": (64, 16),
    "wte.weight": (50, 16),
}


def test_an_explicit_choice_wins_over_everything():
    layout = weight_layout([("EXPERT", {"model_type": "gpt2"})], GPT2, explicit=False)
    assert layout.rule is never_transposed and layout.reason == "--no-transposed given"
    assert weight_layout([("EXPERT", {"model_type": "llama"})], {}, explicit=True).rule is conv1d_transposed


def test_the_first_config_that_names_a_model_decides():
    configs = [("EXPERT", None), ("BASE", {"architectures": ["GPT2LMHeadModel"]}), ("ANTI", {"model_type": "llama"})]
    layout = weight_layout(configs, {})
    assert (
        layout.conv1d
        and layout.reason == "config.json of BASE (GPT2LMHeadModel): GPT-2 Conv1D weights stored (in, out)"
    )
    assert not weight_layout([("EXPERT", {"model_type": "llama"})], GPT2).conv1d


def test_without_a_config_gpt2_key_names_and_shapes_decide():
    layout = weight_layout([("EXPERT", None)], GPT2)
    assert layout.conv1d and "h.0.attn.c_attn.weight is [16, 48], as Conv1D stores it" in layout.reason
    linear = {name: tuple(reversed(shape)) for name, shape in GPT2.items()}
    assert not weight_layout([("EXPERT", None)], linear).conv1d, "(3d, d) is how nn.Linear stores c_attn"
    assert weight_layout([("EXPERT", None)], {"layers.0.q_proj.weight": (8, 8)}).rule is never_transposed


def test_conv1d_names_whose_shapes_do_not_tell_draw_a_warning():
    with pytest.warns(
        UserWarning, match=r"GPT-2 Conv1D weight names \(e.g. h.0.attn.c_proj.weight\) but no config.json"
    ):
        layout = weight_layout([("EXPERT", None)], {"h.0.attn.c_proj.weight": (16, 16)})
    assert layout.conv1d and "ambiguous" in layout.reason


def _expected(expert: dict, anti: dict) -> dict:
    """The op on output features: columns of Conv1D weights (stored (in, out)), rows of the embedding."""
    return {
        name: ext_sub(expert[name], anti[name], 1.0)
        if name == "wte.weight"
        else ext_sub(expert[name].t(), anti[name].t(), 1.0).t()
        for name in expert
    }


@contextmanager
def _warns_of_a_full_model(expected: bool):
    """A config.json that names a model, without --base, draws the full-model warning; bare files draw none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught]
    assert any("looks like a full model" in m for m in messages) == expected and len(messages) == expected, messages


@pytest.mark.parametrize(
    "how", ["bare files", "bare files with a config.json beside them", "a folder with config.json"]
)
def test_gpt2_weights_pair_output_features_however_they_are_given(tmp_path, how):
    expert, anti = random_delta(GPT2), random_delta(GPT2)
    paths = []
    for name, tensors in (("e", expert), ("a", anti)):
        folder = tmp_path / name
        path = save(folder / ("model.safetensors" if how != "bare files" else f"{name}.safetensors"), tensors)
        if how != "bare files":
            (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        paths.append(folder if how.startswith("a folder") else path)
    with _warns_of_a_full_model(how != "bare files"):
        report = merge(*paths, tmp_path / "out.safetensors", stats=True)
    out = load_file(tmp_path / "out.safetensors")
    for name, tensor in _expected(expert, anti).items():
        assert torch.allclose(out[name], tensor, rtol=2.0**-16, atol=2.0**-16 * float(tensor.abs().max())), name
    c_attn = next(s for s in report.stats if s.name == "h.0.attn.c_attn.weight")
    assert c_attn.pairs[0].rows == 48, "statistics are over output features too"


def test_no_transposed_pairs_rows_of_dim_0(tmp_path):
    expert, anti = random_delta(GPT2), random_delta(GPT2)
    e, a = save(tmp_path / "e.safetensors", expert), save(tmp_path / "a.safetensors", anti)
    report = merge(e, a, tmp_path / "out.safetensors", transposed=False, stats=True)
    name = "h.0.attn.c_attn.weight"
    assert torch.equal(load_file(tmp_path / "out.safetensors")[name], ext_sub(expert[name], anti[name], 1.0))
    assert next(s for s in report.stats if s.name == name).pairs[0].rows == 16
