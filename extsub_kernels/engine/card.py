"""The model card (README.md) of a folder output, in the Hugging Face conventions: YAML front matter, then prose.

The front matter carries `base_model`, `library_name` (peft for adapters, transformers for full
models) and `tags` (extsub, merge); the body names the method and the paper, λ, the inputs
(hub ids with the commits they resolved to), the exact command and the summary table of
what the merge did per module type.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from extsub_kernels._version import __version__
from extsub_kernels.constants import RECIPE_NAME
from extsub_kernels.engine.method_spec import method_spec
from extsub_kernels.io.outputs import GENERATED_MARK

PAPER = (
    'Hu et al., "Separate the Wheat from the Chaff: Model Deficiency Unlearning via Parameter-Efficient '
    'Module Operation", AAAI 2024 ([arXiv:2308.08090](https://arxiv.org/abs/2308.08090))'
)


@dataclass(frozen=True)
class CardFacts:
    """What a model card states about one output.

    Attributes:
        title: the output's name.
        method: the method's name (`method_spec`: its title and sentence on the card).
        setting: λ per anti-expert of this output.
        inputs: the inputs' fingerprints (io.provenance), EXPERT first.
        command: the command that made the output.
        library_name: "peft" for adapters, "transformers" for full models, None for task vectors.
        base_model: the base model's hub id or name, when known.
        what: a few words on the output ("a PEFT LoRA adapter", "the full model θ₀ + ΔW'").
        table: the Markdown summary table (empty without statistics).
        tags: tags beside extsub, merge and the method ("peft", "lora", ...).
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


def model_card(facts: CardFacts) -> str:
    """The README.md text of an output.

    Example:
        >>> card = model_card(CardFacts("merged", "sub", (1.0,), [], "extsub-merge e a -o merged", None, None,
        ...                             "task vectors", ""))
        >>> card.startswith("---")
        True
    """
    spec = method_spec(facts.method)
    front = {"base_model": facts.base_model, "library_name": facts.library_name}
    front = {key: value for key, value in front.items() if value is not None}
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
        f"{facts.what[0].upper()}{facts.what[1:]}, made with [extsub](https://pypi.org/project/extsub/) "
        f"{__version__} by {spec.title} at λ = {lam}.",
        "",
        f"{spec.card_text} Method: {PAPER}.",
        "",
        "## Inputs",
        "",
        *[_input_line(record) for record in facts.inputs],
        "",
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


def _input_line(record: Mapping) -> str:
    """One input as a list item: role, spec, and for hub inputs the repo and commit."""
    line = f"- {record['role']}: `{record['spec']}`"
    if record.get("kind") == "hub":
        repo, commit = record.get("repo"), record.get("commit")
        line += f" ([{repo}](https://huggingface.co/{repo})" + (f" @ `{commit}`)" if commit else ")")
    return line
