"""`extsub-merge` as users meet it: exit codes, one-line errors, nothing left behind, inputs untouched."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import ext_sub
from extsub_kernels.cli import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM, build_parser, main

from checkpoints import SHAPES, hashes, leftovers, random_delta, save
from helpers import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inputs(tmp_path):
    """expert/anti files in their own folder (hashed before and after each test), OUT goes elsewhere."""
    folder = tmp_path / "in"
    expert, anti = random_delta(SHAPES), random_delta(SHAPES)
    return folder, save(folder / "expert.safetensors", expert), save(folder / "anti.safetensors", anti)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def test_a_merge_prints_one_summary_line(tmp_path, inputs, capsys):
    _, e, a = inputs
    code, err = _run(capsys, e, a, "-o", tmp_path / "out.safetensors", "--lam", "0.5")
    assert code == 0
    summary = [line for line in err.replace("\r", "\n").splitlines() if "tensors (" in line]
    assert len(summary) == 1 and "peak RSS" in summary[0] and "GPU n/a (cpu)" in summary[0], summary
    assert re.search(r" \| [\d.]+ m?s, [\d.]+ [kMG]?B/s \| ", summary[0]), summary[0]
    out = load_file(tmp_path / "out.safetensors")
    expected = ext_sub(load_file(e)["lm_head.weight"], load_file(a)["lm_head.weight"], 0.5)
    assert torch.equal(out["lm_head.weight"], expected)


def test_quiet_prints_nothing(tmp_path, inputs, capsys):
    _, e, a = inputs
    assert _run(capsys, e, a, "-o", tmp_path / "out.safetensors", "--quiet") == (0, "")


def test_help_documents_the_exit_codes_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for needle in (
        "exit codes:",
        "0    done",
        "1    failure during the merge",
        "2    bad usage or bad input",
        "examples:",
        "-lam",
        "PEFT adapters",
        "(IA)³: on the task vectors d = l − 1",
        "prefix-tuning: on prompt_embeddings itself",
        "--format dense-lora",
        "--max-rank R",
        "--lora-alpha",
        "--base MODEL",
    ):
        assert needle in text, needle


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["only-one-input.safetensors"])
    assert exit_info.value.code == EXIT_BAD_INPUT


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def _garbage_header(path: Path) -> None:
    path.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"this is not json at all!!!......" + b"\0" * 32)


def _offsets_past_end(path: Path) -> None:
    raw = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 400)


def _replace(tensors: dict):
    return lambda path: save(path, tensors)


def _with_nan(path: Path) -> None:
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][5, 3] = float("nan")
    save(path, tensors)


def _with_inf(path: Path) -> None:
    tensors = load_file(path)
    tensors["lm_head.weight"][0, 0] = float("inf")
    save(path, tensors)


def _pickle(path: Path) -> Path:
    target = path.with_suffix(".bin")
    target.write_bytes(b"\x80\x02}q\x00.")
    return target


# name: (which input to spoil, how, extra CLI args, expected message parts)
BAD_INPUTS = {
    "truncated file": ("anti", _truncate, [], ["anti.safetensors", "truncated"]),
    "garbage header": ("expert", _garbage_header, [], ["expert.safetensors", "header is not valid JSON"]),
    "offsets past end of file": (
        "anti",
        _offsets_past_end,
        [],
        ["anti.safetensors", "ends at byte 4000", "holds only 400"],
    ),
    "shape mismatch": (
        "anti",
        _replace(random_delta(SHAPES | {"lm_head.weight": (96, 40)})),
        [],
        ["shape mismatch for tensor 'lm_head.weight'", "[97, 40]", "[96, 40]"],
    ),
    "missing keys": (
        "anti",
        _replace(random_delta(SHAPES | {"extra.a": (2,), "extra.b": (3,)})),
        [],
        ["not in EXPERT", "'extra.a'", "'extra.b'", "--on-missing"],
    ),
    "NaN in the anti-expert": (
        "anti",
        _with_nan,
        [],
        ["'model.layers.1.mlp.down_proj.weight'", "ANTI", "NaN or Inf", "row 5", "; nothing was written"],
    ),
    "Inf in the expert": (
        "expert",
        _with_inf,
        [],
        ["'lm_head.weight'", "EXPERT", "NaN or Inf", "row 0", "; nothing was written"],
    ),
    "non-float dtype mismatch": (
        "anti",
        _replace(random_delta(SHAPES) | {"ids": torch.arange(4, dtype=torch.int32)}),
        [],
        ["dtype mismatch for tensor 'ids'", "I64", "I32"],
    ),
    "pickle file": ("anti", _pickle, [], ["anti.bin", "pickle", "safetensors"]),
    "missing input": (
        "anti",
        lambda p: p.with_name("absent.safetensors"),
        [],
        ["absent.safetensors", "no such file or folder"],
    ),
    "unknown device": (None, None, ["--device", "tpu"], ["unknown device 'tpu'"]),
    "bad λ": (None, None, ["--lam", "1,x"], ["λ must be a number", "'x'"]),
    "λ per anti-expert, wrong count": (None, None, ["--lam", "1:2"], ["gives 2 values for 1 anti-expert"]),
    "bad shard size": (None, None, ["--max-shard-size", "lots"], ["cannot read size 'lots'"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs(tmp_path, inputs, capsys, case):
    folder, e, a = inputs
    which, spoil, extra, message = BAD_INPUTS[case]
    if case == "non-float dtype mismatch":  # the expert needs the int64 twin of the anti-expert's int32 'ids'
        save(e, load_file(e) | {"ids": torch.arange(4)})
    paths = {"expert": e, "anti": a}
    if spoil is not None:
        paths[which] = spoil(paths[which]) or paths[which]
    before = hashes(folder)
    out = tmp_path / "out" / "merged"
    code, err = _run(capsys, paths["expert"], paths["anti"], "-o", out, *extra)
    assert_one_line_error(code, err, EXIT_BAD_INPUT, message)
    assert not out.exists() and not leftovers(tmp_path)
    assert hashes(folder) == before, "inputs are never modified"


OUT_CASES = {
    "OUT is the expert": (lambda folder, e, a, tmp: [e, a, "-o", e, "--force"], ["is the EXPERT file"]),
    "OUT is the anti-expert via another spelling": (
        lambda folder, e, a, tmp: [e, a, "-o", folder / ".." / "in" / "anti.safetensors"],
        ["is the ANTI file"],
    ),
    "OUT inside an input folder": (
        lambda folder, e, a, tmp: [folder, a, "-o", folder / "merged"],
        ["is inside the EXPERT folder"],
    ),
    "OUT is an input folder": (
        lambda folder, e, a, tmp: [folder, a, "-o", folder, "--force"],
        ["is the EXPERT folder"],
    ),
    "OUT contains an input": (lambda folder, e, a, tmp: [e, a, "-o", tmp, "--force"], ["contains the EXPERT file"]),
    "existing OUT without --force": (
        lambda folder, e, a, tmp: (
            (tmp / "exists.safetensors").write_bytes(b"old") and [e, a, "-o", tmp / "exists.safetensors"]
        ),
        ["already exists", "--force"],
    ),
    "unwritable output folder": (
        lambda folder, e, a, tmp: (tmp / "a-file").write_text("x") and [e, a, "-o", tmp / "a-file" / "out.safetensors"],
        ["cannot create the output folder", "a-file"],
    ),
    "shards need a folder OUT": (
        lambda folder, e, a, tmp: [e, a, "-o", tmp / "o.safetensors", "--max-shard-size", "1MB"],
        ["give a folder OUT"],
    ),
    "--force never replaces a folder of other files": (
        lambda folder, e, a, tmp: (
            (tmp / "home").mkdir()
            or ((tmp / "home" / "notes.txt").write_text("x") and [e, a, "-o", tmp / "home", "--force"])
        ),
        ["did not write there", "notes.txt"],
    ),
}


@pytest.mark.parametrize("case", OUT_CASES)
def test_unsafe_outputs_are_refused_before_any_work(tmp_path, inputs, capsys, case):
    folder, e, a = inputs
    build, message = OUT_CASES[case]
    argv = build(folder, e, a, tmp_path)
    before = hashes(tmp_path)
    code, err = _run(capsys, *argv)
    assert code == EXIT_BAD_INPUT, err
    for part in message:
        assert part in err, f"{part!r} not in {err!r}"
    assert hashes(tmp_path) == before and not leftovers(tmp_path), "nothing written, nothing changed"


def test_force_replaces_an_existing_output(tmp_path, inputs, capsys):
    _, e, a = inputs
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    assert _run(capsys, e, a, "-o", out, "--force", "-q")[0] == 0
    assert "lm_head.weight" in load_file(out) and not leftovers(tmp_path)


def test_a_failure_midway_exits_1_and_leaves_nothing(tmp_path, inputs, capsys, monkeypatch):
    _, e, a = inputs
    from extsub_kernels.io import writer

    calls = {"n": 0}
    real_write = writer.SafetensorsFileWriter.write

    def failing_write(self, name, data, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, name, data, **kwargs)

    monkeypatch.setattr(writer.SafetensorsFileWriter, "write", failing_write)
    code, err = _run(capsys, e, a, "-o", tmp_path / "out", "--lam", "0.5,1")
    assert code == 1 and "No space left on device" in err and "nothing was written" in err
    assert not (tmp_path / "out-lam0.5").exists() and not (tmp_path / "out-lam1").exists() and not leftovers(tmp_path)


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A checkpoint that takes a second or more to merge on two CPU cores (merged with itself)."""
    folder = tmp_path_factory.mktemp("big")
    tensors = {f"layer.{i}.weight": torch.empty(2048, 4096).uniform_(-1, 1) for i in range(12)}  # 400 MB
    return save(folder / "expert.safetensors", tensors)


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_during_the_merge_leaves_no_output(tmp_path, big_pair, sig, code):
    before = hashes(big_pair.parent)
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "extsub_kernels.cli", str(big_pair), str(big_pair), "-o", str(out), "--device", "cpu"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    seen = b""
    deadline = time.monotonic() + 60
    while b"extsub-merge:" not in seen and time.monotonic() < deadline:  # the progress bar has started
        chunk = os.read(proc.stderr.fileno(), 256)
        if not chunk:
            break
        seen += chunk
    assert b"extsub-merge:" in seen, seen.decode(errors="replace")
    time.sleep(0.05)
    proc.send_signal(sig)
    err = seen + proc.stderr.read()
    assert proc.wait(timeout=60) == code, err.decode(errors="replace")
    assert b"nothing was written" in err
    assert not out.exists() and not leftovers(tmp_path) and list(tmp_path.iterdir()) == []
    assert hashes(big_pair.parent) == before


def test_version_and_python_dash_m_run_the_same_command(capsys):
    from extsub_kernels import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"extsub-merge {__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "extsub_kernels", "--version"],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == f"extsub-merge {__version__}"


def test_importing_the_package_does_not_load_torch():
    # The command line sets its signal handlers before torch loads, so a Ctrl-C during start-up is caught.
    code = "import sys, extsub_kernels, extsub_kernels.cli; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "False", done.stderr


def test_interrupted_during_start_up_exits_130_with_one_line(capsys, monkeypatch):
    import extsub_kernels.cli.common as common

    def interrupted():  # a Ctrl-C while torch is being imported
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "load_torch", interrupted)
    assert main(["a", "b", "-o", "c"]) == EXIT_SIGINT
    assert capsys.readouterr().err == "extsub-merge: error: interrupted; nothing was written\n"


def test_an_existing_empty_folder_takes_the_output_without_force(tmp_path, inputs, capsys):
    """An empty folder holds nothing to lose (save_pretrained takes it too); anything in it still needs --force."""
    _, e, a = inputs
    (tmp_path / "out").mkdir()
    code, err = _run(capsys, e, a, "-o", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file() and not leftovers(tmp_path)
    code, err = _run(capsys, e, a, "-o", tmp_path / "out")
    assert_one_line_error(code, err, EXIT_BAD_INPUT, ["already exists", "--force"])
