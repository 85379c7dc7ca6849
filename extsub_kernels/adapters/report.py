"""What an adapter merge did to each unit (LoRA module, (IA)³ vector, prompt embedding): the adapter section."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extsub_kernels.engine.method_spec import method_spec
from extsub_kernels.engine.report import Item


@dataclass
class AdapterReport:
    """What a merge did, unit by unit (`pem`, `unit`, `row` name them in the summary); non-adapter tensors (full
    weights) are copied from the expert, merged against a base, or left out of a delta output (`extra_*`)."""

    method: str
    lams: tuple[float, ...]
    pem: str = "LoRA"
    unit: str = "module"
    row: str = "row"
    delta: str = "ΔW⁻"  # the symbol of an anti-expert's task vector
    merged: list[str] = field(default_factory=list)  # expert and ≥ 1 anti-expert
    copied: list[str] = field(default_factory=list)  # expert only: unchanged
    dropped: list[str] = field(default_factory=list)  # anti-experts only, a row-pairing method: |p| = 0 kept
    added: list[str] = field(default_factory=list)  # anti-experts only, an elementwise method: ∓λ·(task vector)
    zero_rows: dict[str, int] = field(default_factory=dict)  # rows with |p| = 0, kept unchanged
    truncation_error: dict[str, float] = field(default_factory=dict)  # relative Frobenius error
    extra_copied: list[str] = field(default_factory=list)
    extra_merged: list[str] = field(default_factory=list)
    extra_left_out: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: method and λ, counts per outcome, dropped modules and the truncation error."""
        return f"{self.method} λ={','.join(f'{lam:g}' for lam in self.lams)}: {summarize_modules([self])}"

    def details(self) -> list[str]:
        """One line per truncated module with its truncation error."""
        return [f"{name}: relative truncation error {error:.6g}" for name, error in self.truncation_error.items()]


def summarize_modules(reports: Sequence[AdapterReport]) -> str:
    """The module part of a summary line over a run's reports (counts from the first: they do not depend on λ)."""
    first = reports[0]
    total = len(first.merged) + len(first.copied) + len(first.dropped) + len(first.added)
    parts = [
        f"{counted(total, f'{first.pem} {first.unit}')}: {len(first.merged)} merged",
        f"{len(first.copied)} copied from the expert",
    ]
    if first.dropped:
        shown = ", ".join(first.dropped[:3]) + (" …" if len(first.dropped) > 3 else "")
        parts.append(f"{len(first.dropped)} only in anti-experts, {method_spec(first.method).dropped}: {shown}")
    if first.added:
        sign = method_spec(first.method).sign
        parts.append(f"{len(first.added)} only in anti-experts, added as {sign}λ·{first.delta}")
    rows = max(sum(r.zero_rows.values()) for r in reports)
    if rows:
        parts.append(f"{counted(rows, f'expert {first.row}')} with |p| = 0 kept unchanged")
    truncation = truncation_summary(reports)
    if truncation is not None:
        parts.append(truncation)
    for names, what in (
        (first.extra_copied, "copied from the expert"),
        (first.extra_merged, "merged as task vectors against BASE"),
        (first.extra_left_out, "left out (full weights, not deltas)"),
    ):
        if names:
            parts.append(f"{len(names)} non-{first.pem} tensors {what}")
    return "; ".join(parts)


def truncation_summary(reports: Sequence[AdapterReport]) -> str | None:
    """The --max-rank truncation error, max and mean over every module of every report; None without --max-rank."""
    errors = [(error, name) for r in reports for name, error in r.truncation_error.items()]
    if not errors:
        return None
    if max(errors)[0] == 0:
        return "no module above --max-rank, nothing truncated"
    worst, where = max(errors)
    mean = sum(e for e, _ in errors) / len(errors)
    return f"relative truncation error (Frobenius) max {worst:.3g} ({where}), mean {mean:.3g}"


def counted(n: int, noun: str) -> str:
    """A count and its noun, in the plural unless it is one: "1 LoRA module", "2 LoRA modules"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class AdapterSection:
    """The adapter section of a MergeReport: one AdapterReport per output (λ setting)."""

    reports: tuple[AdapterReport, ...]

    def summary(self) -> str:
        """The module part of the summary line, over every output."""
        return summarize_modules(self.reports)

    def details(self, outputs: Sequence[Path]) -> list[str]:
        """Per-module truncation errors, prefixed by their output (none for an inspection: no output)."""
        if not outputs:
            return []
        pairs = zip(outputs, self.reports, strict=True)
        return [f"{path}: {line}" for path, report in pairs for line in report.details()]


def adapter_items(
    report: AdapterReport, shapes: Mapping[str, tuple[tuple[int, ...], str]], roles: Sequence[str]
) -> list[Item]:
    """What a merge did with each unit and non-adapter tensor (from the first λ setting's `report`; `shapes`: name →
    (shape, dtype code) as written; `roles` for the reasons), for dry runs, verbose output and the report."""
    antis = " or ".join(roles[1:])
    spec = method_spec(report.method)
    outcomes = [
        (report.merged, "merged", f"in EXPERT and {antis}"),
        (report.copied, "copied", "in EXPERT only: unchanged"),
        (report.dropped, "dropped", f"only in {antis}: {spec.dropped}"),
        (report.added, "added", f"only in {antis}: added as {spec.sign}λ·{report.delta}"),
    ]
    items = [
        Item(name, report.unit, action, reason, *shapes.get(name, ((), None)))
        for names, action, reason in outcomes
        for name in names
    ]
    for names, action, reason in (
        (report.extra_copied, "copied", "a full weight (modules_to_save, bias): the expert's, unchanged"),
        (report.extra_merged, "merged", "a full weight: merged as a task vector against BASE"),
        (report.extra_left_out, "skipped", "a full weight, not a delta: left out of the delta format"),
    ):
        items += [Item(name, f"non-{report.pem} tensor", action, reason) for name in names]
    return items
