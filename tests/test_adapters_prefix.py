"""Prefix-tuning adapters: Ext-Sub on θ itself, one row per token, layer, key/value and head (docs/design.md §6).

The oracle is `ext_sub_reference` (paper §3, Algorithm 1 written literally) in float64 on the
prefix PEFT itself holds after `PeftModel.from_pretrained` (never our reader), viewed as PEFT's
`get_prompt` views it: (num_virtual_tokens, num_layers·2, num_attention_heads, head_dim), with
the geometry PEFT put in the saved config (on the grouped-query LLaMA: the key/value heads).
Adapters come from `trained_fixtures`: tiny LLaMA, grouped-query LLaMA and GPT-2, prefix-tuning
with and without `prefix_projection` (saved projected either way), trained a few steps.

Tolerances: written prefixes are float32 roundings of a float64-accurate result, so
|θ' − reference| ≤ eps32·|reference| plus 2⁻⁴⁰ of max|reference| for the literal form's own
float64 rounding. Logits: `peft_fixtures.logit_tolerance` (2⁻¹⁴ of max|logits|, float32
evaluation against a float64 reference; derivation there).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import InputError, PrefixAdapter, ext_sub_reference, load_adapter, merge, merge_adapters
from extsub_kernels.adapters.prefix import PROMPT_KEY, prefix_output
from extsub_kernels.cli import EXIT_BAD_INPUT, main

from checkpoints import hashes, leftovers
from helpers import (
    assert_close_explained,
    assert_one_line_error,
    causal_logits,
    copy_adapter,
    lazy_module,
    quiet_peft_model,
)
from peft_fixtures import logit_tolerance

peft = lazy_module("peft")

EPS32 = torch.finfo(torch.float32).eps
PROMPT = "repeat dog = dog dog dog"
# (model, PEFT type): with and without the projection; the grouped-query LLaMA (4 heads, 2 KV heads); GPT-2.
TRAINED = [("llama", "prefix"), ("llama", "prefix_projection"), ("llama_gqa", "prefix"), ("gpt2", "prefix")]


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _reference(expert: torch.Tensor, antis: list[torch.Tensor], lams, method: str, heads: int, token_dim: int):
    """θ' by Algorithm 1 on the per-head rows (the last dim of PEFT's 4-D view), anti-expert after anti-expert."""
    tokens = expert.shape[0]
    view = (tokens, -1, heads, token_dim // heads)  # (tokens, layers·2, heads, head_dim), as PEFT's get_prompt
    p = expert.double().reshape(view)
    for anti, lam in zip(antis, lams, strict=True):
        m = anti.double().reshape(view)
        if method == "ext-sub":
            p = ext_sub_reference(p.reshape(-1, view[-1]), m.reshape(-1, view[-1]), lam).reshape(p.shape)
        else:
            p = p - lam * m if method == "sub" else p + lam * m
    return p.reshape(expert.shape)


# --- the merge in memory ------------------------------------------------------------------


def test_rows_are_the_per_head_vectors_of_pefts_view():
    prefix = PrefixAdapter(torch.arange(2 * 3 * 2 * 12.0).reshape(2, 72), 2, 3, 12, 4)
    view = prefix.prompt_embeddings.view(2, 3 * 2, 4, 3)  # (tokens, layers·2, heads, head_dim)
    assert torch.equal(prefix.rows(), view.reshape(-1, 3)) and prefix.head_dim == 3
    assert torch.equal(prefix.rows()[5], view[0, 1, 1])


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
def test_merge_is_the_formula_on_per_head_rows(method):
    tensors = [torch.randn(3, 2 * 2 * 16, dtype=torch.float64) for _ in range(3)]
    adapters = [PrefixAdapter(t, 3, 2, 16, 4) for t in tensors]
    merged = merge_adapters(adapters[0], adapters[1:], [0.4, 1.7], method)
    expected = _reference(tensors[0], tensors[1:], [0.4, 1.7], method, heads=4, token_dim=16)
    assert_close_explained(merged.prompt_embeddings, expected, 2**-48, 2**-48, method)
    assert merged.geometry == adapters[0].geometry and merged.report.merged == [PROMPT_KEY]
    # Another split into heads is another merge: the geometry matters.
    other = _reference(tensors[0], tensors[1:], [0.4, 1.7], method, heads=2, token_dim=16)
    assert method != "ext-sub" or (other - expected).abs().max() > 1e-3


def test_degenerate_rows():
    p, m = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    rows = (slice(0, 8), slice(8, 16), slice(16, 24))  # the first three rows (head_dim 8): token 0, layer 0
    p[0, rows[0]] = 0  # |p| = 0: unchanged (stays 0)
    m[0, rows[1]] = 0  # |m| = 0: unchanged
    m[0, rows[2]] = -2.5 * p[0, rows[2]]  # antiparallel: Ext(m) = m, p − λm
    merged = merge_adapters(PrefixAdapter(p, 2, 1, 16, 2), PrefixAdapter(m, 2, 1, 16, 2), 0.8)
    out = merged.prompt_embeddings
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, rows[0]], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(out[0, rows[1]], p[0, rows[1]])
    assert_close_explained(out[0, rows[2]], p[0, rows[2]] * (1 + 0.8 * 2.5), 2**-50, 2**-50, "antiparallel")
    assert merged.report.zero_rows == {PROMPT_KEY: 1}
    assert "1 expert row with |p| = 0 kept unchanged" in merged.report.summary()


def test_geometry_must_agree_and_be_sound():
    expert = PrefixAdapter(torch.randn(2, 64), 2, 2, 16, 4, source="e/")
    for anti, message in (
        (
            PrefixAdapter(torch.randn(2, 64), 2, 2, 16, 2, source="a/"),
            "a/ has num_attention_heads = 2 but the expert e/",
        ),
        (PrefixAdapter(torch.randn(2, 64), 2, 1, 32, 4, source="a/"), "a/ has num_layers = 1 but the expert e/"),
        (PrefixAdapter(torch.randn(3, 64), 3, 2, 16, 4, source="a/"), "a/ has num_virtual_tokens = 3"),
    ):
        with pytest.raises(InputError, match=message):
            merge_adapters(expert, anti, 1.0)
    with pytest.raises(ValueError, match=r"token_dim 16 is not a multiple of num_attention_heads 3"):
        PrefixAdapter(torch.randn(2, 64), 2, 2, 16, 3)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \[2, 60\] but the geometry .* gives \[2, 64\]"):
        PrefixAdapter(torch.randn(2, 60), 2, 2, 16, 4)
    with pytest.raises(InputError, match="a prefix has no rank"):
        merge_adapters(expert, expert, 1.0, max_rank=2)


def test_no_fold_into_a_base_model():
    prefix = PrefixAdapter(torch.randn(2, 64), 2, 2, 16, 4, source="e/")
    with pytest.raises(InputError, match=r"base= with prefix-tuning adapters \(e/\): a prefix adds virtual key/value"):
        prefix.base_edits()


def test_output_keeps_the_experts_config_and_dtype():
    config = {"peft_type": "PREFIX_TUNING", "prefix_projection": True, "encoder_hidden_size": 16, "peft_version": "x"}
    expert = PrefixAdapter(torch.randn(2, 64).bfloat16(), 2, 2, 16, 4, config=config)
    merged = merge_adapters(expert, PrefixAdapter(torch.randn(2, 64), 2, 2, 16, 4), 1.0)
    output = prefix_output(merged)
    written = dict(output.items())[PROMPT_KEY]
    assert written.dtype == torch.bfloat16 and torch.equal(written, merged.prompt_embeddings.bfloat16())
    saved = json.loads(output.texts["adapter_config.json"])
    assert saved["prefix_projection"] is True and saved["peft_version"] == "x" and saved["inference_mode"] is True
    assert (saved["num_layers"], saved["token_dim"], saved["num_attention_heads"]) == (2, 16, 4)


# --- end to end: trained adapters, the CLI, PEFT ------------------------------------------


def _peft_prefix(base, folder) -> tuple[torch.Tensor, object]:
    """The prefix PEFT itself holds after from_pretrained (float64), and its config."""
    model = quiet_peft_model(copy.deepcopy(base), folder)
    return model.prompt_encoder["default"].embedding.weight.detach().double(), model.peft_config["default"]


@pytest.mark.parametrize(("model_name", "peft_type"), TRAINED, ids=["-".join(t) for t in TRAINED])
def test_every_method_loads_in_peft_with_the_reference_logits(trained, model_name, peft_type, tmp_path, capsys):
    expert, anti = (trained.adapter(model_name, peft_type, role) for role in ("expert", "anti"))
    base = trained.load_base(model_name)
    plus, config = _peft_prefix(base, expert)
    minus, _ = _peft_prefix(base, anti)
    if model_name == "llama_gqa":  # PEFT saved the key/value geometry: 2 heads of 8, not 4 of 8
        assert (config.num_attention_heads, config.token_dim) == (base.config.num_key_value_heads, 16)
    ids = trained.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    for method in ("ext-sub", "sub", "add"):
        out = tmp_path / method
        code, err = _run(capsys, expert, anti, "-o", out, "--lam", "0.7", "--method", method)
        assert code == 0, err
        assert "1 prefix-tuning prompt embedding: 1 merged" in err, err
        expected = _reference(plus, [minus], [0.7], method, config.num_attention_heads, config.token_dim)
        written = load_file(out / "adapter_model.safetensors")
        assert list(written) == [PROMPT_KEY] and written[PROMPT_KEY].dtype == torch.float32
        assert_close_explained(written[PROMPT_KEY], expected, EPS32, 2**-40, f"{model_name} {peft_type} {method}")
        saved = json.loads((out / "adapter_config.json").read_text())
        assert saved == {**json.loads((expert / "adapter_config.json").read_text()), "inference_mode": True}
        reference = quiet_peft_model(copy.deepcopy(base).double(), out)
        reference.prompt_encoder["default"].embedding.weight.data = expected.clone()
        expected_logits = causal_logits(reference, ids)
        logits = causal_logits(quiet_peft_model(copy.deepcopy(base), out), ids)
        assert_close_explained(logits, expected_logits, 0.0, logit_tolerance(expected_logits), f"{model_name} {method}")
    assert (causal_logits(quiet_peft_model(copy.deepcopy(base), expert), ids) - logits).abs().max() > 1e-2


def test_several_anti_experts_and_loaded_objects(trained, tmp_path, capsys):
    expert, anti = (trained.adapter("llama", "prefix", role) for role in ("expert", "anti"))
    second = copy_adapter(anti, tmp_path / "anti2", tensors=lambda s: {PROMPT_KEY: s[PROMPT_KEY].flip(0)})
    base = trained.load_base("llama")
    (plus, config), (minus, _), (minus2, _) = (_peft_prefix(base, f) for f in (expert, anti, second))
    code, err = _run(capsys, expert, anti, second, "-o", tmp_path / "out", "--lam", "1:0.5,2:0.3")
    assert code == 0, err
    for lams in ((1.0, 0.5), (2.0, 0.3)):
        written = load_file(tmp_path / f"out-lam{lams[0]:g}_{lams[1]:g}" / "adapter_model.safetensors")[PROMPT_KEY]
        expected = _reference(plus, [minus, minus2], lams, "ext-sub", config.num_attention_heads, config.token_dim)
        assert_close_explained(written, expected, EPS32, 2**-40, f"λ={lams}")
    loaded = [load_adapter(f) for f in (expert, anti, second)]
    assert all(isinstance(a, PrefixAdapter) for a in loaded)
    merge(loaded[0], loaded[1:], tmp_path / "objects", lam=[[1.0, 0.5]])
    objects = load_file(tmp_path / "objects" / "adapter_model.safetensors")[PROMPT_KEY]
    assert torch.equal(objects, load_file(tmp_path / "out-lam1_0.5" / "adapter_model.safetensors")[PROMPT_KEY])


# --- bad inputs: exit 2, one line, nothing written -----------------------------------------


def _nan(state: dict) -> dict:
    prompt = state[PROMPT_KEY].clone()
    prompt[1, 7] = float("nan")
    return {PROMPT_KEY: prompt}


# name: (build (expert, anti, extra args) from the fixture folders, expected parts of the message)
BAD = {
    "mismatched geometry (grouped-query KV heads)": (
        lambda f, x: (x["expert"], x["gqa"], ["--any-base-model"]),
        ["gqa has token_dim = 16 but the expert", "expert has token_dim = 32", "one geometry"],
    ),
    "mixed PEM types": (
        lambda f, x: (x["expert"], x["ia3"], []),
        ["ia3 is a (IA)³ adapter but the expert", "is a prefix-tuning adapter", "one PEM type"],
    ),
    "missing config": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", config=lambda c: None), []),
        ["bad: prefix-tuning adapter weights with no adapter_config.json", "num_attention_heads"],
    ),
    "corrupt config": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", config=lambda c: '{"peft_type": '), []),
        ["bad/adapter_config.json: unreadable adapter config"],
    ),
    "config without the geometry": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", config=lambda c: {**c, "token_dim": None}), []),
        ["bad/adapter_config.json: token_dim must be a positive integer, got None"],
    ),
    "shape the config contradicts": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", config=lambda c: {**c, "num_layers": 3}), []),
        ["bad/adapter_model.safetensors: prompt_embeddings has shape [5, 128] but", "gives [5, 192]"],
    ),
    "NaN": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", tensors=_nan), []),
        ["bad/adapter_model.safetensors: prompt_embeddings contains NaN or Inf (1 value, first in row 1)"],
    ),
    "--base": (
        lambda f, x: (x["expert"], x["anti"], ["--base", x["base"]]),
        ["--base with prefix-tuning adapters", "cannot be folded into the base model", "PeftModel.from_pretrained"],
    ),
    "a LoRA format": (
        lambda f, x: (x["expert"], x["anti"], ["--format", "dense-lora"]),
        ["--format dense-lora does not apply to prefix-tuning adapters", "prefix-tuning (the default)"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_errors_and_nothing_is_written(case, trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "in"
    sources = {
        "expert": trained.adapter("llama", "prefix", "expert"),
        "anti": trained.adapter("llama", "prefix", "anti"),
        "gqa": trained.adapter("llama_gqa", "prefix", "anti"),
        "ia3": trained.adapter("llama", "ia3", "anti"),
    }
    paths = {name: copy_adapter(source, folder / name) for name, source in sources.items()}
    paths["base"] = shutil.copytree(trained.base("llama"), folder / "base")
    build, message = BAD[case]
    expert, anti, extra = build(folder, paths)
    before = hashes(folder)
    code, err = _run(capsys, expert, anti, "-o", tmp_path / "out" / "merged", *extra)
    assert_one_line_error(code, err, EXIT_BAD_INPUT, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"
    assert not leftovers(tmp_path)
    assert hashes(folder) == before, "inputs are never modified"
