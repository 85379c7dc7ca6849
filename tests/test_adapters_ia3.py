"""(IA)³ adapters: the merge on task vectors d = l − 1 (docs/design.md §6), in memory and end to end against PEFT.

The oracle is `ext_sub_reference` (paper §3, Algorithm 1 written literally) in float64 on the
task vectors PEFT itself holds after `PeftModel.from_pretrained` (never our reader), each
whole vector one row, anti-expert after anti-expert: l' = 1 + d⁺ − λ·Ext(d⁻); sub and add are
1 + d⁺ ∓ λ·d⁻. Adapters come from `trained_fixtures` (tiny LLaMA and GPT-2, (IA)³ on keys,
values and the feedforward output layer, so (out, 1) and (1, in) vectors both occur, trained
a few steps so every value moved). Outputs load with `PeftModel.from_pretrained`; their
logits are compared with a float64 copy of the model holding the reference vectors.

Tolerances: written vectors are float32 roundings of a float64-accurate result, so
|l' − reference| ≤ eps32·|reference| (one rounding is ≤ eps32/2), plus 2⁻⁴⁰ of the largest
|reference| for the literal form's own float64 rounding. Logits: `peft_fixtures.logit_tolerance`
(2⁻¹⁴ of max|logits|, float32 evaluation against a reference; derivation there).
"""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import IA3Adapter, InputError, ext_sub_reference, load_adapter, merge, merge_adapters
from extsub_kernels.adapters.family import BaseEdit
from extsub_kernels.adapters.ia3 import ia3_key, ia3_output
from extsub_kernels.cli import EXIT_BAD_INPUT, main
from extsub_kernels.io.reader import read_header

from checkpoints import hashes, leftovers, make_hub_cache
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
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
PROMPT = "prev red = door book"


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _vector(*shape, scale=0.3, dtype=torch.float64) -> torch.Tensor:
    return (1 + scale * torch.randn(*shape, dtype=torch.float64)).to(dtype)


def _reference(expert: dict, antis: list[dict], lams, method: str) -> dict[str, torch.Tensor]:
    """l' by Algorithm 1 on d = l − 1 (whole vector = one row), anti-expert after anti-expert, float64."""
    result = {name: scales.double() - 1 for name, scales in expert.items()}
    for anti, lam in zip(antis, lams, strict=True):
        for name, scales in anti.items():
            m = scales.double().reshape(1, -1) - 1
            p = result.get(name, torch.zeros_like(scales, dtype=torch.float64)).reshape(1, -1)
            if method == "ext-sub":
                p = ext_sub_reference(p, m, lam)
            else:
                p = p - lam * m if method == "sub" else p + lam * m
            result[name] = p.reshape(scales.shape)
    return {name: 1 + d for name, d in result.items()}


# --- the merge in memory ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
def test_merge_is_the_formula_on_task_vectors(method):
    expert = {"k": _vector(16, 1), "v": _vector(16, 1), "down": _vector(1, 40)}
    first = {"k": _vector(16, 1), "down": _vector(1, 40), "only_anti": _vector(8, 1)}
    second = {"k": _vector(16, 1), "v": _vector(16, 1)}
    adapters = [IA3Adapter(v, feedforward={"down"} & set(v)) for v in (expert, first, second)]
    merged = merge_adapters(adapters[0], adapters[1:], [0.7, 1.9], method)
    expected = _reference(expert, [first, second], [0.7, 1.9], method)
    assert set(merged.vectors) == set(expected)
    for name, vector in merged.vectors.items():
        assert vector.dtype == torch.float64 and vector.shape == expected[name].shape
        assert_close_explained(vector, expected[name], 2**-48, 2**-48, f"{method} {name}")
    assert merged.feedforward == {"down"}
    report = merged.report
    assert report.merged == ["k", "v", "down"]
    assert (report.dropped, report.added) == ((["only_anti"], []) if method == "ext-sub" else ([], ["only_anti"]))
    if method == "ext-sub":
        assert torch.equal(merged.vectors["only_anti"], torch.ones(8, 1, dtype=torch.float64))  # |p| = 0 ⇒ Ext = 0


def test_the_paper_formula_not_the_released_codes():
    # The released code computes d⁺ − d⁻ + λ·proj for ext-sub (the paper's formula only at λ = 1)
    # and adds λ to every scale when it subtracts; the merge follows the paper.
    p, m = _vector(12, 1), _vector(12, 1)
    expert, anti = IA3Adapter({"k": p}), IA3Adapter({"k": m})
    d_plus, d_minus = p - 1, m - 1
    ours = merge_adapters(expert, anti, 0.5).vectors["k"]
    unit = d_plus / d_plus.norm() + d_minus / d_minus.norm()
    unit = unit / unit.norm()
    released = 1 + d_plus - d_minus + 0.5 * (d_minus * unit).sum() * unit
    assert (ours - released).abs().max() > 1e-3
    assert_close_explained(ours, 1 + ext_sub_reference(d_plus.T, d_minus.T, 0.5).T, 2**-48, 2**-48, "ext-sub λ=0.5")
    sub = merge_adapters(expert, anti, 0.5, "sub").vectors["k"]
    assert_close_explained(sub, p - 0.5 * d_minus, 2**-50, 2**-50, "sub: l⁺ − λ·d⁻, no λ added to every scale")


def test_degenerate_vectors():
    p = _vector(10, 1)
    d = p - 1
    ones = torch.ones(10, 1, dtype=torch.float64)
    cases = {
        "d⁻ = 0 leaves the expert unchanged": (p, ones, 2.0, p),
        "d⁺ = 0 stays l = 1": (ones, p, 2.0, ones),
        "antiparallel: Ext(m) = m, p − λm": (p, 1 - 3 * d, 0.5, 1 + d + 0.5 * 3 * d),
    }
    for what, (plus, minus, lam, expected) in cases.items():
        merged = merge_adapters(IA3Adapter({"k": plus}), IA3Adapter({"k": minus}), lam)
        out = merged.vectors["k"]
        assert torch.isfinite(out).all(), what
        assert_close_explained(out, expected, 2**-50, 2**-50, what)
        assert merged.report.zero_rows == ({"k": 1} if plus is ones else {}), what
    assert (
        "1 expert vector with |p| = 0 kept unchanged"
        in merge_adapters(IA3Adapter({"k": ones}), IA3Adapter({"k": p}), 1.0).report.summary()
    )


def test_outputs_are_rounded_once_to_the_experts_dtype():
    expert = IA3Adapter({"k": _vector(16, 1, dtype=torch.bfloat16)})
    anti = IA3Adapter({"k": _vector(16, 1, dtype=torch.float32)})
    merged = merge_adapters(expert, anti, 1.3)
    exact = _reference({"k": expert.vectors["k"]}, [{"k": anti.vectors["k"]}], [1.3], "ext-sub")["k"]
    written = dict(ia3_output(merged).items())[ia3_key("k")]
    assert written.dtype == torch.bfloat16 and torch.equal(written, exact.to(torch.bfloat16))
    assert dict(ia3_output(merged, dtype=torch.float32).items())[ia3_key("k")].dtype == torch.float32


def test_vectors_of_one_module_must_agree():
    expert = IA3Adapter({"model.mlp.down_proj": _vector(1, 40)}, feedforward={"model.mlp.down_proj"}, source="e/")
    anti = IA3Adapter({"model.mlp.down_proj": _vector(16, 1)}, source="a/")
    with pytest.raises(InputError, match=r"down_proj: the expert e/ has \[1, 40\] \(feedforward, \(1, in\)\) but a/ "):
        merge_adapters(expert, anti, 1.0)
    with pytest.raises(ValueError, match=r"vector k: has shape \[16, 2\], expected \(out_features, 1\)"):
        IA3Adapter({"k": torch.ones(16, 2)})
    with pytest.raises(InputError, match=r"\(IA\)³ vectors have no rank"):
        merge_adapters(expert, expert, 1.0, max_rank=4)


def test_fold_scales_rows_columns_and_biases_as_peft_merges():
    l_out, l_in = _vector(6, 1, dtype=torch.float32), _vector(1, 4, dtype=torch.float32)
    adapter = IA3Adapter({"q": l_out, "down": l_in}, feedforward={"down"})
    edits = {(e.module, e.name): e for e in adapter.base_edits()}
    assert set(edits) == {("q", "q.weight"), ("q", "q.bias"), ("down", "down.weight")}
    assert edits["q", "q.bias"].optional and edits["q", "q.weight"].shape == (6, None)
    cpu = torch.device("cpu")
    for module, scales in (("q", l_out), ("down", l_in)):
        linear = torch.nn.Linear(4, 6)
        weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
        layer = peft.tuners.ia3.Linear(linear, "default", peft.IA3Config(), is_feedforward=module == "down")
        layer.ia3_l["default"].data = scales.clone()
        layer.merge()  # PEFT's own fold
        edit = edits[module, f"{module}.weight"]
        folded = adapter.fold(edit, weight, transposed=False, device=cpu)
        assert torch.equal(folded, layer.base_layer.weight.detach()), module
        conv1d = adapter.fold(edit, weight.T.contiguous(), transposed=True, device=cpu)  # Conv1D stores (in, out)
        assert torch.equal(conv1d, folded.T), module
        if module == "q":  # an output vector scales the bias too; a feedforward one leaves it
            folded_bias = adapter.fold(edits["q", "q.bias"], bias, transposed=True, device=cpu)
            assert torch.equal(folded_bias, layer.base_layer.bias.detach())
        else:
            assert torch.equal(layer.base_layer.bias.detach(), bias)
    assert BaseEdit("q", "q.weight", (6, None)).fits((4, 6), transposed=True)
    assert not BaseEdit("q", "q.weight", (6, None)).fits((6, 4), transposed=True)


# --- end to end: trained adapters, the CLI, PEFT ------------------------------------------


def _peft_vectors(base, folder) -> dict[str, torch.Tensor]:
    """PEFT's own ia3_l per module after from_pretrained, float64 (names as in the base model)."""
    model = quiet_peft_model(copy.deepcopy(base), folder)
    return {
        name: layer.ia3_l["default"].detach().double()
        for name, layer in model.base_model.model.named_modules()
        if isinstance(layer, peft.tuners.ia3.IA3Layer) and "default" in layer.ia3_l
    }


def _reference_logits(base, out: Path, expected: dict[str, torch.Tensor], ids) -> torch.Tensor:
    """Logits of a float64 copy of the model whose (IA)³ vectors are the float64 reference."""
    model = quiet_peft_model(copy.deepcopy(base).double(), out)
    layers = {
        name: layer
        for name, layer in model.base_model.model.named_modules()
        if isinstance(layer, peft.tuners.ia3.IA3Layer) and "default" in layer.ia3_l
    }
    assert set(layers) == set(expected), "the output adapts exactly the expected modules"
    for name, layer in layers.items():
        assert layer.is_feedforward == (expected[name].shape[0] == 1), name
        layer.ia3_l["default"].data = expected[name].clone()
    return causal_logits(model, ids)


def _check_output(trained, model_name, out: Path, expected: dict[str, torch.Tensor], what: str) -> None:
    """OUT's vectors are the reference rounded once; PEFT loads OUT and gives the reference's logits."""
    base = trained.load_base(model_name)
    state = load_file(out / "adapter_model.safetensors")
    assert set(state) == {ia3_key(name) for name in expected}, what
    for name, scales in expected.items():
        assert state[ia3_key(name)].dtype == torch.float32, what
        assert_close_explained(state[ia3_key(name)], scales, EPS32, 2**-40, f"{what}: {name}")
    ids = trained.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    reference = _reference_logits(base, out, expected, ids)
    logits = causal_logits(quiet_peft_model(copy.deepcopy(base), out), ids)
    assert_close_explained(logits, reference, 0.0, logit_tolerance(reference), f"{what}: logits")


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
def test_every_method_loads_in_peft_with_the_reference_logits(trained, model_name, method, tmp_path, capsys):
    expert, anti = (trained.adapter(model_name, "ia3", role) for role in ("expert", "anti"))
    base = trained.load_base(model_name)
    plus, minus = _peft_vectors(base, expert), _peft_vectors(base, anti)
    assert any(v.shape[0] == 1 for v in plus.values()) and any(v.shape[1] == 1 for v in plus.values())
    code, err = _run(capsys, expert, anti, "-o", tmp_path / "out", "--lam", "0.6,1.5", "--method", method)
    assert code == 0, err
    assert f"{len(plus)} (IA)³ vectors: {len(plus)} merged; 0 copied from the expert" in err, err
    for lam in (0.6, 1.5):
        out = tmp_path / f"out-lam{lam:g}"
        _check_output(
            trained, model_name, out, _reference(plus, [minus], [lam], method), f"{model_name} {method} {lam}"
        )
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "IA3" and config["target_modules"] == sorted(plus)
        assert config["feedforward_modules"] == sorted(n for n, v in plus.items() if v.shape[0] == 1)
        meta = read_header(out / "adapter_model.safetensors").metadata
        assert (meta["extsub.method"], meta["extsub.format"], meta["extsub.lam"]) == (method, "ia3", f"[{lam:g}]")


def test_several_anti_experts_and_modules_on_one_side_only(trained, tmp_path, capsys):
    expert, anti = (trained.adapter("llama", "ia3", role) for role in ("expert", "anti"))
    base = trained.load_base("llama")
    up = "model.layers.0.mlp.up_proj"  # (out, 1) = (64, 1): only in the second anti-expert
    gone = "model.layers.1.self_attn.k_proj"  # only in the expert
    state = {k: 2 - v for k, v in load_file(anti / "adapter_model.safetensors").items() if gone not in k}  # d → −d
    state[ia3_key(up)] = 1 + 0.2 * torch.randn(64, 1)
    modules = sorted(k.removeprefix("base_model.model.").removesuffix(".ia3_l") for k in state)
    feedforward = [m for m in modules if m.endswith("down_proj")]
    second = copy_adapter(  # modules by full name, so PEFT adapts exactly the saved vectors
        anti,
        tmp_path / "anti2",
        tensors=lambda _: state,
        config=lambda c: {**c, "target_modules": modules, "feedforward_modules": feedforward},
    )
    plus, minus, minus2 = (_peft_vectors(base, folder) for folder in (expert, anti, second))
    assert up in minus2 and gone not in minus2
    for method in ("ext-sub", "sub"):
        out = tmp_path / f"out-{method}"
        code, err = _run(capsys, expert, anti, second, "-o", out, "--lam", "1:0.5", "--method", method)
        assert code == 0, err
        _check_output(trained, "llama", out, _reference(plus, [minus, minus2], [1.0, 0.5], method), method)
        only = "nothing under ext-sub" if method == "ext-sub" else "added as −λ·d⁻"
        assert f"1 only in anti-experts, {only}" in err, err
        config = json.loads((out / "adapter_config.json").read_text())
        assert up in config["target_modules"] and up not in config["feedforward_modules"]


def test_base_folds_the_merged_vectors_into_the_weights(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    for model_name in ("llama", "gpt2"):  # GPT-2: Conv1D weights stored (in, out), and c_attn has a bias
        expert, anti = (trained.adapter(model_name, "ia3", role) for role in ("expert", "anti"))
        base_folder = trained.base(model_name)
        adapter_out, full_out = tmp_path / f"{model_name}-adapter", tmp_path / f"{model_name}-full"
        for out, extra in ((adapter_out, []), (full_out, ["--base", base_folder])):
            code, err = _run(capsys, expert, anti, "-o", out, "--lam", "0.8", *extra)
            assert code == 0, err
        assert (full_out / "config.json").is_file() and (full_out / "tokenizer.json").is_file()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = AutoModelForCausalLM.from_pretrained(full_out).eval()
        ids = trained.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        reference = causal_logits(quiet_peft_model(trained.load_base(model_name), adapter_out), ids)
        assert_close_explained(causal_logits(full, ids), reference, 0.0, logit_tolerance(reference), model_name)
        base_logits = causal_logits(trained.load_base(model_name), ids)
        assert (reference - base_logits).abs().max() > 1e-2, "the merged vectors change the model"


def test_dtype_hub_id_and_loaded_objects(trained, tmp_path, capsys, offline_cache):
    expert, anti = (trained.adapter("llama", "ia3", role) for role in ("expert", "anti"))
    files = {name: (expert / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    make_hub_cache(offline_cache, "org/ia3-expert", files, COMMIT)
    assert _run(capsys, "org/ia3-expert", anti, "-o", tmp_path / "hub", "-q", "--dtype", "bfloat16")[0] == 0
    hub = load_file(tmp_path / "hub" / "adapter_model.safetensors")
    report = merge(load_adapter(expert), load_adapter(anti), tmp_path / "objects", lam=1.0, dtype="bfloat16")
    assert "(IA)³ vectors" in report.summary()
    objects = load_file(tmp_path / "objects" / "adapter_model.safetensors")
    assert hub.keys() == objects.keys() and all(torch.equal(hub[k], objects[k]) for k in hub)
    assert all(t.dtype == torch.bfloat16 for t in hub.values())


# --- bad inputs: exit 2, one line, nothing written -----------------------------------------

V0 = ia3_key("model.layers.0.self_attn.v_proj")


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[3, 0] = float("nan")
    return t


# name: (build (expert, anti, extra args) from the fixture folders, expected parts of the message)
BAD = {
    "missing config": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", config=lambda c: None), []),
        ["bad: (IA)³ adapter weights with no adapter_config.json", "feedforward_modules"],
    ),
    "corrupt config": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", config=lambda c: "{not json"), []),
        ["bad/adapter_config.json: unreadable adapter config"],
    ),
    "bare file without config": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", bare=True), []),
        ["bad/adapter.safetensors: (IA)³ adapter weights with no adapter_config.json"],
    ),
    "NaN": (
        lambda f, x: (x["expert"], copy_adapter(x["anti"], f / "bad", tensors=lambda s: {**s, V0: _nan(s[V0])}), []),
        ["bad/adapter_model.safetensors", "v_proj.ia3_l contains NaN or Inf (1 value"],
    ),
    "feedforward shape the config contradicts": (
        lambda f, x: (
            x["expert"],
            copy_adapter(x["anti"], f / "bad", config=lambda c: {**c, "feedforward_modules": []}),
            [],
        ),
        ["down_proj.ia3_l is [1, 64], a feedforward (1, in) vector, but", "does not list it in feedforward_modules"],
    ),
    "a vector that is no vector": (
        lambda f, x: (
            x["expert"],
            copy_adapter(x["anti"], f / "bad", tensors=lambda s: {**s, V0: s[V0].repeat(1, 2)}),
            [],
        ),
        ["v_proj.ia3_l: has shape [32, 2], expected (out_features, 1)"],
    ),
    "mixed PEM types": (
        lambda f, x: (x["expert"], x["prefix"], []),
        ["is a prefix-tuning adapter but the expert", "is a (IA)³ adapter", "one PEM type"],
    ),
    "a LoRA format": (lambda f, x: (x["expert"], x["anti"], ["--format", "lora"]), ["--format lora does not apply"]),
    "max rank": (lambda f, x: (x["expert"], x["anti"], ["--max-rank", "2"]), ["(IA)³ adapters have no rank"]),
    "a .safetensors OUT": (
        lambda f, x: (x["expert"], x["anti"], ["-o", f.parent / "out" / "merged.safetensors"]),
        ["the ia3 format writes a PEFT adapter folder", "give a folder OUT"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_errors_and_nothing_is_written(case, trained, tmp_path, capsys):
    folder = tmp_path / "in"
    sources = {
        "expert": trained.adapter("llama", "ia3", "expert"),
        "anti": trained.adapter("llama", "ia3", "anti"),
        "prefix": trained.adapter("llama", "prefix", "anti"),
    }
    paths = {}
    for name, source in sources.items():
        paths[name] = copy_adapter(source, folder / name)
    build, message = BAD[case]
    expert, anti, extra = build(folder, paths)
    before = hashes(folder)
    out = tmp_path / "out" / "merged"
    argv = [expert, anti, *extra] if "-o" in extra else [expert, anti, "-o", out, *extra]
    code, err = _run(capsys, *argv)
    assert_one_line_error(code, err, EXIT_BAD_INPUT, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"
    assert not leftovers(tmp_path)
    assert hashes(folder) == before, "inputs are never modified"
