"""A scan's files in SCAN_DIR: scan.json (everything), scan.csv (the rows), scan.md (the table), scan.png (the plot),
samples.jsonl (every greedy continuation). Each is replaced whole, scan.json after every row: a reader at any moment
finds the rows measured so far, never half a file."""

import csv
import functools
import io
import json
import math
from pathlib import Path

from extsub_kernels.engine.record import json_text
from extsub_kernels.io.atomic import replace_file
from extsub_kernels.lambda_scan.plot import plot_png
from extsub_kernels.lambda_scan.results import COLUMNS, EXPERT, ScanResult, relative_increase

SCAN_FILES = ("scan.json", "scan.csv", "scan.md", "scan.png", "samples.jsonl")


class ScanFiles:
    """Writes a scan's files into `folder` (created on the first write); `written` lists what is there."""

    def __init__(self, folder: Path):
        self.folder = folder
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
        """scan.json (and samples.jsonl) with the rows so far (called after every row)."""
        self._write("scan.json", json_text(result.to_dict()).encode())  # as every report file of the package
        if result.samples:  # one JSON object per continuation (`results.sample_records`), in the order measured
            samples = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in result.samples)
            self._write("samples.jsonl", samples.encode())

    def final(self, result: ScanResult) -> list[Path]:
        """Every file, from the result as it stands (complete, or stopped early); returns their paths."""
        self.progress(result)
        self._write("scan.csv", csv_text(result).encode())
        self._write("scan.md", markdown_text(result).encode())
        if result.rows:
            self._write("scan.png", plot_png(result))
        return [self.folder / name for name in SCAN_FILES if self.folder / name in self.written]


def csv_text(result: ScanResult) -> str:
    """One line per row, the columns of `results.COLUMNS` and lm-eval's; empty cells for what was not measured."""
    buffer = io.StringIO()
    fields = [*COLUMNS, *harness_columns(result)]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
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
    scanned = (
        f"Expert `{inputs.get('expert')}`, anti-expert(s) {antis}, base `{inputs.get('base')}` ({setup.get('pem')}): "
        f"{len(result.rows)} of {result.points} points measured{status}."
    )
    text = f"# Ext-Sub λ scan\n\n{scanned}\n\n{markdown_table(result)}"
    timing = result.timing
    if "merge_seconds_median" in timing:
        share = timing["merge_share_of_smallest_evaluation"]
        smallest = timing["smallest_evaluation"]
        cost = f" = {share:.2%} of the smallest evaluation ({smallest}: {timing[f'{smallest}_seconds_median']:.4g} s)"
        text += (
            f"\n\nMerge per point (median): {timing['merge_seconds_median']:.4g} s{cost if share is not None else ''}. "
            f"Model loaded in {timing['load_seconds']:.3g} s; the scan took {timing['total_seconds']:.3g} s."
        )
    return text + "\n"


def markdown_table(result: ScanResult) -> str:
    """The rows as a Markdown table (★ on each method's recommended λ), then one line per recommendation."""
    rows = result.table()
    measured = {key for row in rows for key, value in row.items() if value is not None}
    columns = [("keep_nll", "KEEP NLL", _f), ("keep_increase", "Δ KEEP", _pct)]
    columns += [("forget_nll", "FORGET NLL", _f), ("forget_increase", "Δ FORGET", _pct)]
    columns += [("truth_margin", "FORGET − TRUTH", _f), ("mc1", "MC1", _f), ("mc2", "MC2", _f)]
    columns += [("rep_4", "rep-4", _f), ("distinct_2", "distinct-2", _f), ("mean_length", "length", _f1)]
    columns += [("end_rate", "ended", _pct0)]
    columns += [(name, name.removeprefix("lm_eval:"), _f) for name in harness_columns(result) if "_stderr" not in name]
    columns += [("merge_seconds", "merge s", _f4), ("eval_seconds", "eval s", _f3)]
    columns = [c for c in columns if c[0] in measured]
    head = ["method", "λ", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    starred = {(EXPERT if r.lam == 0 else m, r.lam) for m, r in result.recommendations.items() if r.lam is not None}
    for row in rows:
        mark = " ★" if (row["method"], row["lam"]) in starred else ""
        cells = [f"{row['method']}{mark}", f"{row['lam']:g}", *(show(row[key]) for key, _, show in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    options = result.setup.get("options", {})
    budget = options.get("max_keep_increase", 0)
    lines += [
        "",
        "★ recommended: the λ with the best MC2 (with multiple-choice questions; else the FORGET − TRUTH margin) "
        f"whose KEEP-NLL rose at most {budget:.1%} over λ = 0 and whose generations pass the guards "
        f"({_guards(options.get('guards'))}):",
        "",
    ]
    for method, rec in result.recommendations.items():
        lines.append(f"- **{method}**: λ = {'none' if rec.lam is None else f'{rec.lam:g}'}: {rec.note}")
    return "\n".join(lines)


def harness_columns(result: ScanResult) -> list[str]:
    """The rows' lm-eval metric columns (`harness.metric_columns`), sorted."""
    return sorted({name for row in result.rows for name in row.lm_eval})


def _guards(guards: dict | None) -> str:
    if not guards:
        return "none"
    return (
        f"rep-4 at most +{guards['max_rep_increase']:g}, distinct-2 at most −{guards['max_distinct_drop']:g}, "
        f"mean length within ±{guards['max_length_change']:.0%}, share ended at most −{guards['max_end_drop']:.0%}"
    )


def _f(value: float | None, digits: int = 4, spec: str = "f") -> str:
    """`value` to `digits` places (spec "f", "+%" or "%"), "–" where it was not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:{spec[:-1]}.{digits}{spec[-1]}}"


_f1, _f3, _f4 = (functools.partial(_f, digits=d) for d in (1, 3, 4))
_pct, _pct0 = functools.partial(_f, digits=1, spec="+%"), functools.partial(_f, digits=0, spec="%")


def chosen_note(result: ScanResult, method: str) -> str:
    """The model-card section of the best merge (`save_best=`): the scan that chose the recommended λ of `method`
    and the row measured there."""
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
    for name, label in (("rep_4", "rep-4"), ("distinct_2", "distinct-2")):
        if getattr(row, name) is not None:
            measured.append(f"{label} {getattr(row, name):.4g} (λ = 0: {getattr(expert, name):.4g})")
    chosen = (
        f"λ = {rec.lam:g} is the recommendation for {method} of an `extsub-scan` on BASE "
        f"`{setup['inputs']['base']}`: grid λ ∈ {{{grid}}}, methods {', '.join(options['methods'])}, "
        f"{', '.join(described)}, KEEP budget {options['max_keep_increase']:+.1%} ({rec.note})."
    )
    return f"## How λ was chosen\n\n{chosen}\n\nMeasured at this λ: {'; '.join(measured)}.\n"


def _change(value: float, reference: float) -> str:
    change = relative_increase(value, reference)
    return "n/a" if math.isnan(change) else f"{change:+.2%}"
