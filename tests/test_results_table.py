"""benchmarks/results_table.py: every benchmark appends numbers to one long CSV; RESULTS.md's table is derived."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_table", ROOT / "benchmarks" / "results_table.py")
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)


def test_rows_become_one_line_per_number_and_the_newest_wins(tmp_path):
    csv_path = tmp_path / "results.csv"
    rows = [{"shape": [64, 32], "dtype": "bf16", "gb_per_s": 1.5, "ms": 2, "impl": "cpp", "ok": True}]
    assert results_table.append("op", rows, device="cpu", date="2026-01-01", path=csv_path) == 2
    again = [{"shape": [64, 32], "dtype": "bf16", "gb_per_s": 3.0}]
    assert results_table.append("op", again, device="cpu", date="2026-01-02", path=csv_path) == 1
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ",".join(results_table.COLUMNS) and len(lines) == 4  # header once, history kept
    newest = {line["metric"]: line for line in results_table.newest(csv_path)}
    assert newest["gb_per_s"]["value"] == "3.0" and newest["gb_per_s"]["date"] == "2026-01-02"
    assert newest["ms"]["value"] == "2" and newest["ms"]["shape"] == "64x32"


def test_the_generated_section_of_results_md_is_replaced_not_repeated(tmp_path):
    csv_path, md = tmp_path / "results.csv", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nprose that stays\n")
    results_table.append(
        "merge", [{"shape": "1 layer", "dtype": "bf16", "seconds": 4.0}], device="cpu", date="d1", path=csv_path
    )
    results_table.regenerate(md, csv_path)
    results_table.append(
        "merge", [{"shape": "1 layer", "dtype": "bf16", "seconds": 3.5}], device="cpu", date="d2", path=csv_path
    )
    results_table.regenerate(md, csv_path)
    text = md.read_text()
    assert text.startswith("# Results\n\nprose that stays\n") and text.count(results_table.BEGIN) == 1
    assert "| cpu | 1 layer | bf16 | seconds | 3.5 | d2 |" in text and "| 4.0 |" not in text
