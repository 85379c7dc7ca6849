"""Hostile inputs, round two: every path a run writes (OUT, each λ output, --report, scan files) compared by identity
with every other and with every input; --force replacing regular files only; a report that cannot be written after
OUT was published said as such. Each case crafts the hostile path from a fixed seed where it varies."""

import json
import os
import random
import stat

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels.cli import EXIT_BAD_INPUT, EXIT_FAILED, main

from checkpoints import SHAPES, hashes, leftovers, random_delta, save

SEED = 23


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(SEED)
    folder = tmp_path / "in"
    return save(folder / "expert.safetensors", random_delta(SHAPES)), save(
        folder / "anti.safetensors", random_delta(SHAPES)
    )


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _is_merge(path):
    return "lm_head.weight" in load_file(path)


def _spellings(tmp_path, target):
    """Other spellings of `target` (a path in tmp_path/out): through `..`, a symlinked folder, a `.` component."""
    link = tmp_path / "link"
    if not link.exists():
        link.symlink_to(target.parent)
    (target.parent / "sub").mkdir(exist_ok=True)
    return [
        target.parent / "sub" / ".." / target.name,
        link / target.name,
        target.parent / "." / target.name,
    ]


# ------------------------------------------------------------------ 1. one identity rule for every output


@pytest.mark.parametrize("spelling", range(3), ids=["dotdot", "symlinked folder", "dot"])
@pytest.mark.parametrize("force", [False, True], ids=["new", "forced"])
def test_a_report_that_spells_out_another_way_is_refused(tmp_path, capsys, pair, spelling, force):
    out = tmp_path / "out" / "out.safetensors"
    out.parent.mkdir()
    if force:
        save(out, {"old": torch.ones(2)})
    before = hashes(tmp_path / "out")
    report = _spellings(tmp_path, out)[spelling]
    code, err = _run(capsys, *pair, "-o", out, "--report", report, *(["--force"] if force else []))
    assert code == EXIT_BAD_INPUT and "are the same path" in err and err.count("\n") == 1, err
    assert hashes(tmp_path / "out") == before and not leftovers(tmp_path)


def test_a_report_over_one_output_of_a_lam_list_is_refused(tmp_path, capsys, pair):
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    report = _spellings(tmp_path, out.with_name("m-lam0.5.safetensors"))[0]
    code, err = _run(capsys, *pair, "-o", out, "--lam", "0.5,1", "--report", report)
    assert code == EXIT_BAD_INPUT and "are the same path" in err, err
    assert sorted(os.listdir(out.parent)) == ["sub"]


def test_a_report_into_a_folder_out_spelled_another_way_is_refused(tmp_path, capsys, pair):
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    report = _spellings(tmp_path, out)[1] / "report.json"
    code, err = _run(capsys, *pair, "-o", out, "--report", report)
    assert code == EXIT_BAD_INPUT and f"--report {report} is inside OUT {out}" in err, err
    assert not out.exists() and not leftovers(tmp_path)


def test_a_report_from_a_recipe_over_out_is_refused(tmp_path, capsys, pair):
    out = tmp_path / "out" / "out.safetensors"
    out.parent.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "expert": str(pair[0]),
                "anti": [str(pair[1])],
                "out": str(out),
                "report": str(out.parent / "x/../out.safetensors"),
            }
        )
    )
    (out.parent / "x").mkdir()
    code, err = _run(capsys, "--config", recipe)
    assert code == EXIT_BAD_INPUT and "are the same path" in err, err
    assert not out.exists()


def test_a_report_that_is_an_input_by_a_hard_link_is_refused(tmp_path, capsys, pair):
    link = tmp_path / "report.json"
    os.link(pair[1], link)
    before = hashes(pair[0].parent)
    code, err = _run(capsys, *pair, "-o", tmp_path / "o.safetensors", "--report", link, "--force")
    assert code == EXIT_BAD_INPUT and "is the ANTI file" in err, err
    assert hashes(pair[0].parent) == before


# ------------------------------------------------------------------ 2. --force replaces regular files only


def _special(tmp_path, kind):
    path = tmp_path / f"special-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "victim.txt").write_text("the user's file")
        path.symlink_to(tmp_path / "victim.txt")
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere" / "x")
    elif kind == "socket":
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    return path


def _char_device(tmp_path):
    """A character device node (like /dev/full, 1:7); needs root (CAP_MKNOD)."""
    path = tmp_path / "fullnode"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path


@pytest.mark.parametrize(
    ("role", "kind"),
    [("--report", k) for k in ("symlink", "dangling symlink", "socket")]
    + [("OUT", k) for k in ("symlink", "dangling symlink", "fifo")],
)
def test_force_never_replaces_what_is_not_a_regular_file(tmp_path, capsys, pair, role, kind):
    target = _special(tmp_path, kind)
    if role == "OUT":
        target = target.rename(target.with_suffix(".safetensors"))
        out, extra = target, []
    else:
        out, extra = tmp_path / "o.safetensors", ["--report", target]
    mode = os.lstat(target).st_mode
    code, err = _run(capsys, *pair, "-o", out, *extra, "--force")
    assert code == EXIT_BAD_INPUT and "--force replaces only regular files and folders" in err, err
    assert os.lstat(target).st_mode == mode and not (tmp_path / "o.safetensors").exists()
    if kind == "symlink":
        assert (tmp_path / "victim.txt").read_text() == "the user's file"


def test_a_report_into_a_character_device_is_written_into_it_never_replacing_it(tmp_path, capsys, pair):
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    code, err = _run(capsys, *pair, "-o", tmp_path / "o.safetensors", "--report", node, "--force", "-q")
    assert code == 0, err
    assert stat.S_ISCHR(os.lstat(node).st_mode) and _is_merge(tmp_path / "o.safetensors")


def test_a_report_into_a_fifo_is_written_into_it(tmp_path, capsys, pair):
    import threading

    fifo = _special(tmp_path, "fifo")
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))  # noqa: SIM115
    reader.start()
    code, err = _run(capsys, *pair, "-o", tmp_path / "o.safetensors", "--report", fifo, "-q")
    reader.join(timeout=60)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and json.loads(got[0])["extsub_report"] == 1


def test_a_report_into_a_fifo_nobody_reads_fails_at_once_naming_what_was_published(tmp_path, capsys, pair):
    fifo = _special(tmp_path, "fifo")
    out = tmp_path / "o.safetensors"
    code, err = _run(capsys, *pair, "-o", out, "--report", fifo, "-q")
    assert code == EXIT_FAILED and f"after publishing its outputs (each complete: {out})" in err, err
    assert "nobody reads this FIFO" in err and stat.S_ISFIFO(os.lstat(fifo).st_mode)


# ------------------------------------------------------------------ 5. a report that fails after OUT was published


def test_a_report_into_a_full_device_says_out_was_published(tmp_path, capsys, pair):
    node = _char_device(tmp_path)
    out = tmp_path / "o.safetensors"
    code, err = _run(capsys, *pair, "-o", out, "--report", node, "--force", "-q")
    assert code == EXIT_FAILED and "nothing was written" not in err, err
    assert f"after publishing its outputs (each complete: {out})" in err and "No space left on device" in err
    assert err.count("\n") == 1 and stat.S_ISCHR(os.lstat(node).st_mode) and _is_merge(out)


def test_a_report_on_stdout_that_fails_says_out_was_published(tmp_path, capsys, pair, monkeypatch):
    import io
    import sys

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(sys, "stdout", Full())
    out = tmp_path / "o.safetensors"
    code, err = _run(capsys, *pair, "-o", out, "--report", "-", "-q")
    assert code == EXIT_FAILED and f"each complete: {out}" in err and "writing --report stdout failed" in err, err
    assert _is_merge(out)


def test_random_spellings_of_one_output_are_all_refused(tmp_path, capsys, pair):
    """A seeded fuzz over spellings of OUT for the report: each one the same file, each refused, nothing written."""
    rng = random.Random(SEED)
    out = tmp_path / "out" / "o.safetensors"
    (tmp_path / "out" / "a" / "b").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "out")
    parts = [["a", ".."], ["a", "b", "..", ".."], ["."], ["..", "out"]]
    for _ in range(6):
        steps = [p for _ in range(rng.randint(1, 3)) for p in rng.choice(parts)]
        root = rng.choice([tmp_path / "out", tmp_path / "alias"])
        report = root.joinpath(*steps, "o.safetensors")
        code, err = _run(capsys, *pair, "-o", out, "--report", report)
        assert code == EXIT_BAD_INPUT and "are the same path" in err, (report, err)
    assert not out.exists() and not leftovers(tmp_path)
