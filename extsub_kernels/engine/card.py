"""The model card (README.md) of a folder output, in the Hugging Face conventions: YAML front matter, then prose.

The front matter carries `base_model` (hub ids only: the base model, the expert and the anti-experts,
with `base_model_relation: merge`; a local base is left out and the body says why), `library_name`
(peft for adapters, transformers for full models) and `tags` (extsub, merge); the body names the
method and the paper, λ, the inputs (hub ids with the commits they resolved to), the exact command
and the summary table of what the merge did per module type.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from extsub_kernels._version import __version__
from extsub_kernels.io.outputs import GENERATED_MARK, RECIPE_NAME

PAPER = (
    'Hu et al., "Separate the Wheat from the Chaff: Model Deficiency Unlearning via Parameter-Efficient '
    'Module Operation", AAAI 2024 ([arXiv:2308.08090](https://arxiv.org/abs/2308.08090))'
)
METHOD_NAME = {"ext-sub": "**Ext-Sub** (Extraction-before-Subtraction)", "sub": "direct subtraction", "add": "addition"}
METHOD_TEXT = {
    "ext-sub": "θ' = θ⁺ − λ·Ext(θ⁻), row by row. Ext(θ⁻) is the part of the anti-expert's task vector orthogonal to "
    "the bisector of expert and anti-expert rows, its *deficiency*; the rest, the general capability both share, is "
    "kept.",
    "sub": "θ' = θ⁺ − λ·θ⁻, the paper's baseline.",
    "add": "θ' = θ⁺ + λ·θ⁻.",
}


@dataclass(frozen=True)
class CardFacts:
    """What a model card states about one output.

    Attributes:
        title: the output's name.
        method: "ext-sub", "sub" or "add".
        setting: λ per anti-expert of this output.
        inputs: the inputs' fingerprints (io.provenance), EXPERT first.
        command: the command that made the output.
        library_name: "peft" for adapters, "transformers" for full models, None for task vectors.
        base_model: the base model's hub id, only when it is one.
        what: a few words on the output ("a PEFT LoRA adapter", "the full model θ₀ + ΔW'").
        table: the Markdown summary table (empty without statistics).
        tags: tags beside extsub, merge and the method ("peft", "lora", ...).
        note: a paragraph on this output after the first (what --max-rank truncated, ...).
        base_note: why there is no `base_model` in the front matter although a base model is known.
    """

    title: str
    method: str
    setting: tuple[float, ...]
    inputs: Sequence[Mapping]
    command: str
    library_name: str | None
    base_model: str | None
    what: str
    table: str
    tags: tuple[str, ...] = ()
    note: str = ""
    base_note: str = ""


def model_card(facts: CardFacts) -> str:
    """The README.md text of an output.

    Example:
        >>> card = model_card(CardFacts("merged", "ext-sub", (1.0,), [], "extsub-merge e a -o merged", None, None,
        ...                             "task vectors", ""))
        >>> card.startswith("---")
        True
    """
    models = hub_models(facts)
    front: dict = {"base_model": models[0] if len(models) == 1 else models} if models else {}
    if models:
        front["base_model_relation"] = "merge"
    if facts.library_name is not None:
        front["library_name"] = facts.library_name
    front["tags"] = ["extsub", "merge", facts.method, *facts.tags]
    lam = ", ".join(f"{x:g}" for x in facts.setting)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        GENERATED_MARK,
        "",
        f"# {facts.title}",
        "",
        f"{facts.what[0].upper()}{facts.what[1:]}, made with extsub "
        f"{__version__} by {METHOD_NAME.get(facts.method, facts.method)} at λ = {lam}.",
        "",
        *([facts.note, ""] if facts.note else []),
        f"{METHOD_TEXT.get(facts.method, '')} Method: {PAPER}.",
        "",
        "## Inputs",
        "",
        *[_input_line(record) for record in facts.inputs],
        "",
        *([f"No `base_model` in the front matter: {facts.base_note}.", ""] if facts.base_note else []),
        "## How it was made",
        "",
        "```bash",
        facts.command,
        "```",
        "",
        f"`{RECIPE_NAME}` beside this card holds every option; "
        f"`extsub-merge --config {RECIPE_NAME} -o OUT` makes the same tensors again, byte for byte, "
        "from the same inputs on the same kind of device. Each weights file's `__metadata__` records the "
        "tool's version, the command, the inputs' commits and header hashes.",
        "",
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


def hub_models(facts: CardFacts) -> list[str]:
    """The front matter's `base_model`, as mergekit lists it: the base model, then the expert and anti-experts,
    hub ids only (the hub refuses anything else), each once."""
    merged = [r["repo"] for r in facts.inputs if r.get("kind") == "hub" and r.get("role") != "BASE" and r.get("repo")]
    models = ([facts.base_model] if facts.base_model else []) + merged
    return list(dict.fromkeys(models))


def _input_line(record: Mapping) -> str:
    """One input as a list item: role, spec, and for hub inputs the repo and commit."""
    line = f"- {record['role']}: `{record['spec']}`"
    if record.get("kind") == "hub":
        repo, commit = record.get("repo"), record.get("commit")
        line += f" ([{repo}](https://huggingface.co/{repo})" + (f" @ `{commit}`)" if commit else ")")
    return line
