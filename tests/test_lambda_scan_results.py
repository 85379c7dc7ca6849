"""lambda_scan.results and .report by hand: the recommendation rule, the timing summary, scan.json/csv/md."""

import json
import math

import pytest

from extsub_kernels.engine.record import json_text
from extsub_kernels.lambda_scan.report import csv_text, markdown_text
from extsub_kernels.lambda_scan.results import NO_AXIS, Guards, ScanResult, ScanRow, recommend, timing_summary


def _rows(*points: tuple) -> list[ScanRow]:
    """(method, λ, KEEP NLL, FORGET NLL, MC2) rows, one second of KEEP and two of FORGET each."""
    seconds = dict(merge_seconds=0.01, keep_seconds=1.0, forget_seconds=2.0)
    return [ScanRow(m, lam, keep, forget, mc2=mc2, **seconds) for m, lam, keep, forget, mc2 in points]


ROWS = _rows(
    ("expert", 0.0, 2.0, 5.0, 0.40),
    ("ext-sub", 0.5, 2.02, 6.0, 0.45),  # keep +1 %
    ("ext-sub", 1.0, 2.08, 7.0, 0.50),  # keep +4 %: the best MC2 within +5 %
    ("ext-sub", 2.0, 2.5, 9.0, 0.60),  # keep +25 %: over the budget
    ("sub", 0.5, 2.3, 6.5, 0.55),  # keep +15 %
    ("sub", 1.0, math.nan, 8.0, 0.7),  # a diverged model never qualifies
)


def test_the_best_mc2_within_the_keep_budget():
    rec = recommend(ROWS, "ext-sub", 0.05)
    assert (rec.lam, rec.axis, rec.score) == (1.0, "MC2", 0.5)
    assert rec.keep_increase == pytest.approx(0.04) and rec.forget_increase == pytest.approx(0.4)
    assert rec.note == "MC2 0.5 (λ = 0: 0.4), KEEP-NLL +4.0% (at most +5.0% allowed). Excluded: λ 2: KEEP-NLL +25.0%"
    assert recommend(ROWS, "ext-sub", 0.3).lam == 2.0  # a wider budget takes the larger λ
    assert recommend(ROWS, "ext-sub", 0.0).lam == 0.0  # no budget: the expert


def test_forget_nll_alone_is_never_the_objective():
    """Without choices, the axis is the FORGET − TRUTH margin; without TRUTH either, no λ is recommended."""
    rows = [
        ScanRow("expert", 0.0, 2.0, 5.0, truth_nll=3.0),
        ScanRow("sub", 1.0, 2.0, 9.0, truth_nll=8.0),  # FORGET +80 %, but the true answers suffered as much
        ScanRow("sub", 2.0, 2.0, 6.0, truth_nll=3.2),  # margin 2.8 > 2.0
    ]
    rec = recommend(rows, "sub", 0.05)
    assert (rec.lam, rec.axis, rec.score) == (2.0, "FORGET − TRUTH NLL margin", pytest.approx(2.8))
    bare = [ScanRow("expert", 0.0, 2.0, 5.0), ScanRow("sub", 1.0, 2.0, 9.0)]
    rec = recommend(bare, "sub", 0.05)
    assert rec.lam is None and rec.note == NO_AXIS


def test_the_guards_exclude_degenerate_generations_and_say_why():
    def row(lam, mc2, rep=0.02, distinct=0.8, length=20.0, ended=1.0):
        return ScanRow(
            "sub", lam, 2.0, 5.0, mc2=mc2, rep_4=rep, distinct_2=distinct, mean_length=length, end_rate=ended
        )

    expert = ScanRow("expert", 0.0, 2.0, 5.0, mc2=0.3, rep_4=0.02, distinct_2=0.8, mean_length=20.0, end_rate=1.0)
    rows = [
        expert,
        row(0.5, 0.4),
        row(1.0, 0.9, rep=0.3),
        row(1.5, 0.9, distinct=0.5),
        row(2.0, 0.9, length=64.0, ended=0.25),
        row(2.5, 0.9, length=9.0),
    ]
    rec = recommend(rows, "sub", 0.05)
    assert rec.lam == 0.5
    assert [lam for lam, _ in rec.excluded] == [1.0, 1.5, 2.0, 2.5]
    why = dict(rec.excluded)
    assert why[1.0] == "rep-4 0.300 > 0.020 + 0.05"
    assert why[1.5] == "distinct-2 0.500 < 0.800 − 0.1"
    assert why[2.0] == "end rate 25% < 100% − 20%; length 64.0 tokens vs 20.0 (±50%)"
    assert why[2.5] == "length 9.0 tokens vs 20.0 (±50%)"
    assert "Excluded: λ 1: rep-4 0.300 > 0.020 + 0.05; λ 1.5:" in rec.note
    loose = Guards(max_rep_increase=1, max_distinct_drop=1, max_length_change=10, max_end_drop=1)
    assert recommend(rows, "sub", 0.05, loose).lam == 1.0  # ties at 0.9 go to the smaller λ
    with_nan = [expert, row(1.0, 0.9, rep=math.nan)]  # no continuation had 4 tokens: no evidence either way
    assert recommend(with_nan, "sub", 0.05).lam == 1.0


def test_the_expert_when_nothing_qualifies():
    rec = recommend(ROWS, "sub", 0.05)
    assert (rec.lam, rec.keep_increase, rec.forget_increase) == (0.0, 0.0, 0.0)
    assert rec.note == (
        "every λ > 0 of sub was excluded; keep the expert (λ = 0). Excluded: λ 0.5: KEEP-NLL +15.0%; "
        "λ 1: non-finite NLL or score (the model diverged)"
    )
    falling = _rows(("expert", 0.0, 2.0, 5.0, 0.4), ("sub", 1.0, 2.0, 4.0, 0.3))
    assert recommend(falling, "sub", 0.05).note.startswith("no λ > 0 of sub that passes the KEEP budget and the guards")
    assert recommend(_rows(("sub", 1.0, 2.0, 4.0, 0.3)), "sub", 0.05).lam is None  # no λ = 0 row to compare with


def test_a_diverged_model_is_never_recommended():
    """A λ whose model gives a non-finite NLL or score (its logits overflowed the evaluation dtype) is measured,
    never chosen, even where only FORGET-NLL is infinite."""
    rows = _rows(("expert", 0.0, 2.0, 5.0, 0.4), ("sub", 0.5, 2.0, math.inf, 0.9), ("sub", 1.0, 2.0, 5.0, math.nan))
    rec = recommend(rows, "sub", 1.0)
    assert rec.lam == 0.0
    assert rec.note.startswith("every λ > 0 of sub gave a non-finite NLL (the model diverged); keep the expert")
    rows.append(_rows(("sub", 0.2, 2.01, 5.5, 0.5))[0])
    assert recommend(rows, "sub", 1.0).lam == 0.2


def test_ties_go_to_the_smaller_lambda():
    rows = _rows(("expert", 0.0, 2.0, 5.0, 0.4), ("sub", 1.0, 2.0, 6.0, 0.5), ("sub", 0.5, 2.0, 6.0, 0.5))
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
    data = json.loads(json_text(_result("interrupted").to_dict()))
    assert data["status"] == "interrupted" and data["points"] == 7 and data["measured"] == 6
    diverged = data["rows"][5]
    assert diverged["keep_nll"] is None and diverged["keep_increase"] is None  # NaN is null in JSON
    assert data["rows"][2]["forget_increase"] == pytest.approx(0.4) and data["rows"][2]["mc2"] == 0.5
    assert data["recommended"]["ext-sub"]["lam"] == 1.0 and data["timing"]["smallest_evaluation"] == "keep"


def test_csv_and_markdown():
    lines = csv_text(_result()).splitlines()
    assert lines[0] == (
        "method,lam,keep_nll,keep_increase,forget_nll,forget_increase,truth_nll,truth_margin,mc1,mc2,"
        "rep_4,distinct_1,distinct_2,mean_length,end_rate,merge_seconds,keep_seconds,forget_seconds,"
        "truth_seconds,choices_seconds,generate_seconds,lm_eval_seconds,eval_seconds,attempts"
    )
    assert lines[3].startswith("ext-sub,1.0,2.08,0.04") and lines[6].startswith("sub,1.0,,,8.0,")
    text = markdown_text(_result())
    assert "| method | λ | KEEP NLL | Δ KEEP | FORGET NLL | Δ FORGET | MC2 | merge s | eval s |" in text
    assert "| ext-sub ★ | 1 | 2.0800 | +4.0% | 7.0000 | +40.0% | 0.5000 | 0.0100 | 3.000 |" in text
    assert "| expert ★ | 0 |" in text  # sub's recommendation: the expert
    assert "| sub | 1 | – | – | 8.0000 |" in text
    assert "- **sub**: λ = 0: every λ > 0 of sub was excluded" in text
    assert "= 1.00% of the smallest evaluation (keep: 1 s)" in text
    assert "rep-4" not in text  # no generation columns without prompts
