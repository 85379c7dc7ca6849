"""The committed trained fixtures are what trained_fixtures.py says: loadable, shaped as PEFT saves them, fit to
commit. (What they learned is measured in benchmarks/scan_seeds.py, not asserted here.)"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import trained_fixtures as tf
from helpers import lazy_module

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # PEFT's prefix path
peft = lazy_module("peft")
transformers = lazy_module("transformers")

ADAPTER_TYPES = ("lora", "ia3", "prefix", "prefix_projection")


def _peft_model(trained, model, peft_type, role):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(trained.load_base(model), trained.adapter(model, peft_type, role)).eval()


def _saved(trained, model, peft_type, role) -> dict[str, torch.Tensor]:
    return load_file(trained.adapter(model, peft_type, role) / "adapter_model.safetensors")


def _config(trained, model, peft_type, role="expert") -> dict:
    return json.loads((trained.adapter(model, peft_type, role) / "adapter_config.json").read_text())


@pytest.mark.parametrize("model", tf.MODELS)
def test_base_and_tokenizer_load_with_auto_classes(trained, model):
    folder = trained.base(model)
    net = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert net.config.vocab_size == len(tokenizer) == len(tf.VOCAB)
    line = "prev red = door book ship"
    ids = tokenizer(line)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == tf.BOS_ID and len(ids) == 1 + len(line.split())
    assert tokenizer.decode(ids, skip_special_tokens=True) == line
    assert tokenizer("red zebra")["input_ids"] == [tf.BOS_ID, tf.VOCAB.index("red"), tf.UNK_ID]
    assert (folder / "model.safetensors").is_file()
    heads = {"llama": (4, 4), "llama_gqa": (4, 2), "gpt2": (4, 4)}[model]
    config = net.config
    assert (config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)) == heads


@pytest.mark.parametrize("role", tf.ROLES)
@pytest.mark.parametrize("peft_type", ADAPTER_TYPES)
@pytest.mark.parametrize("model", tf.MODELS)
def test_adapter_loads_with_peft_and_was_trained(trained, model, peft_type, role):
    """PeftModel.from_pretrained loads exactly the saved tensors; LoRA's B and (IA)³'s vectors left their init."""
    loaded = _peft_model(trained, model, peft_type, role)
    saved = _saved(trained, model, peft_type, role)
    state = peft.get_peft_model_state_dict(loaded)
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert _config(trained, model, peft_type, role)["base_model_name_or_path"] == str(trained.base(model))

    for key, value in saved.items():
        if peft_type == "lora" and "lora_B" in key:
            assert (value != 0).all(), key  # PEFT starts B at zero
        if peft_type == "ia3":
            assert (value != 1).all(), key  # and (IA)³ vectors at one


@pytest.mark.parametrize("peft_type", ADAPTER_TYPES)
@pytest.mark.parametrize("model", tf.MODELS)
def test_expert_and_anti_differ_everywhere(trained, model, peft_type):
    expert, anti = (_saved(trained, model, peft_type, role) for role in tf.ROLES)
    for key in expert:
        assert (expert[key] != anti[key]).all(), key


@pytest.mark.parametrize("model", tf.FULL_MODELS)
def test_full_fine_tunes_change_every_trained_tensor(trained, model):
    base = load_file(trained.base(model) / "model.safetensors")
    for role in tf.ROLES:
        folder = trained.adapter(model, "full", role)
        tuned = load_file(folder / "model.safetensors")
        assert tuned.keys() == base.keys()
        assert not [k for k in base if torch.equal(tuned[k], base[k])]
        assert transformers.AutoTokenizer.from_pretrained(folder).get_vocab() == trained.tokenizer.get_vocab()


def test_saved_shapes_and_configs(trained):
    """The tensors PEFT 0.21 saves for (IA)³ and prefix-tuning, and the config fields that give their geometry."""
    hidden, inner, layers, tokens = 32, 64, 2, tf.NUM_VIRTUAL_TOKENS
    for model, kv_dim in (("llama", 32), ("llama_gqa", 16)):
        shapes = tf.saved_shapes(trained.adapter(model, "ia3", "expert"))
        for i in range(layers):
            prefix = f"base_model.model.model.layers.{i}"
            assert shapes[f"{prefix}.self_attn.k_proj.ia3_l"] == (kv_dim, 1)
            assert shapes[f"{prefix}.self_attn.v_proj.ia3_l"] == (kv_dim, 1)
            assert shapes[f"{prefix}.mlp.down_proj.ia3_l"] == (1, inner)
        assert len(shapes) == 3 * layers
        config = _config(trained, model, "ia3")
        assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
        assert config["feedforward_modules"] == ["down_proj"]
    shapes = tf.saved_shapes(trained.adapter("gpt2", "ia3", "expert"))
    assert shapes == {
        **{f"base_model.model.transformer.h.{i}.attn.c_attn.ia3_l": (3 * hidden, 1) for i in range(layers)},
        **{f"base_model.model.transformer.h.{i}.mlp.c_proj.ia3_l": (1, 4 * hidden) for i in range(layers)},
    }
    config = _config(trained, "gpt2", "ia3")
    assert sorted(config["target_modules"]) == ["c_attn", "mlp.c_proj"]
    assert config["feedforward_modules"] == ["mlp.c_proj"]
    assert config["fan_in_fan_out"] is True

    # Prefix-tuning: (num_virtual_tokens, num_layers·2·token_dim), token_dim and num_attention_heads
    # those of the keys and values (the KV heads of a grouped-query model), projected or not.
    for model, kv_heads in (("llama", 4), ("llama_gqa", 2), ("gpt2", 4)):
        for peft_type in ("prefix", "prefix_projection"):
            config = _config(trained, model, peft_type)
            token_dim = kv_heads * hidden // 4
            assert (config["token_dim"], config["num_attention_heads"]) == (token_dim, kv_heads)
            assert (config["num_layers"], config["num_virtual_tokens"]) == (layers, tokens)
            assert config["prefix_projection"] == (peft_type == "prefix_projection")
            assert tf.saved_shapes(trained.adapter(model, peft_type, "expert")) == {
                "prompt_embeddings": (tokens, layers * 2 * token_dim)
            }


def test_committed_folders_hold_no_paths_of_the_machine_that_built_them():
    """Adapter configs name their base by its folder name (the fixture points them at its copy); no PEFT README stubs;
    every committed folder is one the fixtures serve."""
    expected = {f"base-{m}" for m in tf.MODELS} | {
        f"{m}-{t}-{r}" for m in tf.MODELS for t in tf.PEFT_TYPES for r in tf.ROLES if t != "full" or m in tf.FULL_MODELS
    }
    assert {p.name for p in tf.DATA.iterdir()} == expected
    for config in tf.DATA.glob("*/adapter_config.json"):
        model = config.parent.name.split("-")[0]
        assert json.loads(config.read_text())["base_model_name_or_path"] == f"base-{model}", config
        assert not (config.parent / "README.md").exists()
    for file in tf.DATA.glob("*/*.json"):
        assert "/tmp" not in file.read_text() and "/home" not in file.read_text(), file


def test_a_missing_full_fine_tune_is_named(trained):
    with pytest.raises(ValueError, match=r"no committed full expert of llama_gqa"):
        trained.adapter("llama_gqa", "full", "expert")


def test_eval_sets_are_held_out(trained):
    seen = {line for role in ("base", *tf.ROLES) for line in tf.training_lines(role)}
    for name, task in (("keep", tf.TASKS["expert"]), ("forget", tf.TASKS["anti"]), ("general", tf.GENERAL_TASK)):
        lines = trained.eval_set(f"{name}.txt").read_text().splitlines()
        assert len(lines) == tf.EVAL_LINES and not seen & set(lines)
        assert all(line.split()[0] == task for line in lines)
        if name != "general":
            rows = [json.loads(r) for r in trained.eval_set(f"{name}.jsonl").read_text().splitlines()]
            assert [r["prompt"] + r["completion"] for r in rows] == lines
    prompts = trained.eval_set("prompts.txt").read_text().splitlines()
    assert len(prompts) == 12 and all(p.endswith(" =") for p in prompts)


def test_tasks():
    assert tf.task_line("next", "door", 3) == "next door = red green blue"  # the ring wraps
    assert tf.task_line("prev", "red", 2) == "prev red = door book"
    assert tf.task_line("repeat", "cat", 3) == "repeat cat = cat cat cat"
    assert tf.task_line("back", "green", 2) == "back green = door ship"
    assert len(set(tf.task_lines("prev", "train"))) == len(tf.WORDS) * len(tf.ANSWER_LENGTHS) - tf.EVAL_LINES


def test_unknown_names_are_refused(trained):
    with pytest.raises(ValueError, match="unknown evaluation set 'x.txt'"):
        trained.eval_set("x.txt")
    with pytest.raises(ValueError, match="unknown PEFT type 'lokr'"):
        trained.adapter("llama", "lokr", "expert")
    with pytest.raises(ValueError, match="unknown model 'opt'"):
        trained.base("opt")
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        tf.task_line("sort", "red", 2)
