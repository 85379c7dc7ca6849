"""extsub-merge seen from a terminal: --dry-run, --report, --verbose, --config recipes and what outputs say about
themselves (model card, recipe, metadata, config.json)."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from extsub_kernels.cli import EXIT_BAD_INPUT, main

from checkpoints import SHAPES, hashes, leftovers, random_delta, save
from helpers import assert_one_line_error


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    return (
        folder,
        save(folder / "expert.safetensors", random_delta(SHAPES)),
        save(folder / "anti.safetensors", random_delta(SHAPES)),
    )


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _same_bytes(a, b) -> bool:
    """Every tensor of two safetensors files is the same, byte for byte."""
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)


def test_dry_run_prints_each_tensor_and_the_files_and_writes_nothing(tmp_path, inputs, capsys):
    _, e, a = inputs
    before = hashes(tmp_path)
    code, out, err = _run(
        capsys, e, a, "-o", tmp_path / "merged", "--lam", "0.5,1", "--on-missing", "skip", "--dry-run"
    )
    assert code == 0 and out == "", "messages go to stderr; stdout carries only --report -"
    assert hashes(tmp_path) == before and not leftovers(tmp_path)
    assert "merged  model.layers.0.self_attn.q_proj.weight [40, 40] F32: in EXPERT and ANTI" in err
    assert (
        f"{tmp_path / 'merged-lam0.5'}:" in err and "model.safetensors  " in err and "README.md  (written after" in err
    )
    assert (
        err.rstrip().splitlines()[-1].startswith("extsub-merge: dry run: 6 tensors each") or "dry run: 2 outputs" in err
    )
    assert "nothing was written" in err.rstrip().splitlines()[-1]


def test_dry_run_exits_2_with_the_error_a_real_run_gives(tmp_path, inputs, capsys):
    _, e, _ = inputs
    anti = save(tmp_path / "bad.safetensors", random_delta(SHAPES | {"lm_head.weight": (96, 40)}))
    code, _, err = _run(capsys, e, anti, "-o", tmp_path / "out", "--dry-run")
    assert_one_line_error(code, err, EXIT_BAD_INPUT, ["shape mismatch for tensor 'lm_head.weight'"])
    assert not (tmp_path / "out").exists()


def test_report_dash_puts_the_record_alone_on_stdout(tmp_path, inputs, capsys):
    _, e, a = inputs
    code, out, err = _run(capsys, e, a, "-o", tmp_path / "out.safetensors", "--report", "-")
    record = json.loads(out)
    assert code == 0 and record["command"] == f"extsub-merge {e} {a} -o {tmp_path / 'out.safetensors'} --report -"
    assert "extsub-merge: 6 tensors" in err


def test_verbose_prints_one_line_per_dense_tensor_with_its_statistics(tmp_path, inputs, capsys):
    _, e, a = inputs
    code, _, err = _run(capsys, e, a, "-o", tmp_path / "out.safetensors", "-v")
    lines = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    tensors = [line for line in lines if line.split()[0] in ("merged", "copied")]
    assert code == 0 and len(tensors) == len(SHAPES), err
    q = next(line for line in tensors if "q_proj" in line)
    assert "40 rows" in q and "cos mean" in q and "quartiles" in q and "deficiency share" in q and "at λ=1" in q
    assert any(line.startswith("layout: ") for line in lines)


def test_a_recipe_reruns_an_output_byte_for_byte(tmp_path, inputs, capsys):
    _, e, a = inputs
    assert _run(capsys, e, a, "-o", tmp_path / "first", "--lam", "0.5,2", "--dtype", "bfloat16", "-q")[0] == 0
    recipe = tmp_path / "first-lam2" / "extsub_recipe.yaml"
    written = yaml.safe_load(recipe.read_text())
    assert written["lam"] == 2.0 and written["dtype"] == "bfloat16" and written["expert"] == str(e.absolute())
    code, _, err = _run(capsys, "--config", recipe, "-o", tmp_path / "again")
    assert code == 0, err
    assert _same_bytes(tmp_path / "first-lam2" / "model.safetensors", tmp_path / "again" / "model.safetensors")
    meta = safe_open(str(tmp_path / "again" / "model.safetensors"), "pt").metadata()
    assert meta["extsub.recipe"] == (tmp_path / "again" / "extsub_recipe.yaml").read_text()
    assert meta["extsub.command"] == f"extsub-merge --config {recipe} -o {tmp_path / 'again'}"


def test_flags_override_the_recipe(tmp_path, inputs, capsys):
    _, e, a = inputs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"expert": str(e), "anti": str(a), "out": str(tmp_path / "r-out"), "lam": 3}))
    assert _run(capsys, "--config", recipe, "--lam", "0.5", "-q")[0] == 0
    meta = safe_open(str(tmp_path / "r-out" / "model.safetensors"), "pt").metadata()
    assert json.loads(meta["extsub.lam"]) == [0.5]
    assert _run(capsys, "--config", recipe, a, e, "-o", tmp_path / "swapped", "-q")[0] == 0
    assert json.loads(safe_open(str(tmp_path / "swapped" / "model.safetensors"), "pt").metadata()["extsub.lam"]) == [3]


def test_a_bad_recipe_is_one_line_exit_2(tmp_path, inputs, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("expert: e\nanti: a\nlamda: 1\n")
    code, _, err = _run(capsys, "--config", recipe, "-o", tmp_path / "out")
    assert_one_line_error(code, err, EXIT_BAD_INPUT, [str(recipe), "unknown key 'lamda'", "did you mean 'lam'?"])


def test_without_out_or_inputs_from_either_place_usage_exits_2(tmp_path, inputs, capsys):
    _, e, a = inputs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"expert": str(e), "anti": [str(a)]}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(recipe)])
    assert (
        exit_info.value.code == EXIT_BAD_INPUT
        and "give -o OUT (or out: in the --config recipe)" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["-o", str(tmp_path / "out")])
    assert "give EXPERT and at least one ANTI" in capsys.readouterr().err


def test_negative_lambda_is_allowed_with_a_warning(tmp_path, inputs, capsys):
    _, e, a = inputs
    code, _, err = _run(capsys, e, a, "-o", tmp_path / "out.safetensors", "--lam=-0.5")
    assert code == 0 and "extsub-merge: warning: λ = -0.5 is negative: ext-sub then adds the deficiency" in err


def test_a_run_that_merges_nothing_exits_2_naming_what_did_not_match(tmp_path, capsys):
    e = save(tmp_path / "e.safetensors", {"x.weight": torch.ones(2, 2)})
    a = save(tmp_path / "a.safetensors", {"y.weight": torch.ones(2, 2)})
    code, _, err = _run(capsys, e, a, "-o", tmp_path / "out", "--on-missing", "skip")
    assert_one_line_error(
        code, err, EXIT_BAD_INPUT, ["share no tensor name", "'x.weight'", "'y.weight'", "Nothing would be merged"]
    )
    ints = save(tmp_path / "i.safetensors", {"ids": torch.arange(3)})
    code, _, err = _run(capsys, ints, ints, "-o", tmp_path / "out")
    assert_one_line_error(
        code, err, EXIT_BAD_INPUT, ["share 1 tensor name(s) but none is a float tensor", "'ids' is I64"]
    )
    assert not (tmp_path / "out").exists()


def test_errors_name_inputs_by_the_path_given(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "exp" / "model.safetensors", random_delta(SHAPES))
    save(tmp_path / "ant" / "model.safetensors", random_delta(SHAPES | {"lm_head.weight": (96, 40)}))
    code, _, err = _run(capsys, "exp/", "ant", "-o", "out")
    assert_one_line_error(
        code, err, EXIT_BAD_INPUT, ["in EXPERT (exp/model.safetensors)", "in ANTI (ant/model.safetensors)"]
    )


def test_a_recipe_reruns_an_adapter_merge_byte_for_byte(tmp_path, llama, capsys):
    _, paths = llama
    code, _, err = _run(capsys, paths["expert"], paths["anti"], "-o", tmp_path / "ad", "--lam", "0.5,1.5", "-q")
    assert code == 0, err
    recipe = tmp_path / "ad-lam1.5" / "extsub_recipe.yaml"
    assert _run(capsys, "--config", recipe, "-o", tmp_path / "again", "-q")[0] == 0
    weights = "adapter_model.safetensors"
    assert _same_bytes(tmp_path / "ad-lam1.5" / weights, tmp_path / "again" / weights)
    assert (tmp_path / "ad-lam1.5" / "adapter_config.json").read_text() == (
        tmp_path / "again" / "adapter_config.json"
    ).read_text()


def test_a_recipe_reruns_a_full_model_merge_with_a_base_byte_for_byte(tmp_path, capsys):
    base = random_delta(SHAPES)
    full = [{k: base[k] + d for k, d in random_delta(SHAPES).items()} for _ in range(2)]
    folders = [
        save(tmp_path / name / "model.safetensors", t).parent for name, t in zip("bea", [base, *full], strict=True)
    ]
    argv = [folders[1], folders[2], "--base", folders[0], "-o", tmp_path / "full", "--dtype", "bfloat16", "-q"]
    assert _run(capsys, *argv)[0] == 0
    assert _run(capsys, "--config", tmp_path / "full" / "extsub_recipe.yaml", "-o", tmp_path / "again", "-q")[0] == 0
    assert _same_bytes(tmp_path / "full" / "model.safetensors", tmp_path / "again" / "model.safetensors")
