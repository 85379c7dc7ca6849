"""What killed runs leave beside an OUT: removed (or put back) by the next run into that folder, never a live one's."""

import fcntl
import os
import subprocess
import sys

import pytest

from extsub_kernels.io import temps


@pytest.fixture(scope="module")
def dead_pid():
    """The PID of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _leave(folder, name, pid, *, old=False, folder_kind=False):
    path = folder / f".{name}{temps.TEMP_TAG}{pid}-{'old-' if old else ''}0123abcd"
    if folder_kind:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 64)
    else:
        path.write_bytes(b"x" * 64)
    return path


def test_temporaries_of_dead_runs_are_removed_with_a_warning(tmp_path, dead_pid):
    file = _leave(tmp_path, "out.safetensors", dead_pid)
    folder = _leave(tmp_path, "merged", dead_pid, folder_kind=True)
    with pytest.warns(UserWarning, match=f"left by a run that was killed \\(PID {dead_pid}\\)"):
        done = temps.clean_stale(tmp_path)
    assert len(done) == 2 and not file.exists() and not folder.exists()


def test_temporaries_of_live_processes_are_kept(tmp_path):
    live = [_leave(tmp_path, "a.safetensors", os.getpid()), _leave(tmp_path, "b.safetensors", os.getppid())]
    assert temps.clean_stale(tmp_path) == [] and all(p.exists() for p in live)


def test_a_temporary_whose_lock_is_held_is_kept_whatever_its_pid(tmp_path, dead_pid):
    # A run in another PID namespace (a container sharing the folder) has a PID we cannot see: its lock tells.
    path = _leave(tmp_path, "out.safetensors", dead_pid)
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert temps.clean_stale(tmp_path) == [] and path.exists()
    finally:
        os.close(fd)


def test_an_out_set_aside_by_a_killed_replacement_is_put_back(tmp_path, dead_pid):
    aside = _leave(tmp_path, "merged", dead_pid, old=True, folder_kind=True)
    with pytest.warns(UserWarning, match="put back"):
        temps.clean_stale(tmp_path)
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == b"x" * 64 and not aside.exists()


def test_an_old_out_whose_successor_is_in_place_is_removed(tmp_path, dead_pid):
    (tmp_path / "out.safetensors").write_bytes(b"new")
    aside = _leave(tmp_path, "out.safetensors", dead_pid, old=True)
    with pytest.warns(UserWarning, match="removed"):
        temps.clean_stale(tmp_path)
    assert (tmp_path / "out.safetensors").read_bytes() == b"new" and not aside.exists()


def test_other_names_and_links_are_never_touched(tmp_path, dead_pid):
    target = tmp_path / "precious"
    target.write_text("keep")
    link = tmp_path / f".out.safetensors{temps.TEMP_TAG}{dead_pid}-0123abcd"
    link.symlink_to(target)
    others = [tmp_path / ".out.safetensors.extsub-tmp-notapid", tmp_path / f"out{temps.TEMP_TAG}{dead_pid}-0123abcd"]
    for p in others:
        p.write_text("x")
    assert temps.clean_stale(tmp_path) == []
    assert link.is_symlink() and target.read_text() == "keep" and all(p.exists() for p in others)
