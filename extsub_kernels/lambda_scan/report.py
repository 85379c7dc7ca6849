"""A scan's files in SCAN_DIR: scan.json (everything), scan.csv (the rows), scan.md (the table), scan.png (the plot).

Each file is replaced whole (temporary file, fsync, rename), and scan.json after every row, so
a Ctrl-C, a crash or a reader at any moment finds the rows measured so far, never half a file.
"""

import csv
import io
import math
from pathlib import Path

from extsub_kernels.engine.record import json_text as record_json_text
from extsub_kernels.io.atomic import replace_file
from extsub_kernels.lambda_scan.plot import plot_png
from extsub_kernels.lambda_scan.results import COLUMNS, EXPERT, ScanResult, relative_increase

SCAN_FILES = ("scan.json", "scan.csv", "scan.md", "scan.png")


class ScanFiles:
    """Writes a scan's files into `folder` (created on the first write); `written` lists what is there."""

    def __init__(self, folder: Path, *, force: bool):
        self.folder, self.force = folder, force
        self.written: list[Path] = []
        self._cleared = False

    def _write(self, name: str, data: bytes) -> None:
        if not self._cleared:  # an earlier scan's files (allowed by force) must not mix with this one's
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in SCAN_FILES:
                (self.folder / stale).unlink(missing_ok=True)
            self._cleared = True
        path = self.folder / name
        replace_file(path, data)
        if path not in self.written:
            self.written.append(path)

    def progress(self, result: ScanResult) -> None:
        """scan.json with the rows so far (called after every row)."""
        self._write("scan.json", json_text(result).encode())

    def final(self, result: ScanResult) -> list[Path]:
        """Every file, from the result as it stands (complete, or stopped early); returns their paths."""
        self._write("scan.json", json_text(result).encode())
        self._write("scan.csv", csv_text(result).encode())
        self._write("scan.md", markdown_text(result).encode())
        if result.rows:
            self._write("scan.png", plot_png(result))
        return list(self.written)


def json_text(result: ScanResult) -> str:
    """scan.json: `ScanResult.to_dict()` as every report file of the package holds JSON (engine.record)."""
    return record_json_text(result.to_dict())


def csv_text(result: ScanResult) -> str:
    """One line per row, the columns of `results.COLUMNS`; empty cells for what was not measured."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result.table():
        writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in row.items()})
    return buffer.getvalue()


def markdown_text(result: ScanResult) -> str:
    """scan.md: what was scanned, the table with the recommendations, and what the merges and evaluations cost."""
    setup = result.setup
    inputs = setup.get("inputs", {})
    antis = ", ".join(f"`{a}`" for a in inputs.get("anti", []))
    status = "" if result.complete else f" ({result.status})"
    lines = [
        "# Ext-Sub λ scan",
        "",
        f"Expert `{inputs.get('expert')}`, anti-expert(s) {antis}, base `{inputs.get('base')}` ({setup.get('pem')}): "
        f"{len(result.rows)} of {result.points} points measured{status}.",
        "",
        markdown_table(result),
    ]
    timing = result.timing
    if "merge_seconds_median" in timing:
        share = timing["merge_share_of_smallest_evaluation"]
        smallest = timing["smallest_evaluation"]
        cost = f" = {share:.2%} of the smallest evaluation ({smallest}: {timing[f'{smallest}_seconds_median']:.4g} s)"
        lines += [
            "",
            f"Merge per point (median): {timing['merge_seconds_median']:.4g} s{cost if share is not None else ''}. "
            f"Model loaded in {timing['load_seconds']:.3g} s; the scan took {timing['total_seconds']:.3g} s.",
        ]
    return "\n".join(lines) + "\n"


def markdown_table(result: ScanResult) -> str:
    """The rows as a Markdown table (★ on each method's recommended λ), then one line per recommendation."""
    rows = result.table()
    generation = any(r["rep_4"] is not None for r in rows)
    head = ["method", "λ", "KEEP NLL", "Δ KEEP", "FORGET NLL", "Δ FORGET"]
    head += ["rep-4", "distinct-2"] if generation else []
    head += ["merge s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    starred = {(EXPERT if r.lam == 0 else m, r.lam) for m, r in result.recommendations.items() if r.lam is not None}
    for row in rows:
        mark = " ★" if (row["method"], row["lam"]) in starred else ""
        cells = [f"{row['method']}{mark}", f"{row['lam']:g}", _f(row["keep_nll"]), _pct(row["keep_increase"])]
        cells += [_f(row["forget_nll"]), _pct(row["forget_increase"])]
        cells += [_f(row["rep_4"]), _f(row["distinct_2"])] if generation else []
        cells += [_f(row["merge_seconds"], 4), _f(row["eval_seconds"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    budget = result.setup.get("options", {}).get("max_keep_increase", 0)
    lines += [
        "",
        f"★ recommended: the λ with the largest FORGET-NLL increase whose KEEP-NLL rose at most {budget:.1%} "
        "over λ = 0:",
        "",
    ]
    for method, rec in result.recommendations.items():
        lines.append(f"- **{method}**: λ = {'none' if rec.lam is None else f'{rec.lam:g}'}: {rec.note}")
    return "\n".join(lines)


def _f(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.1%}"


def chosen_note(result: ScanResult, method: str) -> str:
    """The model-card section of --save-best's output: the scan that chose its λ and the row measured there.

    Args:
        result: the complete scan.
        method: the method whose recommended λ is saved.
    """
    rec = result.recommendations[method]
    setup, row, expert = result.setup, result.row(method, rec.lam), result.row(method, 0.0)
    options, sets = setup["options"], setup["sets"]
    grid = ", ".join(f"{x:g}" for x in sorted({0.0, *options["lam"]}))
    described = [
        f"{name.upper()} `{info['file']}` ({info['examples']} examples, {info['scored_tokens']} scored tokens)"
        for name, info in sets.items()
        if name in ("keep", "forget")
    ]
    if "prompts" in sets:
        described.append(f"PROMPTS `{sets['prompts']['file']}` ({sets['prompts']['prompts']} prompts)")
    measured = [
        f"KEEP NLL {row.keep_nll:.6g} ({_change(row.keep_nll, expert.keep_nll)} over λ = 0)",
        f"FORGET NLL {row.forget_nll:.6g} ({_change(row.forget_nll, expert.forget_nll)})",
    ]
    if row.rep_4 is not None:
        measured.append(f"rep-4 {row.rep_4:.4g} (λ = 0: {expert.rep_4:.4g})")
    if row.distinct_2 is not None:
        measured.append(f"distinct-2 {row.distinct_2:.4g} (λ = 0: {expert.distinct_2:.4g})")
    return "\n".join(
        [
            "## How λ was chosen",
            "",
            f"λ = {rec.lam:g} is the recommendation for {method} of an `extsub-scan` on BASE "
            f"`{setup['inputs']['base']}`: grid λ ∈ {{{grid}}}, methods {', '.join(options['methods'])}, "
            f"{', '.join(described)}, KEEP budget {options['max_keep_increase']:+.1%} ({rec.note}).",
            "",
            f"Measured at this λ: {'; '.join(measured)}.",
            "",
        ]
    )


def _change(value: float, reference: float) -> str:
    change = relative_increase(value, reference)
    return "n/a" if math.isnan(change) else f"{change:+.2%}"
