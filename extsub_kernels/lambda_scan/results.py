"""What a scan measured: one row per (method, λ), the recommendation per method, and the timing summary. λ = 0 is
the expert itself, whatever the method: measured once (method "expert"), the reference of every relative change."""

import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXPERT = "expert"  # the method of the λ = 0 row


@dataclass(frozen=True)
class ScanRow:
    """The measurements at one (method, λ); what a set measures is None when the set was not given.

    NLLs: nats per scored token (`truth_nll`: TRUTH). `mc1`, `mc2`: multiple choice; `lm_eval`: lm-eval's metrics.
    Generations: rep-4, distinct-1/2, `mean_length` (tokens) and `end_rate` (the share that ended). Seconds: the
    merge installed (`merge_seconds`), then each evaluation. `attempts`: 2 or more when a worker died measuring it."""

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
    truth_nll: float | None = None
    mc1: float | None = None
    mc2: float | None = None
    mean_length: float | None = None
    end_rate: float | None = None
    truth_seconds: float | None = None
    choices_seconds: float | None = None
    lm_eval: dict[str, float] = field(default_factory=dict)
    lm_eval_seconds: float | None = None
    attempts: int = 1

    @property
    def eval_seconds(self) -> float:
        """Seconds of the whole evaluation at this point."""
        parts = (self.truth_seconds, self.choices_seconds, self.generate_seconds, self.lm_eval_seconds)
        return self.keep_seconds + self.forget_seconds + sum(p or 0.0 for p in parts)

    @property
    def truth_margin(self) -> float | None:
        """FORGET − TRUTH NLL: how much more the model doubts the false completions than the true ones."""
        return None if self.truth_nll is None else self.forget_nll - self.truth_nll


@dataclass(frozen=True)
class Guards:
    """How far a λ's generations may move from the expert's (λ = 0) and stay a candidate (docs/design.md §8a):
    absolute changes of rep-4 (up), distinct-2 and the end rate (down), relative change of the mean length."""

    max_rep_increase: float = 0.05
    max_distinct_drop: float = 0.1
    max_length_change: float = 0.5
    max_end_drop: float = 0.2

    def failures(self, row: ScanRow, expert: ScanRow) -> list[str]:
        """Why `row`'s generations are degenerate next to `expert`'s: one phrase per guard it fails; [] if none."""
        found = []
        if _over(row.rep_4, expert.rep_4, self.max_rep_increase):
            found.append(f"rep-4 {row.rep_4:.3f} > {expert.rep_4:.3f} + {self.max_rep_increase:g}")
        if _over(row.distinct_2, expert.distinct_2, self.max_distinct_drop, sign=-1):
            found.append(f"distinct-2 {row.distinct_2:.3f} < {expert.distinct_2:.3f} − {self.max_distinct_drop:g}")
        if _over(row.end_rate, expert.end_rate, self.max_end_drop, sign=-1):
            found.append(f"end rate {row.end_rate:.0%} < {expert.end_rate:.0%} − {self.max_end_drop:.0%}")
        if row.mean_length is not None and expert.mean_length is not None:
            change = relative_increase(row.mean_length, expert.mean_length)
            if expert.mean_length == 0:
                change = 0.0 if row.mean_length == 0 else math.inf
            if abs(change) > self.max_length_change:
                found.append(
                    f"length {row.mean_length:.1f} tokens vs {expert.mean_length:.1f} (±{self.max_length_change:.0%})"
                )
        return found


def _over(value: float | None, reference: float | None, tolerance: float, sign: int = 1) -> bool:
    """sign·value > sign·reference + tolerance, where both were measured; NaN (no n-gram) is no evidence."""
    if value is None or reference is None or math.isnan(value) or math.isnan(reference):
        return False
    return sign * value > sign * reference + tolerance


# The truthfulness axis of the recommendation, by what the scan measured: (field, name in notes).
AXES = (("mc2", "MC2"), ("truth_margin", "FORGET − TRUTH NLL margin"))
NO_AXIS = (
    "no truthfulness axis: give multiple-choice questions (CHOICES, MC2) or TRUTH (FORGET's prompts with true "
    "completions, the FORGET − TRUTH NLL margin); FORGET-NLL alone cannot tell unlearning from damage"
)


@dataclass(frozen=True)
class Recommendation:
    """One method's λ: the best truthfulness score (`axis`: MC2 with choices, else the FORGET − TRUTH margin) among
    the λ whose KEEP-NLL rose at most `max_keep_increase` and whose generations pass the `Guards`.

    `lam` is None with nothing to judge by (no λ = 0 row, or no axis). Increases are relative to λ = 0.
    `excluded`: (λ, why) for each λ the guards or the budget ruled out."""

    method: str
    lam: float | None
    keep_increase: float | None
    forget_increase: float | None
    note: str
    axis: str | None = None
    score: float | None = None
    excluded: tuple[tuple[float, str], ...] = ()


def relative_increase(value: float, reference: float) -> float:
    """(value − reference) / reference; NaN where the reference is 0 or either is not finite."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return (value - reference) / reference


def recommend(
    rows: Sequence[ScanRow], method: str, max_keep_increase: float, guards: Guards | None = None
) -> Recommendation:
    """The recommendation for `method` (see `Recommendation`); the expert (λ = 0) when no λ > 0 does better.

    Ties go to the smaller λ. A λ with a non-finite NLL or score (a diverged model) never qualifies."""
    guards = guards or Guards()
    expert = next((r for r in rows if r.method == EXPERT), None)
    if expert is None:
        return Recommendation(method, None, None, None, "no λ = 0 row to compare with (the scan stopped before it)")
    axis = next(((field, name) for field, name in AXES if getattr(expert, field) is not None), None)
    if axis is None:
        return Recommendation(method, None, None, None, NO_AXIS)
    field, name = axis
    best, best_score = expert, getattr(expert, field)
    excluded: list[tuple[float, str]] = []
    candidates = diverged = points = 0
    for row in sorted((r for r in rows if r.method == method), key=lambda r: r.lam):
        points += 1
        score = getattr(row, field)
        if not all(math.isfinite(v) for v in (row.keep_nll, row.forget_nll, score)):
            diverged += 1
            excluded.append((row.lam, "non-finite NLL or score (the model diverged)"))
            continue
        keep = relative_increase(row.keep_nll, expert.keep_nll)
        why = guards.failures(row, expert)
        if not (keep <= max_keep_increase):
            why.insert(0, f"KEEP-NLL {keep:+.1%}")
        if why:
            excluded.append((row.lam, "; ".join(why)))
            continue
        candidates += 1
        if score > best_score:
            best, best_score = row, score
    ruled_out = "; ".join(f"λ {lam:g}: {why}" for lam, why in excluded)
    ruled_out = f". Excluded: {ruled_out}" if ruled_out else ""
    if best is expert:
        if candidates:
            note = f"no λ > 0 of {method} that passes the KEEP budget and the guards raised {name}"
        elif diverged == points:
            note = f"every λ > 0 of {method} gave a non-finite NLL (the model diverged)"
        else:
            note = f"every λ > 0 of {method} was excluded"
        return Recommendation(
            method, 0.0, 0.0, 0.0, f"{note}; keep the expert (λ = 0){ruled_out}", name, best_score, tuple(excluded)
        )
    keep = relative_increase(best.keep_nll, expert.keep_nll)
    forget = relative_increase(best.forget_nll, expert.forget_nll)
    note = (
        f"{name} {best_score:.4g} (λ = 0: {getattr(expert, field):.4g}), KEEP-NLL {keep:+.1%} "
        f"(at most +{max_keep_increase:.1%} allowed){ruled_out}"
    )
    return Recommendation(method, best.lam, keep, forget, note, name, best_score, tuple(excluded))


def sample_records(method: str, lam: float, generations: Sequence) -> list[dict]:
    """The continuations of one point as samples.jsonl lines: prompt, method, λ, text, tokens (ids), ended."""
    return [
        {
            "method": method,
            "lam": lam,
            "prompt": g.prompt if isinstance(g.prompt, str) else list(g.prompt),
            "text": g.text,
            "tokens": list(g.token_ids),
            "ended": g.stopped,
        }
        for g in generations
    ]


def timing_summary(rows: Sequence[ScanRow]) -> dict[str, float | None]:
    """Medians over the rows: merge seconds, each evaluation's seconds, and the merge as a share of the cheapest
    evaluation (the budget for adapters: under 5 %)."""
    if not rows:
        return {}
    parts = {
        name: [getattr(r, f"{name}_seconds") for r in rows if getattr(r, f"{name}_seconds") is not None]
        for name in ("keep", "forget", "truth", "choices", "generate", "lm_eval")
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
    """A scan: its rows, a recommendation per method, timings and where it was written (iterating, `len()` and
    indexing go through `rows`).

    Attributes:
        rows: one ScanRow per point measured, in the grid's order (λ = 0 first, as method "expert").
        recommendations: per method, in the order scanned.
        status: "complete"; "running" (scan.json while the scan goes on); "interrupted" (Ctrl-C),
            "terminated" (SIGTERM) or "failed: <why>" (an error at a point): `rows` holds what was measured.
        points: how many points the scan was asked for.
        setup: what was scanned: inputs, sets, options, the PEM kind (as written to scan.json).
        timing: seconds of loading, preparing, the whole scan, and `timing_summary`.
        files: the files written (SCAN_DIR's scan.json, .csv, .md, .png, samples.jsonl), if any.
        saved: the `MergeReport` of `save_best=`, if asked.
        samples: every greedy continuation, as samples.jsonl holds them (`sample_records`).
    """

    rows: list[ScanRow]
    recommendations: dict[str, Recommendation]
    status: str
    points: int
    setup: dict
    timing: dict
    files: list[Path] = field(default_factory=list)
    saved: object | None = None
    samples: list[dict] = field(default_factory=list)

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
            d |= d.pop("lm_eval")
            d["keep_increase"] = relative_increase(r.keep_nll, expert.keep_nll) if expert else math.nan
            d["forget_increase"] = relative_increase(r.forget_nll, expert.forget_nll) if expert else math.nan
            d["truth_margin"] = r.truth_margin
            d["eval_seconds"] = r.eval_seconds
            out.append(d)
        return out

    def to_dict(self) -> dict:
        """Everything, as scan.json holds it (NaN written as null)."""
        from extsub_kernels.engine.record import jsonable  # here: the command line's parser reads Guards without torch

        record = {"status": self.status, "points": self.points, "measured": len(self.rows), **self.setup}
        record |= {"timing": self.timing, "recommended": {m: asdict(r) for m, r in self.recommendations.items()}}
        return jsonable({**record, "rows": self.table()})


_CSV = (  # scan.csv's columns, in order (lm-eval's follow)
    "method lam keep_nll keep_increase forget_nll forget_increase truth_nll truth_margin mc1 mc2 rep_4 distinct_1 "
    "distinct_2 mean_length end_rate merge_seconds keep_seconds forget_seconds truth_seconds choices_seconds "
    "generate_seconds lm_eval_seconds eval_seconds attempts"
)
COLUMNS = tuple(_CSV.split())
