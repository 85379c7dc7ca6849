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


# ------------------------------------------------------------------ 3. one finiteness rule for every path


def _overflowing_adapters(kind):
    """An expert and an anti-expert whose `sub` merge at λ = 1 leaves the float32 range (each input is finite)."""
    from extsub_kernels.adapters import IA3Adapter, PrefixAdapter

    big = torch.full((2, 16), 3e38)
    if kind == "ia3":
        return IA3Adapter({"m.0.k": big[0].reshape(16, 1)}), IA3Adapter({"m.0.k": -big[0].reshape(16, 1)})
    return PrefixAdapter(big, 2, 1, 8, 2), PrefixAdapter(-big, 2, 1, 8, 2)


@pytest.mark.parametrize("kind", ["ia3", "prefix"])
@pytest.mark.parametrize("method", ["sub", "ext-sub"])
def test_an_adapter_merge_that_overflows_float32_is_refused_naming_the_tensor(tmp_path, kind, method):
    from extsub_kernels.errors import InputError
    from extsub_kernels.merging import merge

    expert, anti = _overflowing_adapters(kind)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"tensor '.+' .*NaN or ±inf .*overflows"):
        merge(expert, anti, out, lam=3.0, method=method)
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_nonfinite_anti_row_beside_a_zero_expert_row_is_refused_by_every_method(tmp_path, capsys, bad, method):
    torch.manual_seed(SEED)
    expert, anti = torch.randn(4, 8), torch.randn(4, 8)
    expert[2] = 0
    anti[2, 5] = float(bad)
    e, a = save(tmp_path / "e.safetensors", {"w": expert}), save(tmp_path / "a.safetensors", {"w": anti})
    out = tmp_path / "o.safetensors"
    code, err = _run(capsys, e, a, "-o", out, "--method", method, "--device", "cpu")
    assert code == EXIT_BAD_INPUT and "tensor 'w' in ANTI" in err and "NaN or Inf (1 value, first in row 2)" in err, err
    assert not out.exists()


# ------------------------------------------------------------------ 4. --force replaces exactly what this tool wrote


def test_force_over_a_folder_out_keeps_a_users_file(tmp_path, capsys, pair):
    out = tmp_path / "merged"
    assert _run(capsys, *pair, "-o", out, "-q")[0] == 0
    assert _run(capsys, *pair, "-o", out, "-q", "--force", "--lam", "0.5")[0] == 0, "our own folder is replaced"
    (out / "eval_results.json").write_text('{"accuracy": 0.5}')
    code, err = _run(capsys, *pair, "-o", out, "--force")
    assert code == EXIT_BAD_INPUT and "'eval_results.json'" in err and "did not write" in err, err
    assert (out / "eval_results.json").read_text() == '{"accuracy": 0.5}'


def test_force_over_a_folder_of_someone_elses_configs_is_refused(tmp_path, capsys, pair):
    out = tmp_path / "theirs"
    save(out / "model.safetensors", {"old": torch.ones(2)})
    (out / "config.json").write_text("{}")
    code, err = _run(capsys, *pair, "-o", out, "--force")
    assert code == EXIT_BAD_INPUT and "'config.json'" in err, err
    assert (out / "config.json").read_text() == "{}"


def test_a_card_lists_every_file_of_its_folder(tmp_path, capsys, pair):
    from extsub_kernels.io.outputs import written_names

    out = tmp_path / "merged"
    assert _run(capsys, *pair, "-o", out, "-q")[0] == 0
    assert written_names(out) == frozenset(os.listdir(out))


@pytest.mark.parametrize("name", ["scan.json", "scan.csv"])
def test_a_text_set_that_is_a_scan_file_is_refused_even_with_force(tmp_path, name):
    from extsub_kernels.errors import InputError
    from extsub_kernels.io.outputs import check_report_folder

    folder = tmp_path / "scan"
    folder.mkdir()
    keep = folder / name
    keep.write_text("text to keep\n")
    with pytest.raises(InputError, match=rf"SCAN_DIR file .*{name} is KEEP .*which this run reads"):
        check_report_folder(folder, ("scan.json", "scan.csv"), [], force=True, read=[(f"KEEP {keep}", keep)])
    check_report_folder(folder, ("scan.md",), [], force=True, read=[(f"KEEP {keep}", keep)])
    assert keep.read_text() == "text to keep\n"


@pytest.mark.parametrize("where", ["SCAN_DIR", "a scan file"])
def test_save_best_onto_scan_files_is_refused_before_the_scan(tmp_path, where):
    from extsub_kernels.errors import InputError
    from extsub_kernels.io.outputs import check_report_folder

    folder = tmp_path / "scan"
    best = folder / ".." / "scan" if where == "SCAN_DIR" else folder / "scan.json"
    others = [(f"--save-best {best}", best)]
    with pytest.raises(InputError, match=r"file .*scan\.json is inside --save-best|are the same path"):
        check_report_folder(folder, ("scan.json",), [], force=False, others=others)
    beside = [(f"--save-best {folder / 'best'}", folder / "best")]
    check_report_folder(folder, ("scan.json",), [], force=False, others=beside)


# ------------------------------------------------------------------ 8. read-only file systems and long names

# A CLI run in a child process on which every write under argv[1] fails as on a read-only file system (EROFS, also
# for names that are not there), since a read-only mount is not available to a test run as root.
_READ_ONLY_CLI = """
import errno, os, sys
ro = os.path.realpath(sys.argv[1])
def refused(path):
    return os.path.realpath(os.fsdecode(path)).startswith(ro + os.sep) or os.path.realpath(os.fsdecode(path)) == ro
def erofs(path):
    return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
real = {name: getattr(os, name) for name in ("open", "unlink", "mkdir", "rmdir", "rename", "replace")}
def open_(path, flags, *args, **kwargs):
    if refused(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
        raise erofs(path)
    return real["open"](path, flags, *args, **kwargs)
def changing(name):
    def call(path, *args, **kwargs):
        if refused(path):
            raise erofs(path)
        return real[name](path, *args, **kwargs)
    return call
os.open = open_
for name in ("unlink", "mkdir", "rmdir", "rename", "replace"):
    setattr(os, name, changing(name))
from extsub_kernels.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["OUT", "OUT folder", "a new folder", "--report"])
def test_a_read_only_file_system_is_exit_2_with_one_line_and_no_traceback(tmp_path, pair, where):
    import subprocess
    import sys

    from helpers import ROOT

    ro = tmp_path / "ro"
    ro.mkdir()
    target = {"OUT": ro / "o.safetensors", "OUT folder": ro / "m", "a new folder": ro / "new" / "o.safetensors"}
    out, extra = (target[where], []) if where in target else (tmp_path / "o.safetensors", ["--report", ro / "r.json"])
    argv = [sys.executable, "-c", _READ_ONLY_CLI, ro, *pair, "-o", out, *extra, "-q"]
    done = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "Read-only file system" in done.stderr and os.listdir(ro) == [] and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("size", [200, 230, 240, 255])
@pytest.mark.parametrize("kind", ["OUT", "OUT folder", "--report", "λ list"])
def test_names_near_the_limit_are_written_or_refused_up_front(tmp_path, capsys, pair, size, kind):
    rng = random.Random(SEED + size)
    stem = "".join(rng.choice("abcdefghé") for _ in range(size))
    stem = os.fsdecode(os.fsencode(stem)[:size]).encode("utf-8", "ignore").decode("utf-8")
    suffix = ".safetensors" if kind in ("OUT", "λ list") else ".json" if kind == "--report" else ""
    name = os.fsdecode(os.fsencode(stem)[: size - len(suffix)]).encode("utf-8", "ignore").decode() + suffix
    path = tmp_path / name
    out, extra = (path, []) if kind in ("OUT", "OUT folder") else (tmp_path / "o.safetensors", [])
    if kind == "--report":
        extra = ["--report", path]
    if kind == "λ list":
        out, extra = path, ["--lam", "0.5,1"]
    code, err = _run(capsys, *pair, "-o", out, *extra, "-q")
    longest = max(
        len(os.fsencode(n)) for n in [name, *([f"{name[:-12]}-lam0.5.safetensors"] if extra[:1] == ["--lam"] else [])]
    )
    if longest > 255:
        assert code == EXIT_BAD_INPUT and "the file system takes at most 255" in err and err.count("\n") == 1, err
        assert os.listdir(tmp_path) == ["in"]
    else:
        assert code == 0, err
        assert not leftovers(tmp_path)


# ------------------------------------------------------------------ 6. a signal at any moment of the process

# A command in a child process: its name as the script's (as the console script runs it), a byte on stdout once the
# interpreter reaches the package's first instruction, then the command itself. Moments before that byte belong to the
# interpreter's own start-up (site, .pth files), where no code of the package has run yet.
_COMMAND = """
import sys
sys.argv = sys.argv[1:]
import extsub_kernels
sys.stdout.write("r")
sys.stdout.flush()
import importlib
module = {"extsub-merge": "merge", "extsub-inspect": "inspect", "extsub-scan": "scan"}[sys.argv[0]]
sys.exit(importlib.import_module(f"extsub_kernels.cli.{module}").main())
"""


def _command(argv, *, signal_after=None, sig=None):
    """(exit code, stderr, seconds) of a command run in a child process, `sig` sent `signal_after` seconds after the
    package's first instruction."""
    import signal as signals
    import subprocess
    import sys
    import time

    from helpers import ROOT

    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _COMMAND, *map(str, argv)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1) == b"r"
    started = time.monotonic()
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(sig or signals.SIGINT)
    err = proc.stderr.read().decode(errors="replace")
    code = proc.wait(timeout=300)
    return code, err, time.monotonic() - started


def _lifetime_cases(tmp_path, pair, command):
    out = tmp_path / "out"
    argv = {
        "extsub-merge": ["extsub-merge", *pair, "-o", out / "o.safetensors", "-q"],
        "extsub-inspect": ["extsub-inspect", *pair, "-o", out, "-q"],
        "extsub-scan": [
            "extsub-scan",
            *pair,
            "--base",
            pair[0],
            "--keep",
            tmp_path / "missing.txt",
            "--forget",
            pair[1],
            "-o",
            out,
        ],
    }[command]
    return argv, out


@pytest.mark.parametrize("command", ["extsub-merge", "extsub-inspect", "extsub-scan"])
def test_a_signal_at_a_random_moment_of_the_whole_lifetime_is_one_line_and_its_exit_code(tmp_path, pair, command):
    import shutil
    import signal as signals

    rng = random.Random(f"{SEED}-{command}")
    argv, out = _lifetime_cases(tmp_path, pair, command)
    code, err, seconds = _command(argv)  # once without a signal: how long the whole lifetime is
    assert code == (2 if command == "extsub-scan" else 0) and err.count("\n") <= 1, err
    for moment in range(2):
        shutil.rmtree(out, ignore_errors=True)
        sig = rng.choice([signals.SIGINT, signals.SIGTERM])
        after = rng.uniform(0, seconds) if moment else rng.uniform(0, 0.05)  # start-up, then anywhere
        code, err, _ = _command(argv, signal_after=after, sig=sig)
        expected = {signals.SIGINT: 130, signals.SIGTERM: 143}[sig]
        assert "Traceback" not in err and err.count("\n") <= 1, (after, err)
        if code == expected:
            assert ("nothing was written" in err) == (not out.exists() or not os.listdir(out)), (after, err)
        else:  # the signal came once the run had ended
            assert code == (2 if command == "extsub-scan" else 0), (after, code, err)
        assert not leftovers(tmp_path)


# ------------------------------------------------------------------ 7. bounded work for every file a user names


def _unbounded(tmp_path, kind, name):
    """A path that reads forever or blocks: a FIFO nobody writes, /dev/zero or /dev/urandom (as device nodes)."""
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
        return path
    numbers = {"zero": (1, 5), "urandom": (1, 9)}[kind]
    try:
        os.mknod(path, 0o444 | stat.S_IFCHR, os.makedev(*numbers))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path


@pytest.mark.parametrize("kind", ["fifo", "zero", "urandom"])
def test_a_recipe_that_never_ends_is_refused_at_once(tmp_path, capsys, kind):
    recipe = _unbounded(tmp_path, kind, "recipe.yaml")
    code, err = _run(capsys, "--config", recipe)
    assert code == EXIT_BAD_INPUT and f"--config {recipe} is a " in err and "give a regular file" in err, err


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("what", ["examples", "prompts"])
def test_a_scan_set_that_never_ends_is_refused_at_once(tmp_path, kind, what):
    from extsub_kernels.errors import InputError
    from extsub_kernels.lambda_scan.metrics import load_examples, load_prompts

    path = _unbounded(tmp_path, kind, "set.txt")
    with pytest.raises(InputError, match=r"is a (FIFO|character device); give a regular file"):
        (load_examples if what == "examples" else load_prompts)(path)


def test_a_json_config_that_is_a_fifo_is_refused(tmp_path):
    from extsub_kernels.errors import InputError
    from extsub_kernels.io import read_json_object

    fifo = _unbounded(tmp_path, "fifo", "adapter_config.json")
    with pytest.raises(InputError, match=r"is a FIFO; give a regular file"):
        read_json_object(fifo, "adapter config")


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\nexpert: *a11\n")
    code, err = _run(capsys, "--config", recipe)
    assert code == EXIT_BAD_INPUT and "aliases" in err and err.count("\n") == 1 and len(err) < 400, err


@pytest.mark.parametrize("depth", [200, 5000, 100000])
def test_deeply_nested_yaml_is_exit_2(tmp_path, capsys, depth):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("expert: " + "[" * depth + "]" * depth + "\n")
    code, err = _run(capsys, "--config", recipe)
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1 and len(err) < 600, err


@pytest.mark.parametrize("depth", [5000, 100000])
def test_deeply_nested_json_is_exit_2(tmp_path, capsys, pair, depth):
    folder = tmp_path / "expert"
    folder.mkdir()
    os.link(pair[0], folder / "model.safetensors")
    (folder / "config.json").write_text("[" * depth + "]" * depth)
    code, err = _run(capsys, folder, pair[1], "-o", tmp_path / "o.safetensors", "--base", folder)
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1, err


@pytest.mark.parametrize("count", [1001, 30000, 100000])
def test_a_huge_lam_list_is_refused_at_once(tmp_path, capsys, pair, count):
    import time

    rng = random.Random(SEED + count)
    lam = ",".join(f"{rng.random():.6f}" for _ in range(count))
    started = time.monotonic()
    code, err = _run(capsys, *pair, "-o", tmp_path / "o.safetensors", "--lam", lam)
    assert code == EXIT_BAD_INPUT and "a run writes at most 1000" in err and len(err) < 300, err
    assert time.monotonic() - started < 5 and os.listdir(tmp_path) == ["in"]


# ------------------------------------------------------------------ 9. a scan checks its sets against the model first


@pytest.fixture
def gpt2_trio(tmp_path):
    """A tiny GPT-2 (vocabulary 128, 64 positions) saved as BASE, and two full-model variants of it as EXPERT, ANTI."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(SEED)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)
    paths = {}
    for role, scale in (("base", 0.0), ("expert", 0.01), ("anti", 0.02)):
        model = transformers.GPT2LMHeadModel(config).eval()
        if role != "base":
            model.load_state_dict(torch.load(tmp_path / "base" / "sd.pt"))
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(tmp_path / role)
        if role == "base":
            torch.save(model.state_dict(), tmp_path / "base" / "sd.pt")
        paths[role] = tmp_path / role
    (tmp_path / "base" / "sd.pt").unlink()
    return paths


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"keep": [[1, 2, 200]]}, r"keep\.jsonl line 1: token id 200 is outside the model's vocabulary of 128"),
        ({"keep": [list(range(1, 66))]}, r"keep\.jsonl line 1: 65 tokens, more than the model's 64 positions"),
        (
            {"prompts": [[1, 2, 3], [5, 130]]},
            r"prompts\.jsonl prompt 2: token id 130 is outside the model's vocabulary",
        ),
        ({"prompts": [list(range(1, 60))]}, r"prompt 1: 59 tokens plus 8 to generate, more than the model's 64"),
    ],
    ids=["keep out of vocabulary", "keep too long", "prompt out of vocabulary", "prompt too long to continue"],
)
def test_a_scan_refuses_sets_that_do_not_fit_the_model_before_writing_anything(tmp_path, gpt2_trio, sets, message):
    from extsub_kernels.errors import InputError
    from extsub_kernels.lambda_scan import scan

    files = {}
    for name in ("keep", "forget", "prompts"):
        rows = sets.get(name, [[3, 4, 5, 6]] if name != "prompts" else None)
        if rows is None:
            continue
        key = "prompt_ids" if name == "prompts" else "input_ids"
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({key: r}) + "\n" for r in rows))
    out = tmp_path / "scan"
    with pytest.raises(InputError, match=message):
        scan(
            gpt2_trio["expert"],
            gpt2_trio["anti"],
            base=gpt2_trio["base"],
            keep=files["keep"],
            forget=files["forget"],
            prompts=files.get("prompts"),
            out=out,
            lam="0,1",
            method="sub",
            max_new_tokens=8,
            device="cpu",
        )
    assert not out.exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------ 10. hostile text in a model card


def test_hostile_names_stay_text_in_the_model_card(tmp_path, capsys, pair):
    import yaml

    from extsub_kernels.io.outputs import written_names

    name = "evil\n---\nbase_model: hijack\n# <script>x *b* `c` ```` --> [l](javascript:x)"
    out = tmp_path / name
    code, err = _run(capsys, *pair, "-o", out, "-q")
    assert code == 0, err
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {"tags": ["extsub", "merge", "ext-sub"]}, "the front matter is the tool's alone"
    fence = next(line for line in body.splitlines() if line.startswith("`") and line.endswith("bash"))[:-4]
    assert len(fence) > 4, "the command's fence is longer than the backticks in the command"
    before, code_block, after = body.split(fence)[0], body.split(fence)[1], body.split(fence)[2]
    assert code_block.count("\n") == 2, "the command is one line inside its fence"
    prose = before + after
    assert "<script>" not in prose and "\\<script\\>" in prose and "\n# \\<" not in prose
    assert written_names(out) == frozenset(os.listdir(out))


@pytest.mark.parametrize("quiet", [False, True], ids=["progress bar", "quiet"])
def test_a_full_stderr_never_fails_the_merge(tmp_path, pair, quiet):
    import subprocess
    import sys

    from helpers import ROOT

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out = tmp_path / "o.safetensors"
    args = [sys.executable, "-m", "extsub_kernels", *map(str, pair), "-o", str(out), *(["-q"] if quiet else [])]
    with open("/dev/full", "w") as full:
        done = subprocess.run(args, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, stderr=full, timeout=300)
    assert done.returncode == 0 and _is_merge(out)


@pytest.mark.parametrize(
    "change", [{"n_embd": 10**6}, {"n_layer": 10**7}, {"vocab_size": 10**9}, {"n_embd": "64"}], ids=str
)
def test_a_base_config_larger_than_its_weights_is_refused_before_transformers_builds_it(tmp_path, gpt2_trio, change):
    from extsub_kernels.errors import InputError
    from extsub_kernels.lambda_scan import scan

    config = json.loads((gpt2_trio["base"] / "config.json").read_text())
    (gpt2_trio["base"] / "config.json").write_text(json.dumps({**config, **change}))
    sets = {}
    for name in ("keep", "forget"):
        sets[name] = tmp_path / f"{name}.jsonl"
        sets[name].write_text(json.dumps({"input_ids": [3, 4, 5]}) + "\n")
    with pytest.raises(InputError, match=r"BASE .*config\.json (describes at least|n_embd is)"):
        scan(gpt2_trio["expert"], gpt2_trio["anti"], base=gpt2_trio["base"], **sets, out=tmp_path / "s", device="cpu")
    assert not (tmp_path / "s").exists()


def test_a_report_over_the_recipe_the_run_came_from_is_refused(tmp_path, capsys, pair):
    recipe = tmp_path / "recipe.yaml"
    text = json.dumps({"expert": str(pair[0]), "anti": [str(pair[1])], "out": str(tmp_path / "o.safetensors")})
    recipe.write_text(text)
    code, err = _run(capsys, "--config", recipe, "--report", tmp_path / "x" / ".." / "recipe.yaml", "--force")
    assert code == EXIT_BAD_INPUT and "which this run reads" in err, err
    assert recipe.read_text() == text and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("argv", [["only-one-input"], ["e", "a", "-o", "o", "--method", "nope"], ["e", "a", "--bogus"]])
def test_usage_errors_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == EXIT_BAD_INPUT and err.count("\n") == 1 and err.startswith("extsub-merge: error: "), err


def test_errors_name_the_python_option_and_the_command_prints_its_flag(tmp_path):
    """The library's message says `force=True`; the command's says `--force` (errors carry the option's name)."""
    from extsub_kernels.cli.common import as_flags
    from extsub_kernels.errors import InputError

    error = InputError("OUT o already exists; pass force=True to replace it", options=("force",))
    assert "pass force=True to replace it" in str(error)
    assert as_flags(str(error), error.options) == "OUT o already exists; pass --force to replace it"
    assert as_flags("max_shard_size= applies to a folder OUT.", ("max_shard_size",)) == (
        "--max-shard-size applies to a folder OUT."
    )
