"""`extsub-scan` as users meet it: the table and summary, one-line errors with nothing written, a real Ctrl-C or
SIGTERM that keeps the rows measured so far, --help, the console script."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from extsub_kernels.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM
from extsub_kernels.cli.scan import build_parser, main

from helpers import assert_one_line_error, scan_until_rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def _args(trained, *extra, kind: str = "full") -> list[str]:
    experts = [str(trained.adapter("llama", kind, role)) for role in ("expert", "anti")]
    sets = ["--keep", str(trained.eval_set("keep.jsonl")), "--forget", str(trained.eval_set("forget.jsonl"))]
    sets += ["--truth", str(trained.eval_set("truth.jsonl"))]
    return [*experts, "--base", str(trained.base("llama")), *sets, *map(str, extra)]


def test_a_scan_prints_the_table_and_a_summary(trained, tmp_path, capsys):
    args = _args(trained, "-o", tmp_path / "scan", "--lam", "0,1", "--max-keep-increase", "1e9")
    capsys.readouterr()  # what building the trained fixtures printed
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method | λ | KEEP NLL | Δ KEEP | FORGET NLL | Δ FORGET |") and len(table) == 4
    lines = err.replace("\r", "\n").splitlines()
    summary = [line for line in lines if line.startswith("extsub-scan: ") and "%|" not in line]  # not the bar
    assert summary[0].startswith("extsub-scan: ext-sub: recommended λ = ")
    assert "3 points in" in summary[2] and "a merge costs" in summary[2] and "of the smallest evaluation" in summary[2]
    files = ", ".join(str(tmp_path / "scan" / name) for name in ("scan.json", "scan.csv", "scan.md", "scan.png"))
    assert summary[3] == f"extsub-scan: wrote {files}"
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["status"] == "complete"


def test_quiet_prints_nothing(trained, tmp_path, capsys):
    args = _args(trained, "-o", tmp_path / "scan", "--lam", "0", "--quiet")
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("change", "parts"),
    [
        (["--keep", "missing.txt"], ["missing.txt: no such file"]),
        (["--forget", "empty.txt"], ["empty.txt: no examples"]),
        (["--lam", "0:1"], ["λ item '0:1': write a number or a range start:stop:step"]),
        (["--method", "ext-sub,del"], ["unknown method 'del'; choose one of ext-sub, sub, add"]),
        (["--base", "no-tokenizer"], ["keep.jsonl line 1: prompt + completion is text, but there is no tokenizer"]),
        (["--anti", "gpt2-full"], ["EXPERT (model.safetensors) and ANTI (model.safetensors) share no tensor name"]),
        (["--anti", "gpt2-lora"], ["was trained on base model", "but the expert", "base-llama"]),
        (["--batch-size", "0"], ["batch_size must be a positive integer, got 0"]),
    ],
    ids=[
        "missing-file",
        "empty-set",
        "bad-grid",
        "bad-method",
        "no-tokenizer",
        "mismatched-models",
        "mismatched-adapters",
        "batch-size",
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(trained, tmp_path, capsys, change, parts):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "no-tokenizer" / name).write_bytes((trained.base("llama") / name).read_bytes())
    args = _args(trained, "-o", tmp_path / "scan", "--lam", "0,1", "--save-best", tmp_path / "best")
    flag, value = change
    named = {"gpt2-full": trained.adapter("gpt2", "full", "anti"), "gpt2-lora": trained.adapter("gpt2", "lora", "anti")}
    value = str(named.get(value, tmp_path / value))
    if flag == "--anti":
        if "lora" in change[1]:  # an adapter pair: the expert is llama's LoRA
            args[0] = str(trained.adapter("llama", "lora", "expert"))
        args[1] = value
    elif flag in args:
        args[args.index(flag) + 1] = value if flag in ("--keep", "--forget", "--base") else change[1]
    else:
        args += [flag, change[1]]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # what building the trained fixtures printed
    code = main(args)
    err = capsys.readouterr().err
    assert_one_line_error(code, err, EXIT_BAD_INPUT, parts, prog="extsub-scan")
    assert len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_input_changed_during_the_scan_exits_1_and_keeps_the_rows_before(trained, tmp_path, capsys, monkeypatch):
    """Full models are read again at every point: a row is kept only while the inputs are those the scan started
    with (io.identity.InputSnapshot, as extsub-merge checks them); the rows before the change stay in scan.json."""
    from extsub_kernels.lambda_scan import evaluate

    expert = tmp_path / "expert"
    shutil.copytree(trained.adapter("llama", "full", "expert"), expert)
    measure, calls = evaluate.Evaluator.measure, []

    def measure_then_touch(self, model):
        calls.append(1)
        if len(calls) == 2:  # while the second point is measured, someone writes to the expert's weights
            os.utime(expert / "model.safetensors", ns=(1, 1))
        return measure(self, model)

    monkeypatch.setattr(evaluate.Evaluator, "measure", measure_then_touch)
    args = _args(trained, "-o", tmp_path / "scan", "--lam", "0,1,2", "--save-best", tmp_path / "best")
    args[0] = str(expert)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    files = ", ".join(str(tmp_path / "scan" / name) for name in ("scan.json", "scan.csv", "scan.md", "scan.png"))
    assert_one_line_error(
        code,
        err,
        EXIT_FAILED,
        [
            f"the scan failed after publishing its outputs (each complete: {files})",
            f"EXPERT {expert / 'model.safetensors'} changed while the scan read it (it was written to); "
            "the rows measured before that was seen are kept, nothing was saved",
        ],
        prog="extsub-scan",
    )
    data = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert data["status"].startswith("failed: MergeError: EXPERT") and data["measured"] == 1
    assert not (tmp_path / "best").exists()


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, EXIT_SIGINT, "interrupted"), (signal.SIGTERM, EXIT_SIGTERM, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_keeps_the_rows_measured_so_far(trained, tmp_path, sig, code, word):
    out = tmp_path / "scan"
    args = _args(trained, "-o", out, "--lam", "0:40:0.5", "--device", "cpu", "--save-best", tmp_path / "best")
    proc = scan_until_rows(args, out)
    proc.send_signal(sig)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == code, err
    data = json.loads((out / "scan.json").read_text())
    assert data["status"] == word and 2 <= data["measured"] < data["points"] == 161
    assert [r["lam"] for r in data["rows"]] == [0.0, *[0.5 * i for i in range(1, data["measured"])]]
    assert err.strip().splitlines()[-1] == (
        f"extsub-scan: error: {word} after {data['measured']} of 161 points; "
        f"the {data['measured']} rows measured are in {out / 'scan.json'}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["scan.csv", "scan.json", "scan.md", "scan.png"]
    assert not (tmp_path / "best").exists()  # nothing is saved from an interrupted scan


def test_interrupted_during_start_up_exits_130_with_one_line(capsys, monkeypatch):
    import extsub_kernels.cli.common as common

    def interrupted():  # a Ctrl-C while torch or transformers is being imported
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "load_torch", interrupted)
    assert main(["e", "a", "--base", "b", "--keep", "k", "--forget", "f", "-o", "o"]) == EXIT_SIGINT
    assert capsys.readouterr().err == ("extsub-scan: error: interrupted; nothing was written\n")


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for needle in (
        "--base MODEL",
        "--keep KEEP",
        "--forget FORGET",
        "-o SCAN_DIR",
        "--lam GRID",
        "--method",
        "--prompts PROMPTS",
        "--truth TRUTH",
        "--choices CHOICES",
        "--chat-template {auto,on,off}",
        "--system TEXT",
        "--threads N",
        "--max-rep-increase F",
        "--max-distinct-drop F",
        "--max-length-change F",
        "--max-end-drop F",
        "samples.jsonl",
        "MC1 and MC2",
        "--max-new-tokens N",
        "--device",
        "--dtype {auto,float32,float64,bfloat16,float16}",
        "--batch-size N",
        "--max-keep-increase F",
        "--save-best OUT",
        "--format",
        "--force",
        "--quiet",
        "rep-4",
        "scan.png",
        "exit codes:",
        "130  interrupted",
    ):
        assert needle in text, needle


def test_the_console_script_and_python_dash_m(capsys):
    from extsub_kernels import __version__

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'extsub-scan = "extsub_kernels.cli.scan:main"' in pyproject
    assert 'scan = ["transformers>=4.40", "peft>=0.10", "matplotlib>=3.5"]' in pyproject
    done = subprocess.run(
        [sys.executable, "-m", "extsub_kernels.cli.scan", "--version"],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == f"extsub-scan {__version__}"
