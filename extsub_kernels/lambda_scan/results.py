"""What a scan measured: one row per (method, λ), the recommendation per method, and the timing summary.

λ = 0 is the expert itself, whatever the method: it is measured once, as the row of method
"expert", and is the reference every relative change and the recommendation compare against.
"""

import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from extsub_kernels.engine.record import jsonable

EXPERT = "expert"  # the method of the λ = 0 row


@dataclass(frozen=True)
class ScanRow:
    """The measurements at one (method, λ); generation metrics are None without prompts.

    NLLs are nats per scored token. Seconds: the merge installed in the model (`merge_seconds`),
    then each evaluation.
    """

    method: str
    lam: float
    keep_nll: float
    forget_nll: float
    rep_4: float | None = None
    distinct_1: float | None = None
    distinct_2: float | None = None
    merge_seconds: float = 0.0
    keep_seconds: float = 0.0
    forget_seconds: float = 0.0
    generate_seconds: float | None = None

    @property
    def eval_seconds(self) -> float:
        """Seconds of the whole evaluation at this point."""
        return self.keep_seconds + self.forget_seconds + (self.generate_seconds or 0.0)


@dataclass(frozen=True)
class Recommendation:
    """The λ of one method with the largest FORGET-NLL increase whose KEEP-NLL rose at most `max_keep_increase`.

    `lam` is None when there is no λ = 0 row to compare with (an interrupted scan).
    Increases are relative to the expert (λ = 0): (NLL − NLL₀) / NLL₀.
    """

    method: str
    lam: float | None
    keep_increase: float | None
    forget_increase: float | None
    note: str


def _relative_increase(value: float, reference: float) -> float:
    """(value − reference) / reference; NaN where the reference is 0 or either is not finite."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return (value - reference) / reference


def recommend(rows: Sequence[ScanRow], method: str, max_keep_increase: float) -> Recommendation:
    """The recommendation for `method` (see `Recommendation`); the expert (λ = 0) when no λ > 0 qualifies.

    Example:
        >>> rows = [ScanRow("expert", 0.0, 1.0, 2.0), ScanRow("sub", 1.0, 1.04, 2.5), ScanRow("sub", 2.0, 1.5, 4.0)]
        >>> recommend(rows, "sub", 0.05).lam
        1.0
    """
    expert = next((r for r in rows if r.method == EXPERT), None)
    if expert is None:
        return Recommendation(method, None, None, None, "no λ = 0 row to compare with (the scan stopped before it)")
    best, best_forget = expert, 0.0
    within = diverged = points = 0
    for row in rows:
        if row.method != method:
            continue
        points += 1
        if not (math.isfinite(row.keep_nll) and math.isfinite(row.forget_nll)):  # a diverged model never qualifies
            diverged += 1
            continue
        keep = _relative_increase(row.keep_nll, expert.keep_nll)
        forget = _relative_increase(row.forget_nll, expert.forget_nll)
        if not (keep <= max_keep_increase):
            continue
        within += 1
        if forget > best_forget:
            best, best_forget = row, forget
    if best is expert:
        if within:
            note = f"no λ > 0 of {method} raised FORGET-NLL with KEEP-NLL within +{max_keep_increase:.1%}"
        elif diverged == points:
            note = f"every λ > 0 of {method} gave a non-finite NLL (the model diverged)"
        else:
            note = f"every λ > 0 of {method} raised KEEP-NLL by more than {max_keep_increase:.1%}"
            note += " or gave a non-finite NLL (the model diverged)" if diverged else ""
        return Recommendation(method, 0.0, 0.0, 0.0, note + "; keep the expert (λ = 0)")
    keep = _relative_increase(best.keep_nll, expert.keep_nll)
    note = f"FORGET-NLL {best_forget:+.1%}, KEEP-NLL {keep:+.1%} (at most +{max_keep_increase:.1%} allowed)"
    return Recommendation(method, best.lam, keep, best_forget, note)


def timing_summary(rows: Sequence[ScanRow]) -> dict[str, float | None]:
    """Medians over the rows: merge seconds, each evaluation's seconds, and the merge as a share of the smallest one.

    The smallest evaluation is the cheapest of KEEP, FORGET and generation; the issue's budget
    for adapters is a merge under 5 % of it.
    """
    if not rows:
        return {}
    parts = {
        "keep": [r.keep_seconds for r in rows],
        "forget": [r.forget_seconds for r in rows],
        "generate": [r.generate_seconds for r in rows if r.generate_seconds is not None],
    }
    medians = {name: statistics.median(values) for name, values in parts.items() if values}
    smallest = min(medians, key=medians.__getitem__)
    merge = statistics.median(r.merge_seconds for r in rows)
    summary: dict[str, float | None] = {"merge_seconds_median": merge}
    summary |= {f"{name}_seconds_median": value for name, value in medians.items()}
    summary["smallest_evaluation"] = smallest  # type: ignore[assignment]
    summary["merge_share_of_smallest_evaluation"] = merge / medians[smallest] if medians[smallest] > 0 else None
    summary["eval_seconds_total"] = sum(r.eval_seconds for r in rows)
    summary["merge_seconds_total"] = sum(r.merge_seconds for r in rows)
    return summary


@dataclass
class ScanResult:
    """A scan: its rows in the order measured, a recommendation per method, timings and where it was written.

    Iterating over it, `len()` and indexing go through `rows`.

    Attributes:
        rows: one ScanRow per point measured (λ = 0 first, as method "expert").
        recommendations: per method, in the order scanned.
        status: "complete"; "running" (scan.json while the scan goes on); "interrupted" (Ctrl-C),
            "terminated" (SIGTERM) or "failed: <why>" (an error at a point): `rows` holds what was measured.
        points: how many points the scan was asked for.
        setup: what was scanned: inputs, sets, options, the PEM kind (as written to scan.json).
        timing: seconds of loading, preparing, the whole scan, and `timing_summary`.
        files: the files written (SCAN_DIR's scan.json, .csv, .md, .png), if any.
        saved: the `MergeReport` of `--save-best` (save_best=...), if asked.
    """

    rows: list[ScanRow]
    recommendations: dict[str, Recommendation]
    status: str
    points: int
    setup: dict
    timing: dict
    files: list[Path] = field(default_factory=list)
    saved: object | None = None

    @property
    def complete(self) -> bool:
        """Whether every point was measured."""
        return self.status == "complete"

    def __iter__(self) -> Iterator[ScanRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ScanRow:
        return self.rows[index]

    def row(self, method: str, lam: float) -> ScanRow:
        """The row of (method, λ); λ = 0 is the expert's row whatever the method. KeyError if not measured."""
        for r in self.rows:
            if r.lam == lam and (r.method == method or r.lam == 0):
                return r
        raise KeyError(f"no row for {method} λ={lam}")

    def table(self) -> list[dict]:
        """The rows as dicts, with the relative KEEP and FORGET increases over λ = 0 (NaN without that row)."""
        expert = next((r for r in self.rows if r.method == EXPERT), None)
        out = []
        for r in self.rows:
            d = asdict(r)
            d["keep_increase"] = _relative_increase(r.keep_nll, expert.keep_nll) if expert else math.nan
            d["forget_increase"] = _relative_increase(r.forget_nll, expert.forget_nll) if expert else math.nan
            d["eval_seconds"] = r.eval_seconds
            out.append(d)
        return out

    def to_dict(self) -> dict:
        """Everything, as scan.json holds it (NaN written as null)."""
        return jsonable(
            {
                "status": self.status,
                "points": self.points,
                "measured": len(self.rows),
                **self.setup,
                "timing": self.timing,
                "recommended": {m: asdict(r) for m, r in self.recommendations.items()},
                "rows": self.table(),
            }
        )


COLUMNS = (
    "method",
    "lam",
    "keep_nll",
    "keep_increase",
    "forget_nll",
    "forget_increase",
    "rep_4",
    "distinct_1",
    "distinct_2",
    "merge_seconds",
    "keep_seconds",
    "forget_seconds",
    "generate_seconds",
    "eval_seconds",
)
