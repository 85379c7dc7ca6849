"""What a run records about itself beside its results: the inputs fingerprinted, the recipe, the command, the start.

Built once by `merge()` before any work; the engine writes it into every output (metadata,
model card, recipe) and the report carries it.
"""

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extsub_kernels.engine.recipe import command_line


@dataclass(frozen=True)
class RunContext:
    """The provenance of one run.

    Attributes:
        inputs: `io.provenance.fingerprint` of each input, in role order (EXPERT, ANTI..., BASE).
        recipe: every option that shapes the outputs, under recipe keys (`engine.recipe.MERGE_KEYS`),
            inputs pinned (hub ids to their commit, local paths absolute); λ is set per output.
        command: the command line that started the run (or the equivalent extsub-merge command).
        started_at: the start time, ISO 8601 in UTC.
        options: every option of the run for the report (the recipe's, λ settings, OUT, force, ...).
    """

    inputs: tuple[Mapping[str, Any], ...] = ()
    recipe: Mapping[str, Any] = field(default_factory=dict)
    command: str = ""
    started_at: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        inputs: Sequence[Mapping[str, Any]],
        recipe: Mapping[str, Any],
        out: str | None,
        command: str | None,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> "RunContext":
        """A context stamped now; without `command`, the extsub-merge command equivalent to `recipe` and `out`."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        line = command or command_line({**recipe, "lam": (options or {}).get("lam")}, out)
        return cls(tuple(inputs), dict(recipe), line, now, dict(options or {}))
