"""benchmarks/results_table.py and _common.record: every benchmark appends numbers to one long CSV; RESULTS.md's
tables are derived from it."""

import csv
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # _common imports results_table by name, as the benchmarks do
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


results_table = _load("results_table")


def _line(date: str, value: str, metric: str = "ms.ours", shape: str = "64x32") -> dict:
    return {"commit": "abc1234", "date": date, "device": "cpu", "benchmark": "op", "shape": shape, "dtype": "bf16"} | {
        "metric": metric,
        "value": value,
    }


def test_record_writes_one_median_line_per_configuration_and_metric(tmp_path):
    common = _load("_common")
    path = tmp_path / "results.csv"
    reps = [
        {"shape": [64, 32], "dtype": "bf16", "run": "sub", "seconds": s, "rep": i, "ms": {"ours": 2.0}, "ok": True}
        for i, s in enumerate((3.0, 1.0, 2.0))
    ]
    count = common.record(
        "merge", reps, variant="run", commit="abc1234", date="2026-01-01", device_name="cpu", path=path
    )
    lines = list(csv.DictReader(path.open()))
    assert count == 2 and tuple(lines[0]) == results_table.COLUMNS
    values = {line["metric"]: line["value"] for line in lines}
    assert values == {"seconds.sub": "2", "ms.ours": "2"}  # the median of the reps; rep and the flag are not metrics
    assert {(line["shape"], line["benchmark"], line["commit"]) for line in lines} == {("64x32", "merge", "abc1234")}


def test_the_newest_line_of_a_configuration_wins_and_the_history_stays(tmp_path):
    path = tmp_path / "results.csv"
    results_table.append([_line("2026-01-02", "3.0"), _line("2026-01-01", "9.0")], path=path)
    results_table.append([_line("2026-01-02", "2.5"), _line("2026-01-01", "7.0", shape="8x8")], path=path)
    assert len(results_table.read(path)) == 4  # nothing rewritten: header once, every line kept
    newest = {line["shape"]: line["value"] for line in results_table.newest(path)}
    assert newest == {"64x32": "2.5", "8x8": "7.0"}  # latest date; of one date, the line appended last


def test_the_table_shows_each_variant_of_a_measure_in_one_cell(tmp_path):
    lines = [_line("d", "1.25"), _line("d", "2", metric="ms.copy"), _line("d", "4e9", metric="peak_rss_bytes")]
    toy = results_table.markdown([line | {"benchmark": "toy"} for line in lines])  # every measure shown
    assert "| cpu | 64x32 | bf16 | ours 1.25 · copy 2 | 4 GB | d | abc1234 |" in toy.splitlines()
    op = results_table.markdown(lines)  # SHOWN names the op's ms and gbps; the rest is named below the table
    assert "| cpu | 64x32 | bf16 | ours 1.25 · copy 2 | d | abc1234 |" in op.splitlines()
    assert "peak_rss_bytes" not in op


def test_the_generated_section_of_results_md_is_replaced_not_repeated(tmp_path):
    path, md = tmp_path / "results.csv", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nprose that stays\n")
    results_table.append([_line("d1", "4.0")], path=path)
    results_table.regenerate(md, path)
    results_table.append([_line("d2", "3.5")], path=path)
    assert results_table.main(["--csv", str(path), "--results-md", str(md), "--check"]) == 1
    results_table.regenerate(md, path)
    text = md.read_text()
    assert text.startswith("# Results\n\nprose that stays\n") and text.count(results_table.BEGIN) == 1
    assert "| ours 3.5 | d2 |" in text and "ours 4 " not in text
    assert results_table.main(["--csv", str(path), "--results-md", str(md), "--check"]) == 0


def test_add_appends_another_machines_lines(tmp_path):
    path, other, md = tmp_path / "results.csv", tmp_path / "gpu.csv", tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    results_table.append([_line("d1", "4.0")], path=path)
    results_table.append([_line("d2", "0.5") | {"device": "NVIDIA H100"}], path=other)
    assert results_table.main(["--csv", str(path), "--results-md", str(md), "--add", str(other)]) == 0
    assert [line["device"] for line in results_table.read(path)] == ["cpu", "NVIDIA H100"]
    assert "| NVIDIA H100 | 64x32 | bf16 | ours 0.5 |" in md.read_text()


def test_the_committed_results_md_shows_what_the_committed_csv_gives():
    assert results_table.committed_section() == results_table.section(), (
        "RESULTS.md's generated section is stale: run python benchmarks/results_table.py"
    )
