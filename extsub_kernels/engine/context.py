"""What a run records about itself beside its results (built once by `merge()` before any work; written into every
output, carried by the report): the inputs fingerprinted, the recipe, the command, the start."""

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extsub_kernels.engine.recipe import command_line


@dataclass(frozen=True)
class RunContext:
    """One run's provenance: inputs' fingerprints, the recipe (`MERGE_KEYS`), the command, the start (UTC ISO 8601),
    every option for the report, Markdown for the cards (`card_note`)."""

    inputs: tuple[Mapping[str, Any], ...] = ()
    recipe: Mapping[str, Any] = field(default_factory=dict)
    command: str = ""
    started_at: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    card_note: str = ""

    @classmethod
    def create(
        cls,
        inputs: Sequence[Mapping[str, Any]],
        recipe: Mapping[str, Any],
        out: str | None,
        command: str | None,
        *,
        options: Mapping[str, Any] | None = None,
        card_note: str = "",
    ) -> "RunContext":
        """A context stamped now; without `command`, the extsub-merge command equivalent to `recipe` and `out`."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        line = command or command_line({**recipe, "lam": (options or {}).get("lam")}, out)
        return cls(tuple(inputs), dict(recipe), line, now, dict(options or {}), card_note)
