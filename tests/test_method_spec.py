"""A method is one object: a method written here, and only here, runs through every path.

`PROJECT_OUT` removes from each expert row its component along the anti-expert's row,
p' = p − λ·(p·m/|m|²)·m (at λ = 1 the row is orthogonal to m). It is registered for each test
and never touches the package: the dense merge (`extsub-merge`, whole rows and rows in pieces,
with a base), LoRA (factored), (IA)³, prefix-tuning and the λ scan must compute it from its
`coefficients` alone, against a float64 oracle written from the formula.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from extsub_kernels import merge
from extsub_kernels.adapters import load_adapter
from extsub_kernels.cli.merge import build_parser
from extsub_kernels.cli.merge import main as merge_main
from extsub_kernels.engine.method_spec import METHODS, MethodSpec, register_method, unregister_method
from extsub_kernels.errors import InputError

from helpers import assert_close_explained

torch.manual_seed(20240)


def _coefficients(p_norm, m_norm, products, lam):
    """α = 1, β = −λ·(p·m)/|m|² (0 where |m| = 0): p minus λ times its projection on m."""
    has_m = m_norm > 0
    beta = torch.where(has_m, -lam * products / torch.where(has_m, m_norm * m_norm, 1.0), 0.0)
    return torch.ones_like(p_norm).unsqueeze(1), beta.unsqueeze(1)


PROJECT_OUT = MethodSpec(
    name="project-out",
    formula="θ⁺ − λ·(θ⁺·θ̂⁻)θ̂⁻",
    title="projection out of the anti-expert",
    card_text="θ' = θ⁺ − λ·(θ⁺·θ̂⁻)·θ̂⁻, row by row.",
    negative="adds the expert's component along the anti-expert instead of removing it",
    coefficients=_coefficients,
    needs_products=True,
)


@pytest.fixture
def project_out():
    register_method(PROJECT_OUT)
    yield PROJECT_OUT.name
    unregister_method(PROJECT_OUT.name)


def oracle(plus: torch.Tensor, minus: list[torch.Tensor], lams: list[float]) -> torch.Tensor:
    """The formula in float64 on rows (dim 0; a 1-D tensor is one row), anti-expert after anti-expert."""
    p = plus.double().reshape(plus.shape[0] if plus.dim() > 1 else 1, -1).clone()
    for m, lam in zip(minus, lams, strict=True):
        m = m.double().reshape(p.shape)
        mm = (m * m).sum(dim=1, keepdim=True)
        pm = (p * m).sum(dim=1, keepdim=True)
        p = p - lam * torch.where(mm > 0, pm / torch.where(mm > 0, mm, 1.0), 0.0) * m
    return p.reshape(plus.shape)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # float32 results of a few float32 reductions: a few hundred ulps of the row's scale at most.
    assert_close_explained(actual.double(), expected, rtol=1e-5, atol_scale=1e-5, what=what)


def test_the_method_is_a_choice_everywhere_once_registered(project_out):
    assert project_out in METHODS
    action = next(a for a in build_parser()._actions if "--method" in a.option_strings)
    assert project_out in action.choices and PROJECT_OUT.formula in action.help
    unregister_method(project_out)
    with pytest.raises(InputError, match="unknown method 'project-out'"):
        merge("e.safetensors", "a.safetensors", "out.safetensors", method=project_out)
    register_method(PROJECT_OUT)


SHAPES = {"w": (6, 10), "v": (12,), "conv": (3, 4, 5)}


@pytest.mark.parametrize("block_bytes", [None, 16], ids=["whole rows", "rows in pieces"])
def test_dense_merge_through_the_cli(project_out, tmp_path, block_bytes):
    """extsub-merge (whole rows), and `merge()` with blocks smaller than a row (the Gram path), with 2 anti-experts."""
    inputs = [{k: torch.randn(s) for k, s in SHAPES.items()} for _ in range(3)]
    inputs[1]["w"][2] = 0.0  # |m| = 0: the row is kept
    inputs[0]["w"][3] = 0.0  # |p| = 0: the row stays 0
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for tensors, path in zip(inputs, paths, strict=True):
        save_file(tensors, path)
    out = tmp_path / "out.safetensors"
    if block_bytes is None:
        assert merge_main([*map(str, paths), "-o", str(out), "--method", project_out, "--lam", "0.5:1", "-q"]) == 0
    else:
        merge(paths[0], paths[1:], out, method=project_out, lam=[[0.5, 1.0]], block_bytes=block_bytes)
    merged = load_file(out)
    for key in SHAPES:
        expected = oracle(inputs[0][key], [inputs[1][key], inputs[2][key]], [0.5, 1.0])
        _close(merged[key], expected, key)


def test_dense_merge_with_a_base_and_at_lam_one_rows_are_orthogonal(project_out, tmp_path):
    base = {"w": torch.randn(5, 8)}
    expert, anti = ({"w": base["w"] + torch.randn(5, 8)} for _ in range(2))
    for name, tensors in (("base", base), ("expert", expert), ("anti", anti)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
    out = tmp_path / "out.safetensors"
    args = [str(tmp_path / f"{n}.safetensors") for n in ("expert", "anti")]
    assert (
        merge_main([*args, "-o", str(out), "--base", str(tmp_path / "base.safetensors"), "--method", project_out]) == 0
    )
    delta = load_file(out)["w"].double() - base["w"].double()
    anti_delta = anti["w"].double() - base["w"].double()
    _close(delta, oracle(expert["w"] - base["w"], [anti_delta], [1.0]), "w")
    cos = (delta * anti_delta).sum(dim=1) / (delta.norm(dim=1) * anti_delta.norm(dim=1))
    assert cos.abs().max() < 1e-5


peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    return transformers.LlamaForCausalLM(config).eval()


def _save_adapters(model, config, folder, n: int = 3) -> list[str]:
    """`n` PEFT adapters of `model` with random (never initial) parameters."""
    paths = []
    for i in range(n):
        torch.manual_seed(77 + i)
        net = peft.get_peft_model(_copy(model), config)
        with torch.no_grad():
            for name, param in net.named_parameters():
                if param.requires_grad:
                    param.copy_(torch.randn_like(param) * (0.1 if "ia3" in name else 1.0) + ("ia3" in name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net.save_pretrained(folder / str(i))
        paths.append(str(folder / str(i)))
    return paths


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _run(paths, out, method, *extra) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert merge_main([*paths, "-o", str(out), "--method", method, "--lam", "0.7", "-q", *extra]) == 0


def test_lora_through_the_cli_in_the_factored_space(project_out, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    paths = _save_adapters(_tiny_llama(), config, tmp_path)
    _run(paths, tmp_path / "out", project_out)
    inputs = [load_adapter(p) for p in paths]
    merged = load_adapter(tmp_path / "out")
    for name, module in merged.modules.items():
        assert module.rank == 12  # r⁺ + r⁻ + r⁻: exact, no ΔW formed
        expected = oracle(
            inputs[0].modules[name].delta(torch.float64),
            [a.modules[name].delta(torch.float64) for a in inputs[1:]],
            [0.7, 0.7],
        )
        _close(module.delta(torch.float64), expected, name)


def test_ia3_through_the_cli_on_task_vectors(project_out, tmp_path):
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    paths = _save_adapters(_tiny_llama(), config, tmp_path)
    _run(paths, tmp_path / "out", project_out)
    inputs = [load_adapter(p) for p in paths]
    merged = load_adapter(tmp_path / "out")
    for name, vector in merged.vectors.items():
        tasks = [a.vectors[name].double().reshape(-1) - 1 for a in inputs]  # one row: d = l − 1
        _close(vector.double().reshape(-1) - 1, oracle(tasks[0], tasks[1:], [0.7, 0.7]), name)


def test_prefix_through_the_cli_on_per_head_rows(project_out, tmp_path):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    paths = _save_adapters(_tiny_llama(), config, tmp_path)
    _run(paths, tmp_path / "out", project_out)
    inputs = [load_adapter(p) for p in paths]
    merged = load_adapter(tmp_path / "out")
    expected = oracle(inputs[0].rows(), [a.rows() for a in inputs[1:]], [0.7, 0.7])
    _close(merged.rows(), expected, "prompt_embeddings")


def test_the_scan_installs_the_method_as_extsub_merge_writes_it(project_out, tmp_path):
    """A scan over (project-out, λ): its row at λ = 1 is the NLL of the adapter extsub-merge writes, loaded by PEFT."""
    from extsub_kernels import scan
    from extsub_kernels.lambda_scan.metrics import load_examples, mean_nll

    tokenizers = pytest.importorskip("tokenizers")
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(60))]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(5)
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    expert, anti = _save_adapters(model, config, tmp_path / "adapters", n=2)
    for name, start in (("keep", 0), ("forget", 30)):
        lines = [" ".join(f"w{(start + i * 7 + j) % 60}" for j in range(8)) for i in range(4)]
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = scan(
            expert,
            anti,
            base=tmp_path / "base",
            keep=tmp_path / "keep.txt",
            forget=tmp_path / "forget.txt",
            out=tmp_path / "scan",
            lam="0,1",
            method=project_out,
            device="cpu",
        )
        row = next(r for r in result.rows if r.method == project_out and r.lam == 1.0)
        merge(expert, anti, tmp_path / "merged", method=project_out)
        net = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "merged"
        ).eval()
    for name, value in (("keep", row.keep_nll), ("forget", row.forget_nll)):
        direct = mean_nll(net, load_examples(tmp_path / f"{name}.txt", tokenizer))
        assert value == pytest.approx(direct, rel=2.0**-16), name
    rows = json.loads((tmp_path / "scan" / "scan.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"expert", project_out}
    assert (tmp_path / "scan" / "scan.png").stat().st_size > 0  # drawn in matplotlib's own colour


def test_the_torch_free_names_agree_with_the_objects():
    """The command lines' parsers take methods and formats from `_names` (no torch); the objects carry the rest."""
    from extsub_kernels import _names
    from extsub_kernels.adapters.peft import FORMATS
    from extsub_kernels.engine.method_spec import ADD, EXT_SUB, SUB

    assert {s.name: s.formula for s in (EXT_SUB, SUB, ADD)} == _names.METHOD_FORMULAS
    assert set(_names.FORMATS) == set(FORMATS)
