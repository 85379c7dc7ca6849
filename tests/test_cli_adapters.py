"""`extsub-merge` with LoRA adapters, end to end against the real clients (PEFT, transformers; tiny models, CPU).

Adapters come from PEFT itself (peft_fixtures): expert and anti-experts differ in r, alpha,
rsLoRA, patterns and target modules. Every adapter output is loaded with
`PeftModel.from_pretrained`, every full model with `AutoModelForCausalLM.from_pretrained`,
and their logits are compared with the base model whose weights received ΔW' from the dense
op (float64, on PEFT's own ΔW). Tolerance: `peft_fixtures.logit_tolerance`, 2⁻¹⁴ of
max|logits| (≈ 512 eps32; the derivation is there); ΔW' itself to 64 eps32 of its largest
entry (float32 outputs of a float64-accurate computation).
"""

import json
import re
import shutil
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from extsub_kernels import ext_sub_reference
from extsub_kernels.adapters import lora, merge_adapters
from extsub_kernels.adapters.formats import to_delta, to_dense_lora
from extsub_kernels.adapters.peft import load_adapter
from extsub_kernels.cli import EXIT_BAD_INPUT, main
from extsub_kernels.io import CheckpointReader
from extsub_kernels.io.reader import read_header

from checkpoints import hashes, leftovers, make_hub_cache, save
from helpers import assert_close_explained, assert_one_line_error, copy_adapter, lazy_module
from peft_fixtures import (
    EPS32,
    SEED,
    check_logits,
    expected_deltas,
    make_adapters,
    peft_model,
    tiny_gpt2,
    tiny_llama,
    with_deltas,
)

peft = lazy_module("peft")
transformers = lazy_module("transformers")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _summary(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if "LoRA modules:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _anti_only(paths, antis=("anti",)) -> int:
    expert = set(load_adapter(paths["expert"]).modules)
    return len({n for a in antis for n in load_adapter(paths[a]).modules} - expert)


def _load_delta(out: Path) -> dict[str, torch.Tensor]:
    files = [out] if out.suffix == ".safetensors" else sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _check_output(base, out: Path, output_format: str, expected, transposed: bool, what: str) -> None:
    """The output loads in the real client and gives the logits of the base model + ΔW'."""
    if output_format == "delta":
        deltas = _load_delta(out)
        assert set(deltas) == {f"{name}.weight" for name in expected}, what
        got = {key.removesuffix(".weight"): (d.T if transposed else d) for key, d in deltas.items()}
        for name, delta in got.items():
            assert_close_explained(delta, expected[name], 0.0, 64 * EPS32, f"{what} {name}")
        model = with_deltas(base, got, transposed)
    else:
        model = peft_model(base, out)
    check_logits(model, with_deltas(base, expected, transposed), what)


# --- every format, both architectures ----------------------------------------------------


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_every_format_through_the_cli(model_name, request, tmp_path, capsys):
    base, paths = request.getfixturevalue(model_name)
    transposed = model_name == "gpt2"  # Conv1D stores (in, out)
    dropped = _anti_only(paths)
    assert dropped > 0, "the fixtures have modules only in the anti-expert"
    for output_format, lams, out in (
        ("lora", [0.3, 1.0], tmp_path / "lora"),  # a λ list: one output per λ, suffix -lam<λ>
        ("dense-lora", [0.7], tmp_path / "dense"),
        ("delta", [0.7], tmp_path / "delta.safetensors"),
    ):
        code, err = _run(
            capsys,
            paths["expert"],
            paths["anti"],
            "-o",
            out,
            "--format",
            output_format,
            "--lam",
            ",".join(map(str, lams)),
        )
        assert code == 0, err
        summary = _summary(err)
        assert f"{dropped} only in anti-experts, nothing under ext-sub" in summary, summary
        assert "tensors" in summary and re.search(r"[kMG]?B/s \|", summary) and "peak RSS" in summary, summary
        for lam in lams:
            path = out if len(lams) == 1 else out.with_name(f"{out.name}-lam{lam:g}")
            expected = expected_deltas(base, paths["expert"], [paths["anti"]], [lam], "ext-sub")
            _check_output(base, path, output_format, expected, transposed, f"{model_name} {output_format} λ={lam}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors", "dense", "lora-lam0.3", "lora-lam1"]


@pytest.mark.parametrize("method, sign", [("sub", "−"), ("add", "+")])
def test_sub_and_add_keep_anti_only_modules(method, sign, llama, tmp_path, capsys):
    base, paths = llama
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "out", "--method", method, "--lam", "0.6")
    assert code == 0, err
    assert f"{_anti_only(paths)} only in anti-experts, added as {sign}λ·ΔW⁻" in _summary(err)
    expected = expected_deltas(base, paths["expert"], [paths["anti"]], [0.6], method)
    _check_output(base, tmp_path / "out", "lora", expected, False, method)


def test_two_anti_experts_with_a_lam_per_anti_expert(llama, tmp_path, capsys):
    base, paths = llama
    code, err = _run(
        capsys, paths["expert"], paths["anti"], paths["anti2"], "-o", tmp_path / "out", "--lam", "0.5:1.5,1"
    )
    assert code == 0, err
    for lams, name in (([0.5, 1.5], "out-lam0.5_1.5"), ([1.0, 1.0], "out-lam1_1")):
        expected = expected_deltas(base, paths["expert"], [paths["anti"], paths["anti2"]], lams, "ext-sub")
        _check_output(base, tmp_path / name, "lora", expected, False, f"two anti-experts {lams}")
        meta = read_header(tmp_path / name / "adapter_model.safetensors").metadata
        assert json.loads(meta["extsub.lam"]) == lams and json.loads(meta["extsub.anti"]) == ["anti", "anti2"]
        assert meta["extsub.format"] == "lora"


# --- the full model with --base ----------------------------------------------------------


def _save_base(model, folder: Path, *, strip_prefix: str = "") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    if strip_prefix:  # as the original GPT-2 checkpoints on the hub are stored: without the head's prefix
        state = load_file(folder / "model.safetensors")
        save_file(
            {k.removeprefix(strip_prefix): v for k, v in state.items()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
    return folder


def _from_pretrained(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_base_writes_the_full_merged_model(model_name, request, tmp_path, capsys):
    base, paths = request.getfixturevalue(model_name)
    transposed = model_name == "gpt2"
    base_dir = _save_base(base, tmp_path / "base", strip_prefix="transformer." if transposed else "")
    before = hashes(base_dir)
    out = tmp_path / "merged"
    code, err = _run(
        capsys,
        paths["expert"],
        paths["anti"],
        "--base",
        base_dir,
        "-o",
        out,
        "--lam",
        "0.8",
        "--max-shard-size",
        "40kB",
    )
    assert code == 0, err
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert {p.name for p in base_dir.glob("*.json")} <= {p.name for p in out.iterdir()}, "config files from BASE"
    written = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(written) == set(load_file(base_dir / "model.safetensors")), "the base's tensor names, every one"
    expected = expected_deltas(base, paths["expert"], [paths["anti"]], [0.8], "ext-sub")
    check_logits(_from_pretrained(out), with_deltas(base, expected, transposed), f"{model_name} --base")
    assert hashes(base_dir) == before and not leftovers(tmp_path)


@pytest.fixture(scope="module")
def with_heads(tmp_path_factory):
    """LLaMA adapters with modules_to_save=["lm_head"], each head trained away from the base's."""
    torch.manual_seed(SEED)
    base = tiny_llama()

    def train_head(model) -> None:
        head = model.base_model.model.lm_head.modules_to_save["default"].weight
        with torch.no_grad():
            head.add_(0.05 * torch.randn_like(head))

    specs = {
        "expert": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        "anti": dict(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    paths = make_adapters(base, specs, tmp_path_factory.mktemp("heads"), train_head)
    heads = {
        name: load_file(Path(p) / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
        for name, p in paths.items()
    }
    return base, paths, heads


def test_modules_to_save_merge_as_task_vectors_with_base(with_heads, tmp_path, capsys):
    base, paths, heads = with_heads
    base_dir = _save_base(base, tmp_path / "base")
    code, err = _run(
        capsys, paths["expert"], paths["anti"], "--base", base_dir, "-o", tmp_path / "merged", "--lam", "1.5"
    )
    assert code == 0 and "warning" not in err, err
    assert "2 non-LoRA tensors merged as task vectors against BASE" in _summary(err)
    # PEFT's modules_to_save are full weights: θ = θ₀ + ΔW, so the head merges like a full model's tensor.
    theta0 = base.lm_head.weight.detach().double()
    expected_head = theta0 + ext_sub_reference(heads["expert"].double() - theta0, heads["anti"].double() - theta0, 1.5)
    written = load_file(tmp_path / "merged" / "model.safetensors")["lm_head.weight"]
    assert_close_explained(written, expected_head, 0.0, 64 * EPS32, "lm_head")
    expected = with_deltas(base, expected_deltas(base, paths["expert"], [paths["anti"]], [1.5], "ext-sub"), False)
    with torch.no_grad():
        expected.lm_head.weight.copy_(expected_head)
    check_logits(_from_pretrained(tmp_path / "merged"), expected, "--base with modules_to_save")


def test_modules_to_save_without_base_are_copied_or_left_out_with_a_warning(with_heads, tmp_path, capsys):
    _, paths, heads = with_heads
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "lora")
    assert code == 0 and "extsub-merge: warning: " in err and "copied to the result unchanged" in err, err
    assert torch.equal(
        load_file(tmp_path / "lora" / "adapter_model.safetensors")["base_model.model.lm_head.weight"], heads["expert"]
    )
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "delta.safetensors", "--format", "delta")
    assert code == 0 and "the delta format leaves them out" in err, err
    assert "2 non-LoRA tensors left out" in _summary(err) and "lm_head.weight" not in load_file(
        tmp_path / "delta.safetensors"
    )
    assert _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "quiet", "-q") == (0, "")


# --- inputs: hub ids, bare files ---------------------------------------------------------


def test_a_hub_id_of_an_adapter_from_the_offline_cache(llama, offline_cache, tmp_path, capsys):
    _, paths = llama
    files = {
        name: (Path(paths["expert"]) / name).read_bytes()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    make_hub_cache(offline_cache, "org/expert-adapter", files, COMMIT)
    before = hashes(offline_cache)
    assert _run(capsys, "org/expert-adapter", paths["anti"], "-o", tmp_path / "hub", "-q")[0] == 0
    assert _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "local", "-q")[0] == 0
    hub, local = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("hub", "local"))
    assert hub.keys() == local.keys() and all(torch.equal(hub[k], local[k]) for k in hub)
    assert read_header(tmp_path / "hub" / "adapter_model.safetensors").metadata["extsub.expert"] == "org/expert-adapter"
    assert hashes(offline_cache) == before


def test_bare_files_take_their_scaling_from_a_sibling_config_or_the_flags(llama, tmp_path, capsys):
    _, paths = llama
    # The anti-expert is r = 8, lora_alpha = 16 with rsLoRA: --lora-alpha 16 --rank 8 --rslora says the same.
    bare = tmp_path / "bare" / "anti.safetensors"
    bare.parent.mkdir()
    shutil.copyfile(Path(paths["anti"]) / "adapter_model.safetensors", bare)
    runs = {
        "folder": [paths["anti"]],
        "beside": [Path(paths["anti"]) / "adapter_model.safetensors"],  # adapter_config.json is its sibling
        "flags": [bare, "--lora-alpha", "16", "--rank", "8", "--rslora"],
    }
    for name, anti in runs.items():
        code, err = _run(capsys, paths["expert"], anti[0], "-o", tmp_path / name, "-q", *anti[1:])
        assert code == 0, err
    reference = load_file(tmp_path / "folder" / "adapter_model.safetensors")
    for name in ("beside", "flags"):
        got = load_file(tmp_path / name / "adapter_model.safetensors")
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), name


# --- --max-rank ---------------------------------------------------------------------------


def test_max_rank_reports_the_error_of_a_direct_svd(llama, tmp_path, capsys):
    _, paths = llama
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "out", "--max-rank", "3", "-v")
    assert code == 0, err
    listed = dict(re.findall(r"out: (\S+): relative truncation error (\S+)", err))
    exact = merge_adapters(load_adapter(paths["expert"]), load_adapter(paths["anti"]), 1.0)
    assert set(listed) == set(exact.modules)
    direct = {}
    for name, module in exact.modules.items():
        s = torch.linalg.svdvals(module.delta(torch.float64))  # the dense ΔW', never formed by the merge
        direct[name] = float(s[3:].norm() / s.norm())
        assert abs(float(listed[name]) - direct[name]) <= 1e-6 * max(direct[name], 1e-3), name  # printed to 6 digits
    worst, mean = re.search(r"max (\S+) \(\S+\), mean (\S+)", _summary(err)).groups()
    assert float(worst) == pytest.approx(max(direct.values()), rel=5e-3)  # printed to 3 digits
    assert float(mean) == pytest.approx(sum(direct.values()) / len(direct), rel=5e-3)
    assert max(m.rank for m in load_adapter(tmp_path / "out").modules.values()) == 3


# --- streaming: shards, and one module at a time ------------------------------------------


def test_dense_outputs_stream_into_shards_one_module_at_a_time(llama, tmp_path, capsys, monkeypatch):
    _, paths = llama
    merged = merge_adapters(load_adapter(paths["expert"]), load_adapter(paths["anti"]), 1.0)
    live: list[weakref.ref] = []
    most = [0]
    real_delta = lora.module_delta

    def tracked_delta(*args, **kwargs):
        most[0] = max(most[0], sum(ref() is not None for ref in live))
        result = real_delta(*args, **kwargs)
        live.append(weakref.ref(result))
        return result

    monkeypatch.setattr(lora, "module_delta", tracked_delta)
    code, err = _run(
        capsys,
        paths["expert"],
        paths["anti"],
        "-o",
        tmp_path / "dense",
        "--format",
        "dense-lora",
        "--max-shard-size",
        "20kB",
    )
    assert code == 0 and "PEFT's from_pretrained reads only an unsharded adapter_model.safetensors" in err, err
    assert len(live) == len(merged.modules) >= 8
    # A ΔW' is alive while it is computed, waits in the queue to the writer, or is written: never the whole output.
    assert most[0] <= 3, f"{most[0]} dense ΔW' alive at once"
    shards = sorted((tmp_path / "dense").glob("adapter_model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "dense" / "adapter_model.safetensors.index.json").is_file()
    with CheckpointReader(shards) as reader:
        expected, config = to_dense_lora(merged)
        assert set(reader.keys()) == set(expected) and all(torch.equal(reader.read(k), expected[k]) for k in expected)
    assert json.loads((tmp_path / "dense" / "adapter_config.json").read_text()) == json.loads(json.dumps(config))
    code, err = _run(
        capsys,
        paths["expert"],
        paths["anti"],
        "-o",
        tmp_path / "delta",
        "--format",
        "delta",
        "--max-shard-size",
        "20kB",
        "-q",
    )
    assert code == 0, err
    shards = sorted((tmp_path / "delta").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "delta" / "model.safetensors.index.json").is_file()
    with CheckpointReader(shards) as reader:
        expected = to_delta(merged)
        assert set(reader.keys()) == set(expected) and all(torch.equal(reader.read(k), expected[k]) for k in expected)


# --- bad inputs: exit 2, one line, nothing written, inputs untouched -----------------------


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _base(folder: Path, expert: Path, **replaced: tuple[int, ...]) -> Path:
    """A base checkpoint with a zero weight for each module of `expert`, some of them of other shapes."""
    modules = load_adapter(expert).modules
    shapes = {f"{n}.weight": (m.out_features, m.in_features) for n, m in modules.items()} | replaced
    return save(folder / "base" / "model.safetensors", {k: torch.zeros(shape) for k, shape in shapes.items()}).parent


# name: (how to build (expert, anti, extra args) in `folder`, expected parts of the message)
BAD = {
    "A without B": (
        lambda f, p: (
            p["expert"],
            copy_adapter(
                p["anti"], f / "bad", tensors=lambda s: {k: v for k, v in s.items() if "q_proj.lora_B" not in k}
            ),
            [],
        ),
        ["bad/adapter_model.safetensors", "q_proj has lora_A but no lora_B"],
    ),
    "shapes that do not chain": (
        lambda f, p: (
            p["expert"],
            copy_adapter(p["expert"], f / "bad", tensors=lambda s: {**s, Q_B: s[Q_B][:, :3].contiguous()}),
            [],
        ),
        ["bad/adapter_model.safetensors", "q_proj: lora_B (64, 3) and lora_A (4, 64) do not chain"],
    ),
    "adapters of different base models (names)": (
        lambda f, p: (
            copy_adapter(
                p["expert"], f / "bad_expert", config=lambda c: {**c, "base_model_name_or_path": "org/tiny-llama"}
            ),
            copy_adapter(p["anti"], f / "bad", config=lambda c: {**c, "base_model_name_or_path": "org/other-model"}),
            [],
        ),
        [
            "bad was trained on base model 'org/other-model' but the expert",
            "bad_expert on 'org/tiny-llama'",
            "--any-base-model",
        ],
    ),
    "adapters of different base models (shapes)": (
        lambda f, p: (
            p["expert"],
            copy_adapter(p["expert"], f / "bad", tensors=lambda s: {**s, Q_A: s[Q_A][:, :32].contiguous()}),
            [],
        ),
        ["q_proj: the expert", "adapts a (64, 64) weight but", "bad a (64, 32) one"],
    ),
    "missing config": (
        lambda f, p: (p["expert"], copy_adapter(p["anti"], f / "bad", config=lambda c: None), []),
        ["bad has no adapter_config.json", "scaling", "--lora-alpha"],
    ),
    "unreadable config": (
        lambda f, p: (p["expert"], copy_adapter(p["anti"], f / "bad", config=lambda c: "{not json"), []),
        ["bad/adapter_config.json: unreadable adapter config"],
    ),
    "bare file without scaling": (
        lambda f, p: (p["expert"], copy_adapter(p["anti"], f / "bad", bare=True), []),
        ["bad/adapter.safetensors: a bare adapter file with no adapter_config.json beside it", "--lora-alpha"],
    ),
    "scaling flags no input needs": (
        lambda f, p: (p["expert"], p["anti"], ["--lora-alpha", "8"]),
        ["every adapter here has one", "drop them"],
    ),
    "an adapter with a dense checkpoint": (
        lambda f, p: (p["expert"], save(f / "dense.safetensors", {"model.embed_tokens.weight": torch.zeros(4, 4)}), []),
        ["EXPERT", "is a PEFT adapter but ANTI", "dense.safetensors' is a dense checkpoint"],
    ),
    "--format with dense inputs": (
        lambda f, p: (
            save(f / "a.safetensors", {"w": torch.ones(2, 2)}),
            save(f / "b.safetensors", {"w": torch.ones(2, 2)}),
            ["--format", "delta"],
        ),
        ["--format (output_format) applies to adapter inputs", "a.safetensors' is a dense checkpoint"],
    ),
    "--max-rank with --format delta": (
        lambda f, p: (p["expert"], p["anti"], ["--format", "delta", "--max-rank", "2"]),
        ["applies to --format lora, not to --format delta"],
    ),
    "--max-rank 0": (
        lambda f, p: (p["expert"], p["anti"], ["--max-rank", "0"]),
        ["max_rank must be a positive integer, got 0"],
    ),
    "--base with --format": (
        lambda f, p: (p["expert"], p["anti"], ["--base", p["anti"], "--format", "lora"]),
        ["--base writes the full merged model"],
    ),
    "an adapter as BASE": (
        lambda f, p: (p["expert"], p["anti"], ["--base", p["anti2"]]),
        ["BASE", "anti2' is a PEFT adapter"],
    ),
    "BASE of another model": (
        lambda f, p: (
            p["expert"],
            p["anti"],
            ["--base", save(f / "base.safetensors", {"other.weight": torch.zeros(2)})],
        ),
        [
            "LoRA module model.layers.",
            "BASE has no tensor 'model.layers.",
            "is BASE the model the adapters were trained on?",
        ],
    ),
    "BASE with another shape": (
        lambda f, p: (
            p["expert"],
            p["anti"],
            ["--base", _base(f, p["expert"], **{"model.layers.0.self_attn.q_proj.weight": (64, 32)})],
        ),
        [
            "LoRA module model.layers.0.self_attn.q_proj: changes a 64×64 tensor",
            "BASE's model.layers.0.self_attn.q_proj.weight is [64, 32]",
        ],
    ),
    "a lora adapter into a .safetensors OUT": (
        lambda f, p: (p["expert"], p["anti"], ["-o", f.parent / "out" / "merged.safetensors"]),
        ["writes a PEFT adapter folder", "give a folder OUT"],
    ),
    "--max-shard-size with --format lora": (
        lambda f, p: (p["expert"], p["anti"], ["--max-shard-size", "1MB"]),
        ["applies to dense-lora, delta and --base outputs"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_inputs(case, llama, tmp_path, capsys):
    _, fixture_paths = llama
    folder = tmp_path / "in"
    for name, path in fixture_paths.items():  # inputs live under `folder`, hashed before and after
        shutil.copytree(path, folder / name)
    paths = {name: folder / name for name in fixture_paths}
    build, message = BAD[case]
    expert, anti, extra = build(folder, paths)
    before = hashes(folder)
    out = tmp_path / "out" / "merged"
    code, err = _run(capsys, expert, anti, "-o", out, *extra)
    assert_one_line_error(code, err, EXIT_BAD_INPUT, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"
    assert not leftovers(tmp_path)
    assert hashes(folder) == before, "inputs are never modified"


@pytest.mark.gpu
def test_cuda_materializes_the_same_deltas(llama, tmp_path, capsys):
    _, paths = llama
    for device in ("cpu", "cuda"):
        assert (
            _run(
                capsys,
                paths["expert"],
                paths["anti"],
                "-o",
                tmp_path / f"{device}.safetensors",
                "--format",
                "delta",
                "--device",
                device,
                "-q",
            )[0]
            == 0
        )
    cpu, cuda = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "cuda.safetensors")
    for key in cpu:
        assert_close_explained(cuda[key], cpu[key], 0.0, 64 * EPS32, key)


# --- biases trained with bias="all" / "lora_only" ----------------------------------------


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_merge_with_base(bias, tmp_path, capsys):
    """PEFT saves a LoRA layer's bias as `….c_attn.base_layer.bias`; BASE has it as `….c_attn.bias`."""
    torch.manual_seed(SEED)
    base = tiny_gpt2()

    def train_bias(model) -> None:
        for name, param in model.named_parameters():
            if name.endswith("c_attn.base_layer.bias"):
                with torch.no_grad():
                    param.add_(0.05 * torch.randn_like(param))

    spec = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias=bias)
    paths = make_adapters(base, {"expert": spec, "anti": spec}, tmp_path / "adapters", train_bias)
    saved = {n: load_file(Path(p) / "adapter_model.safetensors") for n, p in paths.items()}
    assert any(k.endswith("c_attn.base_layer.bias") for k in saved["expert"]), "PEFT's own naming of the bias"
    base_dir = _save_base(base, tmp_path / "base")
    code, err = _run(
        capsys, paths["expert"], paths["anti"], "--base", base_dir, "-o", tmp_path / "merged", "--lam", "1"
    )
    assert code == 0, err
    written = load_file(tmp_path / "merged" / "model.safetensors")
    for layer in range(2):
        suffix = f"h.{layer}.attn.c_attn.base_layer.bias"
        plus, minus = (next(v for k, v in s.items() if k.endswith(suffix)).double() for s in saved.values())
        theta0 = base.transformer.h[layer].attn.c_attn.bias.detach().double()
        expected = theta0 + ext_sub_reference(plus - theta0, minus - theta0, 1.0)
        got = written[f"transformer.h.{layer}.attn.c_attn.bias"]
        assert_close_explained(got, expected, 0.0, 64 * EPS32 * float(expected.abs().max()), f"layer {layer} bias")
    expected = with_deltas(base, expected_deltas(base, paths["expert"], [paths["anti"]], [1.0], "ext-sub"), True)
    with torch.no_grad():
        for layer in range(2):
            expected.transformer.h[layer].attn.c_attn.bias.copy_(written[f"transformer.h.{layer}.attn.c_attn.bias"])
    check_logits(_from_pretrained(tmp_path / "merged"), expected, f"--base with bias={bias!r}")


# --- --format delta from bare GPT-2 files: one layout rule for every kind of input ---------


@pytest.fixture(scope="module")
def bare_gpt2(tmp_path_factory):
    """GPT-2 adapters on c_attn and the square attn.c_proj, as folders and as bare files (no config at all)."""
    torch.manual_seed(SEED)
    folder = tmp_path_factory.mktemp("bare_gpt2")
    spec = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    paths = make_adapters(tiny_gpt2(), {"expert": spec, "anti": spec}, folder)
    bare = {name: copy_adapter(p, folder / f"bare_{name}", bare=True) for name, p in paths.items()}
    return paths, bare


def test_delta_from_bare_gpt2_files_is_laid_out_like_the_base_weights(bare_gpt2, tmp_path, capsys):
    paths, bare = bare_gpt2
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "ref.safetensors", "--format", "delta")
    assert code == 0, err
    reference = load_file(tmp_path / "ref.safetensors")
    assert reference["transformer.h.0.attn.c_attn.weight"].shape == (64, 192), "Conv1D stores (in, out)"
    scaling = ("--lora-alpha", "8", "--rank", "4")
    # No config: the Conv1D names decide, with a warning that names --transposed.
    code, err = _run(
        capsys, bare["expert"], bare["anti"], *scaling, "-o", tmp_path / "a.safetensors", "--format", "delta"
    )
    assert code == 0 and "warning" in err and "--transposed" in err, err
    got = load_file(tmp_path / "a.safetensors")
    assert set(got) == set(reference)
    for key in reference:  # the square c_proj too, which no shape check would catch
        assert torch.equal(got[key], reference[key]), key
    # --transposed is the first rule: no warning; --no-transposed gives nn.Linear's (out, in).
    code, err = _run(
        capsys,
        bare["expert"],
        bare["anti"],
        *scaling,
        "-o",
        tmp_path / "b.safetensors",
        "--format",
        "delta",
        "--transposed",
    )
    assert code == 0 and "warning" not in err, err
    assert all(torch.equal(t, reference[k]) for k, t in load_file(tmp_path / "b.safetensors").items())
    code, err = _run(
        capsys,
        bare["expert"],
        bare["anti"],
        *scaling,
        "-o",
        tmp_path / "c.safetensors",
        "--format",
        "delta",
        "--no-transposed",
    )
    assert code == 0 and "warning" not in err, err
    assert all(torch.equal(t, reference[k].T) for k, t in load_file(tmp_path / "c.safetensors").items())


def test_a_max_rank_card_states_the_rank_and_the_truncation_error(llama, tmp_path, capsys):
    _, paths = llama
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "out", "--max-rank", "3")
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    assert "per module, exact" not in card, "a truncated adapter is not the exact merge"
    assert "truncated to rank ≤ 3" in card
    worst = re.search(r"max (\S+) \((\S+)\)", _summary(err))
    assert f"relative truncation error (Frobenius) max {worst[1]} ({worst[2]})" in card
    assert "the exact merge's" in card  # why the table's change at λ is not this adapter's
    # Without --max-rank the card says the adapter is exact.
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "exact")
    assert code == 0 and "per module, exact" in (tmp_path / "exact" / "README.md").read_text(), err
