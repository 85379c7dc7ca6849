"""Recipes: YAML validated key by key with messages that name the key, written per output, read back, as a command."""

import pytest
import yaml

from extsub_kernels.engine.recipe import check_recipe, command_line, load_recipe, recipe_text
from extsub_kernels.errors import InputError


def _load(tmp_path, text: str) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_a_recipe_takes_the_long_options_and_the_inputs(tmp_path):
    recipe = _load(
        tmp_path,
        "expert: org/expert\nanti: [a1/, a2/]\nlam: '1:0.5'\nmax_shard_size: 2GB\ntransposed: false\nbase: null\n",
    )
    assert recipe == {
        "expert": "org/expert",
        "anti": ["a1/", "a2/"],
        "lam": "1:0.5",
        "max_shard_size": "2GB",
        "transposed": False,
    }, "null values are left out"
    assert _load(tmp_path, "") == {} and _load(tmp_path, "lam: [0.5, 1]\n") == {"lam": [0.5, 1]}


BAD = {
    "unknown key, with a suggestion": (
        "methd: sub\n",
        ["recipe.yaml", "unknown key 'methd'", "did you mean 'method'?"],
    ),
    "wrong type": ("max_rank: ten\n", ["key 'max_rank' must be a positive integer", "'ten' (str)"]),
    "a bool is not a number": ("lora_alpha: true\n", ["key 'lora_alpha' must be a number", "True (bool)"]),
    "outside the choices": ("method: negate\n", ["key 'method' is 'negate'", "ext-sub, sub, add"]),
    "not a mapping": ("- a\n- b\n", ["a recipe is a YAML mapping", "found a list"]),
    "invalid YAML": ("lam: [1, 2\nmethod: sub\n", ["not valid YAML", "line "]),
    "empty anti list": ("anti: []\n", ["key 'anti' must be a path or hub id, or a non-empty list"]),
    "a newer format": ("extsub_recipe: 2\n", ["extsub_recipe is 2", "reads format 1", "upgrade extsub"]),
    "a λ that is not a number": ('lam: [0.5, "x"]\n', ["recipe.yaml", "key 'lam'", "λ must be a number, got 'x'"]),
    "a λ in a string": ('lam: "0.5,1:y"\n', ["recipe.yaml", "key 'lam'", "λ must be a number, got 'y'"]),
    "an infinite λ": ("lam: [[1, .inf]]\n", ["recipe.yaml", "key 'lam'", "λ must be a finite number"]),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_recipe_is_refused_naming_the_key(tmp_path, case):
    text, parts = BAD[case]
    with pytest.raises(InputError) as error:
        _load(tmp_path, text)
    for part in parts:
        assert part in str(error.value), (part, str(error.value))


def test_a_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(InputError, match=r"--config .*absent.yaml: cannot read the recipe"):
        load_recipe(tmp_path / "absent.yaml")


def test_a_written_recipe_reads_back_with_the_output_s_own_lambda():
    recipe = {"expert": "/m/e", "anti": ["/m/a"], "method": "ext-sub", "device": "cpu", "rslora": None, "max_rank": 8}
    text = recipe_text(recipe, (1.0, 0.5))
    assert text.startswith("# How this output was made") and "extsub-merge --config extsub_recipe.yaml -o OUT" in text
    loaded = check_recipe(yaml.safe_load(text))
    assert loaded["lam"] == "1:0.5" and loaded["max_rank"] == 8 and loaded["extsub_recipe"] == 1
    assert check_recipe(yaml.safe_load(recipe_text(recipe, (0.1,))))["lam"] == 0.1, "floats round-trip exactly"


def test_the_equivalent_command_names_only_what_differs_from_the_defaults():
    recipe = {"expert": "e dir/", "anti": ["a"], "method": "ext-sub", "dtype": "bfloat16", "transposed": False}
    assert command_line({**recipe, "lam": [[1.0, 0.5]]}, "out/") == (
        "extsub-merge 'e dir/' a -o out/ --lam 1:0.5 --dtype bfloat16 --no-transposed"
    )
    assert command_line({"expert": "e", "anti": ["a"], "lam": [[0.5], [2.0]], "rslora": True, "lora_alpha": 16}) == (
        "extsub-merge e a --lam 0.5,2 --lora-alpha 16 --rslora"
    )
