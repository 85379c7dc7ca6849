"""Model cards of folder outputs: Hugging Face front matter that parses, the facts of the run, and --force."""

import json
import warnings
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from extsub_kernels import AdapterOptions, merge
from extsub_kernels.errors import InputError
from extsub_kernels.io.outputs import GENERATED_MARK

from checkpoints import SHAPES, leftovers, random_delta, save


def _card(folder) -> tuple[dict, str]:
    """(front matter, body) of a README.md written by extsub-merge."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n"), text[:80]
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_a_task_vector_folder_gets_a_card_with_the_run_s_facts(tmp_path):
    e = save(tmp_path / "in" / "e.safetensors", random_delta(SHAPES))
    a = save(tmp_path / "in" / "a.safetensors", random_delta(SHAPES))
    merge(e, a, tmp_path / "out", lam=0.5, command="extsub-merge e a -o out --lam 0.5")
    front, body = _card(tmp_path / "out")
    assert front == {"tags": ["extsub", "merge", "ext-sub"]}, "no library loads task vectors as they are"
    assert GENERATED_MARK in body and "# out" in body and "at λ = 0.5" in body and "arXiv:2308.08090" in body
    assert f"- EXPERT: `{e}`" in body and f"- ANTI: `{a}`" in body
    assert "```bash\nextsub-merge e a -o out --lam 0.5\n```" in body
    table = [line for line in body.splitlines() if line.startswith("| self_attn.q_proj |")]
    assert len(table) == 1 and table[0].count("|") == 9, "module type, layers, tensors, rows, degenerate, cos, share, Δ"


def test_a_lora_adapter_card_says_peft_and_names_the_base_model(tmp_path, llama):
    _, paths = llama
    merge(paths["expert"], paths["anti"], tmp_path / "adapter", lam=1.0)
    front, body = _card(tmp_path / "adapter")
    expert_config = json.loads((Path(paths["expert"]) / "adapter_config.json").read_text())
    assert front["library_name"] == "peft" and front["tags"] == ["extsub", "merge", "ext-sub", "peft", "lora"]
    assert front.get("base_model") == (expert_config["base_model_name_or_path"] or None)
    assert "A PEFT LoRA adapter (rank r⁺ + r⁻ per module, exact), made with" in body and "| self_attn.q_proj |" in body
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "extsub_recipe.yaml",
    }


def test_a_full_model_card_says_transformers_and_the_config_notes_the_dtype(tmp_path):
    base = random_delta(SHAPES)
    full = [{k: base[k] + d for k, d in random_delta(SHAPES).items()} for _ in range(2)]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    folders = []
    for name, tensors in (("base", base), ("e", full[0]), ("a", full[1])):
        save(tmp_path / name / "model.safetensors", tensors)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        folders.append(tmp_path / name)
    merge(folders[1], folders[2], tmp_path / "out", base=folders[0], dtype="bfloat16")
    front, _ = _card(tmp_path / "out")
    assert front == {"library_name": "transformers", "tags": ["extsub", "merge", "ext-sub"]}, "a local BASE: no id"
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and "dtype" not in written, "the key the config uses, set to --dtype"
    assert written["extsub"]["lam"] == [1.0] and written["extsub"]["recipe"] == "extsub_recipe.yaml"
    assert json.loads((folders[1] / "config.json").read_text()) == config, "the input's config is untouched"


def test_force_replaces_a_folder_this_tool_wrote_but_not_a_readme_of_someone_else(tmp_path):
    e = save(tmp_path / "in" / "e.safetensors", random_delta(SHAPES))
    a = save(tmp_path / "in" / "a.safetensors", random_delta(SHAPES))
    merge(e, a, tmp_path / "out")
    merge(e, a, tmp_path / "out", lam=2.0, force=True)  # card, recipe and weights: all ours
    assert yaml.safe_load((tmp_path / "out" / "extsub_recipe.yaml").read_text())["lam"] == 2.0
    (tmp_path / "out" / "README.md").write_text("# My notes\n")
    with pytest.raises(InputError, match="holds files extsub-merge did not write there .e.g. 'README.md'"):
        merge(e, a, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "README.md").read_text() == "# My notes\n" and not leftovers(tmp_path)


def test_a_safetensors_output_has_no_card_but_its_metadata_says_how_it_was_made(tmp_path):
    e = save(tmp_path / "e.safetensors", random_delta(SHAPES))
    a = save(tmp_path / "a.safetensors", random_delta(SHAPES))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = merge(e, a, tmp_path / "out.safetensors", adapter=AdapterOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "e.safetensors", "out.safetensors"]
    assert report.stats == (), "statistics are gathered only when a card or a report needs them"
    meta = safe_open(str(tmp_path / "out.safetensors"), "pt").metadata()
    assert meta["extsub.version"] and meta["extsub.command"].startswith("extsub-merge ") and "extsub.recipe" in meta


def test_base_model_is_a_hub_id_or_left_out_with_the_reason(tmp_path, llama):
    """The hub rejects a `base_model` that is not a hub id: a local absolute path (an adapter's
    base_model_name_or_path) or a folder's name (a local --base) is left out, and the card says why."""
    from helpers import copy_adapter

    _, paths = llama
    local = str(tmp_path / "models" / "base")
    for name in ("expert", "anti"):
        copy_adapter(paths[name], tmp_path / name, config=lambda c: {**c, "base_model_name_or_path": local})
    merge(tmp_path / "expert", tmp_path / "anti", tmp_path / "adapter", lam=1.0)
    front, body = _card(tmp_path / "adapter")
    assert "base_model" not in front and "base_model_relation" not in front
    assert f"`{local}` is a local path, not a Hugging Face hub id" in body
    assert "pypi.org" not in body, "no link to a package index page that does not exist"
    for name in ("expert", "anti"):
        copy_adapter(
            paths[name], tmp_path / f"hub_{name}", config=lambda c: {**c, "base_model_name_or_path": "org/tiny"}
        )
    merge(tmp_path / "hub_expert", tmp_path / "hub_anti", tmp_path / "hub_adapter", lam=1.0)
    front, _ = _card(tmp_path / "hub_adapter")
    assert front["base_model"] == "org/tiny" and front["base_model_relation"] == "merge"


def test_a_local_base_folder_is_not_written_as_base_model(tmp_path):
    base = random_delta(SHAPES)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    for name in ("gpt2", "e", "a"):  # a local folder named like a hub repo
        save(tmp_path / name / "model.safetensors", {k: v + 0.01 * len(name) for k, v in base.items()})
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    merge(tmp_path / "e", tmp_path / "a", tmp_path / "out", base=tmp_path / "gpt2")
    front, body = _card(tmp_path / "out")
    assert "base_model" not in front
    assert f"BASE `{tmp_path / 'gpt2'}` is a local path, not a Hugging Face hub id" in body


def test_hub_inputs_are_listed_as_mergekit_lists_the_models_merged():
    from extsub_kernels.engine.card import CardFacts, OutputKind, model_card

    inputs = [
        {"role": "EXPERT", "spec": "org/expert@main", "kind": "hub", "repo": "org/expert", "commit": "c" * 40},
        {"role": "ANTI", "spec": "/models/anti", "kind": "folder"},
        {"role": "BASE", "spec": "org/base", "kind": "hub", "repo": "org/base"},
    ]
    kind = OutputKind("x", "peft", "org/base")
    card = model_card(CardFacts("out", "ext-sub", (1.0,), inputs, "extsub-merge ...", kind, ""))
    front = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    assert front["base_model"] == ["org/base", "org/expert"] and front["base_model_relation"] == "merge"
