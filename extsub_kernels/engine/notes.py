"""What every output says about how it was made: its `__metadata__` (before any tensor), and in folder outputs the
model card, the recipe and a note in the copied config.json (after the tensors, before the commit)."""

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from extsub_kernels._version import __version__
from extsub_kernels.constants import CARD_NAME, MODEL_CONFIG, RECIPE_NAME
from extsub_kernels.engine.card import CardFacts, OutputKind, model_card
from extsub_kernels.engine.context import RunContext
from extsub_kernels.engine.options import DTYPE_NAMES, RunOptions
from extsub_kernels.engine.recipe import METADATA_KEY as RECIPE_KEY
from extsub_kernels.engine.recipe import recipe_text
from extsub_kernels.engine.stats import TensorStats
from extsub_kernels.engine.tables import summary_table
from extsub_kernels.io import ResolvedInput, hub_repo_id, read_json_object


def _printable(name: str) -> str:
    """Text a header or file can hold: non-UTF-8 bytes (lone surrogates, as in file names) as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _input_note(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the metadata keeps of an input's fingerprint: role, spec, commit, and per file its name and header hash."""
    note = {key: record[key] for key in ("role", "spec", "commit") if record.get(key) is not None}
    note["files"] = [{"name": f["name"], "header_sha256": f["header_sha256"]} for f in record.get("files", [])]
    return note


def run_metadata(
    inputs: Sequence[tuple[str, ResolvedInput]],
    options: RunOptions,
    output_format: str | None = None,
    context: RunContext | None = None,
) -> list[dict[str, str]]:
    """`__metadata__` of each output (one per λ setting): format, method, λ, inputs' names, version, adapter format;
    with a `context`, the command, the inputs' commits and header hashes, and the recipe."""
    names = {role: inp.name for role, inp in inputs}
    antis = [_printable(name) for role, name in names.items() if role.startswith("ANTI")]
    metadata = []
    for setting in options.settings:
        meta = {"format": "pt", "extsub.method": options.method, "extsub.lam": json.dumps(list(setting))}
        meta.update({"extsub.expert": _printable(names["EXPERT"]), "extsub.anti": json.dumps(antis)})
        meta["extsub.version"] = __version__
        if names.get("BASE") is not None:
            meta["extsub.base"] = _printable(names["BASE"])
        if output_format is not None:
            meta["extsub.format"] = output_format
        if context is not None:
            meta["extsub.command"] = _printable(context.command)
            notes = [_input_note(record) for record in context.inputs]
            meta["extsub.inputs"] = _printable(json.dumps(notes, separators=(",", ":"), ensure_ascii=False))
            meta[RECIPE_KEY] = _printable(recipe_text(context.recipe, setting))
        metadata.append(meta)
    return metadata


def output_texts(
    paths: Sequence[Path],
    options: RunOptions,
    context: RunContext | None,
    kind: OutputKind,
    stats: Sequence[TensorStats],
) -> list[dict[str, str]]:
    """The generated files of each folder output: README.md (model card), extsub_recipe.yaml, a noted config.json."""
    texts = []
    for index, (path, setting) in enumerate(zip(paths, options.settings, strict=True)):
        own = [dataclasses.replace(s, relative_change=(s.relative_change[index],)) for s in stats]
        table = summary_table(own, [setting]) if stats else ""
        if path.suffix == ".safetensors" or context is None:
            texts.append({})
            continue
        note = kind.notes[index] if kind.notes else ""
        made = (context.inputs, context.command, kind, table, note, context.card_note)
        facts = CardFacts(path.name, options.method, tuple(setting), *made)
        files = {CARD_NAME: model_card(facts), RECIPE_NAME: recipe_text(context.recipe, setting)}
        if kind.config is not None:
            files[MODEL_CONFIG] = _noted_config(kind.config, options.out_dtype, options.method, setting)
        texts.append({name: _printable(text) for name, text in files.items()})
    return texts


def text_names(paths: Sequence[Path], kind: OutputKind) -> list[str]:
    """The names `output_texts` writes into a folder output (for a dry run's file list)."""
    if not paths or paths[0].suffix == ".safetensors":
        return []
    return [CARD_NAME, RECIPE_NAME] + ([MODEL_CONFIG] if kind.config is not None else [])


def _noted_config(path: Path, out_dtype: torch.dtype | None, method: str, setting: Sequence[float]) -> str:
    """A config.json with an `extsub` note and, when the dtype changed, `torch_dtype`/`dtype` saying so."""
    config = read_json_object(path)
    for key in ([k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]) if out_dtype else ():
        config[key] = DTYPE_NAMES[out_dtype]
    config["extsub"] = {"version": __version__, "method": method, "lam": list(setting), "recipe": RECIPE_NAME}
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def card_base_model(name: str | None, who: str) -> tuple[str | None, str]:
    """(hub id, "") when `name` is a hub repo id, else (None, why the card leaves `base_model` out)."""
    repo = hub_repo_id(name) if name else None
    if repo is not None or not name:
        return repo, ""
    why = f"{who} `{_printable(name)}` is a local path, not a Hugging Face hub id, which is all the hub accepts there"
    return None, why
