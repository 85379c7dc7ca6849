"""The model card (README.md) of a folder output, in the Hugging Face conventions: YAML front matter (`base_model`,
`library_name`, `tags`), then the method, λ, the inputs, the command and the summary table."""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from extsub_kernels._version import __version__
from extsub_kernels.constants import RECIPE_NAME
from extsub_kernels.engine.method_spec import method_spec
from extsub_kernels.engine.options import lam_text
from extsub_kernels.io.outputs import GENERATED_MARK

_PAPER = (
    'Hu et al., "Separate the Wheat from the Chaff: Model Deficiency Unlearning via Parameter-Efficient '
    'Module Operation", AAAI 2024 ([arXiv:2308.08090](https://arxiv.org/abs/2308.08090))'
)


@dataclass(frozen=True)
class OutputKind:
    """What a folder output is, for its card: words, the library loading it, the base model's hub id (else
    `base_note` says why), a config.json to note, extra tags, a paragraph per output (λ setting)."""

    what: str
    library_name: str | None = None
    base_model: str | None = None
    config: Path | None = None
    tags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    base_note: str = ""


@dataclass(frozen=True)
class CardFacts:
    """What a model card states about one output: name, method, λ per anti-expert, inputs' fingerprints, command,
    kind, summary table (may be empty), a paragraph (`note`) and Markdown after how it was made (`extra`)."""

    title: str
    method: str
    setting: tuple[float, ...]
    inputs: Sequence[Mapping]
    command: str
    kind: OutputKind
    table: str
    note: str = ""
    extra: str = ""


def model_card(facts: CardFacts) -> str:
    """The README.md text of an output."""
    spec = method_spec(facts.method)
    # base_model as mergekit lists it: base model, expert, anti-experts; hub ids, each once
    merged = [r["repo"] for r in facts.inputs if r.get("kind") == "hub" and r.get("role") != "BASE" and r.get("repo")]
    models = list(dict.fromkeys(([facts.kind.base_model] if facts.kind.base_model else []) + merged))
    front: dict = {"base_model": models[0] if len(models) == 1 else models} if models else {}
    if models:
        front["base_model_relation"] = "merge"
    kind = facts.kind
    if kind.library_name is not None:
        front["library_name"] = kind.library_name
    front["tags"] = ["extsub", "merge", facts.method, *kind.tags]
    lam = lam_text(facts.setting, ", ", short=True)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        GENERATED_MARK,
        "",
        f"# {_text(facts.title)}",
        "",
        f"{kind.what[0].upper()}{kind.what[1:]}, made with extsub {__version__} by {spec.title} at λ = {lam}.",
        "",
        *([facts.note, ""] if facts.note else []),
        f"{spec.card_text} Method: {_PAPER}.",
        "",
        "## Inputs",
        "",
        *[_input_line(record) for record in facts.inputs],
        "",
        *([f"No `base_model` in the front matter: {kind.base_note}.", ""] if kind.base_note else []),
        "## How it was made",
        "",
        f"{_fence(facts.command)}bash",
        _one_line(facts.command),
        _fence(facts.command),
        "",
        f"`{RECIPE_NAME}` beside this card holds every option; "
        f"`extsub-merge --config {RECIPE_NAME} -o OUT` makes the same tensors again, byte for byte, "
        "from the same inputs on the same kind of device. Each weights file's `__metadata__` records the "
        "tool's version, the command, the inputs' commits and header hashes.",
        "",
        *([facts.extra.rstrip(), ""] if facts.extra else []),
    ]
    if facts.table:
        lines += [
            "## What the merge did",
            "",
            "Per module type: cos(p, m) between the rows of expert and anti-expert, the deficiency share "
            "|Ext(m)|/|m| = √((1 − cos)/2) that Ext-Sub removes (weighted by |m|), and the relative change "
            "‖θ' − θ⁺‖/‖θ⁺‖ of the weights. Degenerate rows have a zero norm or an antiparallel pair.",
            "",
            facts.table.rstrip(),
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _input_line(record: Mapping) -> str:
    line = f"- {_text(record['role'])}: {_code(record['spec'])}"
    if record.get("kind") == "hub":
        repo, commit = _text(record.get("repo")), record.get("commit")
        line += f" ([{repo}](https://huggingface.co/{repo})" + (f" @ {_code(commit)})" if commit else ")")
    return line


# Names, paths and commands are text, never Markdown: one line, special characters escaped, fences long enough.
_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|~])")  # what starts emphasis, links, HTML, headings, tables


def _one_line(text: object) -> str:
    return " ".join(str(text).splitlines()) or " "


def _text(text: object) -> str:
    return _MARKDOWN.sub(r"\\\1", _one_line(text))


def _code(text: object) -> str:
    body = _one_line(text)
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", body)), default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{ticks}{pad}{body}{pad}{ticks}"


def _fence(text: object) -> str:
    return "`" * max(3, max((len(run) for run in re.findall(r"`+", str(text))), default=0) + 1)
