"""Recipes: every option of a merge (`extsub-merge`'s long options, `_` for `-`, plus expert, anti, out) in one YAML
file, read back with `--config` (each key checked) and written into each output with its λ and pinned inputs."""

import difflib
import itertools
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extsub_kernels._names import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_LAM, DEFAULT_ON_MISSING
from extsub_kernels._version import __version__
from extsub_kernels.constants import RECIPE_NAME
from extsub_kernels.engine.method_spec import DEFAULT_METHOD, METHODS
from extsub_kernels.engine.options import ON_MISSING, OUT_DTYPES, lam_items, lam_label, lam_text, short
from extsub_kernels.errors import InputError
from extsub_kernels.io import read_header
from extsub_kernels.io.files import read_bounded_text

RECIPE_FORMAT = 1
PROG = "extsub-merge"


@dataclass(frozen=True)
class RecipeKey:
    """One key of a recipe: the YAML types it takes (named for messages), its choices, its flag on the command line."""

    types: tuple[type, ...]
    what: str
    choices: tuple[str, ...] = ()
    flag: str | None = None


_STR, _NUM = (str,), (int, float)
KEYS: dict[str, RecipeKey] = {
    "extsub_recipe": RecipeKey((int,), f"the recipe format, {RECIPE_FORMAT}"),
    "extsub_version": RecipeKey(_STR, "a version string (informational)"),
    "expert": RecipeKey(_STR, "a path or hub id"),
    "anti": RecipeKey((str, list), "a path or hub id, or a list of them"),
    "base": RecipeKey(_STR, "a path or hub id", flag="--base"),
    "out": RecipeKey(_STR, "a path", flag="-o"),
    "lam": RecipeKey((int, float, str, list), "a number, a string like '0.5,1' or a list", flag="--lam"),
    "method": RecipeKey(_STR, "a method name", METHODS, "--method"),
    "device": RecipeKey(_STR, "auto, cpu, cuda or cuda:N", flag="--device"),
    "dtype": RecipeKey(_STR, "a dtype name", tuple(OUT_DTYPES), "--dtype"),
    "max_shard_size": RecipeKey((int, str), "a size like 5GB or a number of bytes", flag="--max-shard-size"),
    "on_missing": RecipeKey(_STR, "an on-missing policy", ON_MISSING, "--on-missing"),
    "transposed": RecipeKey((bool,), "true or false", flag="--transposed"),
    "format": RecipeKey(_STR, "an adapter output format", flag="--format"),  # choices: the caller's (load_recipe)
    "max_rank": RecipeKey((int,), "a positive integer", flag="--max-rank"),
    "lora_alpha": RecipeKey(_NUM, "a number", flag="--lora-alpha"),
    "rank": RecipeKey((int,), "a positive integer", flag="--rank"),
    "rslora": RecipeKey((bool,), "true or false", flag="--rslora"),
    "any_base_model": RecipeKey((bool,), "true or false", flag="--any-base-model"),
    "force": RecipeKey((bool,), "true or false", flag="--force"),
    "dry_run": RecipeKey((bool,), "true or false", flag="--dry-run"),
    "report": RecipeKey(_STR, "a path, or - for stdout", flag="--report"),
    "quiet": RecipeKey((bool,), "true or false", flag="--quiet"),
    "verbose": RecipeKey((bool,), "true or false", flag="--verbose"),
}
# What a written recipe holds: how the output was made (not where it went or how the run talked).
MERGE_KEYS = tuple(k for k in KEYS if k not in ("extsub_recipe", "extsub_version", "out", "force", "dry_run", "report"))
MERGE_KEYS = MERGE_KEYS[: MERGE_KEYS.index("any_base_model") + 1]


METADATA_KEY = "extsub.recipe"  # where each weights file's __metadata__ keeps the recipe of its output


def load_recipe(path: str | os.PathLike, choices: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Read and validate a recipe (YAML, or a weights file's `extsub.recipe`), null keys left out; `choices`: values
    of keys defined above the engine. InputError naming the file and key for anything wrong in it."""
    path = Path(path)
    if path.suffix == ".safetensors":  # an output of this tool: its recipe is in the header's metadata
        text = read_header(path).metadata.get(METADATA_KEY)
        if text is None:
            raise InputError(
                f"--config {path}: its metadata holds no {METADATA_KEY} (not written by extsub-merge?); "
                "give a recipe .yaml, or a weights file extsub-merge wrote"
            )
    else:
        text = read_bounded_text(path, "--config", _MAX_RECIPE_BYTES)
    return check_recipe(_parsed(text, path), str(path), choices)


def _parsed(text: str, path: Path) -> object:
    """The YAML of a recipe, or an InputError naming the file and the line; aliases and deep nesting refused first."""
    # the deepest nesting of flow brackets (those in quotes too: an upper bound); YAML slows with its square
    if max(itertools.accumulate((c in "[{") - (c in "]}") for c in text), default=0) > _MAX_RECIPE_DEPTH:
        raise InputError(f"--config {path}: not valid YAML (nested more than {_MAX_RECIPE_DEPTH} deep)")
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise InputError(f"--config {path}: YAML aliases (*name) are not taken in a recipe; write values out")
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = short(getattr(e, "problem", None) or str(e))
        raise InputError(f"--config {path}: not valid YAML{line} ({problem})") from None
    except RecursionError:
        raise InputError(f"--config {path}: not valid YAML (nested too deeply)") from None
    return loaded


_MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few dozen lines
_MAX_RECIPE_DEPTH = 32  # of [ ] and { }: a recipe nests two deep


def check_recipe(
    recipe: object, where: str = "recipe", choices: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """The recipe mapping validated (see `load_recipe`); `where` names it in messages."""
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise InputError(f"{where}: a recipe is a YAML mapping of option: value, found a {type(recipe).__name__}")
    checked = {}
    for key, value in recipe.items():
        spec = KEYS.get(key) if isinstance(key, str) else None
        if spec is None:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{where}: unknown key {short(key)}{hint}; a recipe takes {', '.join(KEYS)}")
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in spec.types) or not isinstance(value, spec.types):
            raise InputError(f"{where}: key {key!r} must be {spec.what}, got {short(value)} ({type(value).__name__})")
        allowed = (choices or {}).get(key, spec.choices)
        if allowed and value not in allowed:
            raise InputError(f"{where}: key {key!r} is {short(value)}; choose one of {', '.join(allowed)}")
        checked[key] = value
    if checked.get("extsub_recipe", RECIPE_FORMAT) != RECIPE_FORMAT:
        raise InputError(
            f"{where}: extsub_recipe is {checked['extsub_recipe']}, but this extsub ({__version__}) reads format "
            f"{RECIPE_FORMAT}; upgrade extsub"
        )
    if checked.get("lam") not in (None, []):  # each λ by `lam_items`' rules (an empty list is the run's to refuse)
        try:
            lam_items(checked["lam"])
        except InputError as e:
            raise InputError(f"{where}: key 'lam': {e}") from None
    anti = checked.get("anti")
    if isinstance(anti, list) and (not anti or not all(isinstance(a, str) for a in anti)):
        raise InputError(
            f"{where}: key 'anti' must be a path or hub id, or a non-empty list of them, got {short(anti)}"
        )
    return checked


def recipe_text(recipe: Mapping[str, Any], setting: Sequence[float]) -> str:
    """The recipe of one output: `recipe` (MERGE_KEYS) with that output's λ, as YAML with a header comment."""
    body = {"extsub_recipe": RECIPE_FORMAT, "extsub_version": __version__}
    lam = float(setting[0]) if len(set(setting)) <= 1 else lam_text(setting, ":")  # a number when all share it
    for key in MERGE_KEYS:
        value = lam if key == "lam" else recipe.get(key)
        if value is not None and (value is not False or key == "transposed"):
            body[key] = value
    header = (
        f"# How this output was made, written by extsub {__version__} beside it. To make it again\n"
        f"# (same inputs, same kind of device, every tensor byte for byte):\n"
        f"#   {PROG} --config {RECIPE_NAME} -o OUT\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def command_line(recipe: Mapping[str, Any], out: str | os.PathLike | None = None) -> str:
    """The `extsub-merge` command that runs `recipe`, flags only where not the default."""
    anti = recipe.get("anti") or []
    words = [PROG, str(recipe.get("expert", "EXPERT")), *([anti] if isinstance(anti, str) else anti)]
    out = out if out is not None else recipe.get("out")
    if out is not None:
        words += ["-o", os.fspath(out)]
    defaults = dict(lam=DEFAULT_LAM, method=DEFAULT_METHOD, device=DEFAULT_DEVICE, dtype=DEFAULT_DTYPE)
    defaults["on_missing"] = DEFAULT_ON_MISSING
    for key, spec in KEYS.items():
        value = recipe.get(key)
        if spec.flag is None or key == "out" or value is None or value == defaults.get(key):
            continue
        if key == "transposed":
            words.append("--transposed" if value else "--no-transposed")
        elif isinstance(value, bool):
            words += [spec.flag] if value else []
        elif key == "lam":
            words += [spec.flag, _lam_text(value)]
        else:
            words += [spec.flag, str(value)]
    return shlex.join(words)


def _lam_text(lam: object, sep: str = ",") -> str:
    """λ as a flag: a list joined by `sep` (its lists by ":"), numbers shortest, anything else as given."""
    if isinstance(lam, (list, tuple)) and sep:
        return sep.join(_lam_text(x, ":" if sep == "," else "") for x in lam)
    return lam_label([float(lam)]) if isinstance(lam, (int, float)) else str(lam)
