"""lambda_scan.results and .report by hand: the recommendation rule, the timing summary, scan.json/csv/md."""

import json
import math

import pytest

from extsub_kernels.lambda_scan.report import csv_text, json_text, markdown_text
from extsub_kernels.lambda_scan.results import ScanResult, ScanRow, recommend, timing_summary


def _rows(*points: tuple[str, float, float, float]) -> list[ScanRow]:
    seconds = dict(merge_seconds=0.01, keep_seconds=1.0, forget_seconds=2.0)
    return [ScanRow(m, lam, keep, forget, **seconds) for m, lam, keep, forget in points]


ROWS = _rows(
    ("expert", 0.0, 2.0, 5.0),
    ("ext-sub", 0.5, 2.02, 6.0),  # keep +1 %, forget +20 %
    ("ext-sub", 1.0, 2.08, 7.0),  # keep +4 %, forget +40 %: the best within +5 %
    ("ext-sub", 2.0, 2.5, 9.0),  # keep +25 %: over the budget
    ("sub", 0.5, 2.3, 6.5),  # keep +15 %
    ("sub", 1.0, math.nan, 8.0),  # a diverged model never qualifies
)


def test_the_largest_forget_increase_within_the_keep_budget():
    rec = recommend(ROWS, "ext-sub", 0.05)
    assert rec.lam == 1.0
    assert rec.keep_increase == pytest.approx(0.04) and rec.forget_increase == pytest.approx(0.4)
    assert rec.note == "FORGET-NLL +40.0%, KEEP-NLL +4.0% (at most +5.0% allowed)"
    assert recommend(ROWS, "ext-sub", 0.3).lam == 2.0  # a wider budget takes the larger λ
    assert recommend(ROWS, "ext-sub", 0.0).lam == 0.0  # no budget: the expert


def test_the_expert_when_nothing_qualifies():
    rec = recommend(ROWS, "sub", 0.05)
    assert (rec.lam, rec.keep_increase, rec.forget_increase) == (0.0, 0.0, 0.0)
    assert rec.note == (
        "every λ > 0 of sub raised KEEP-NLL by more than 5.0% or gave a non-finite NLL (the model diverged); "
        "keep the expert (λ = 0)"
    )
    falling = _rows(("expert", 0.0, 2.0, 5.0), ("sub", 1.0, 2.0, 4.0))
    assert recommend(falling, "sub", 0.05).note.startswith("no λ > 0 of sub raised FORGET-NLL with KEEP-NLL within")
    assert recommend(_rows(("sub", 1.0, 2.0, 4.0)), "sub", 0.05).lam is None  # no λ = 0 row to compare with


def test_a_diverged_model_is_never_recommended():
    """A λ whose model gives a non-finite NLL (its logits overflowed the evaluation dtype) is measured, never chosen,
    even where only FORGET-NLL is infinite."""
    rows = _rows(("expert", 0.0, 2.0, 5.0), ("sub", 0.5, 2.0, math.inf), ("sub", 1.0, math.nan, math.nan))
    rec = recommend(rows, "sub", 1.0)
    assert rec.lam == 0.0
    assert rec.note == "every λ > 0 of sub gave a non-finite NLL (the model diverged); keep the expert (λ = 0)"
    rows.append(_rows(("sub", 0.2, 2.01, 5.5))[0])
    assert recommend(rows, "sub", 1.0).lam == 0.2


def test_ties_go_to_the_smaller_lambda():
    rows = _rows(("expert", 0.0, 2.0, 5.0), ("sub", 0.5, 2.0, 6.0), ("sub", 1.0, 2.0, 6.0))
    assert recommend(rows, "sub", 0.05).lam == 0.5


def test_timing_summary():
    rows = [
        ScanRow("expert", 0.0, 1, 1, merge_seconds=0.5, keep_seconds=2.0, forget_seconds=1.0, generate_seconds=4.0),
        ScanRow("sub", 1.0, 1, 1, merge_seconds=0.1, keep_seconds=2.0, forget_seconds=3.0, generate_seconds=4.0),
        ScanRow("sub", 2.0, 1, 1, merge_seconds=0.2, keep_seconds=2.0, forget_seconds=1.5, generate_seconds=4.0),
    ]
    summary = timing_summary(rows)
    assert summary["merge_seconds_median"] == 0.2 and summary["forget_seconds_median"] == 1.5
    assert summary["smallest_evaluation"] == "forget"
    assert summary["merge_share_of_smallest_evaluation"] == pytest.approx(0.2 / 1.5)
    assert summary["eval_seconds_total"] == pytest.approx(3 * 6 + 5.5) and summary["merge_seconds_total"] == 0.8
    assert timing_summary([]) == {}


def _result(status: str = "complete") -> ScanResult:
    recs = {m: recommend(ROWS, m, 0.05) for m in ("ext-sub", "sub")}
    setup = {"inputs": {"expert": "e", "anti": ["a"], "base": "b"}, "pem": "LoRA adapters"}
    setup["options"] = {"max_keep_increase": 0.05}
    timing = timing_summary(ROWS) | {"load_seconds": 1.0, "total_seconds": 20.0}
    return ScanResult(list(ROWS), recs, status, 7, setup, timing)


def test_scan_json_has_no_nan_and_every_field():
    data = json.loads(json_text(_result("interrupted")))
    assert data["status"] == "interrupted" and data["points"] == 7 and data["measured"] == 6
    diverged = data["rows"][5]
    assert diverged["keep_nll"] is None and diverged["keep_increase"] is None  # NaN is null in JSON
    assert data["rows"][2]["forget_increase"] == pytest.approx(0.4)
    assert data["recommended"]["ext-sub"]["lam"] == 1.0 and data["timing"]["smallest_evaluation"] == "keep"


def test_csv_and_markdown():
    lines = csv_text(_result()).splitlines()
    assert lines[0] == (
        "method,lam,keep_nll,keep_increase,forget_nll,forget_increase,rep_4,distinct_1,distinct_2,"
        "merge_seconds,keep_seconds,forget_seconds,generate_seconds,eval_seconds"
    )
    assert lines[3].startswith("ext-sub,1.0,2.08,0.04") and lines[6].startswith("sub,1.0,,,8.0,")
    text = markdown_text(_result())
    assert "| ext-sub ★ | 1 | 2.0800 | +4.0% | 7.0000 | +40.0% | 0.0100 | 3.000 |" in text
    assert "| expert ★ | 0 |" in text  # sub's recommendation: the expert
    assert "| sub | 1 | – | – | 8.0000 |" in text
    assert "- **sub**: λ = 0: every λ > 0 of sub raised KEEP-NLL" in text
    assert "= 1.00% of the smallest evaluation (keep: 1 s)" in text
    assert "rep-4" not in text  # no generation columns without prompts
