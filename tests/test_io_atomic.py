"""Publishing outputs: all of a run's outputs or none, an OUT being replaced never missing, folders created
for a failed run removed again, signals held back while the outputs move."""

import errno
import os
import signal

import pytest

from extsub_kernels.errors import InputError, Interrupted, Terminated
from extsub_kernels.io import atomic

from checkpoints import leftovers


def _temp_file(target, text):
    temp = atomic.reserve_temp(target, folder=False)
    temp.write_text(text)
    return temp


def _temp_folder(target, text):
    temp = atomic.reserve_temp(target, folder=True)
    (temp / "model.safetensors").write_text(text)
    return temp


@pytest.fixture(params=[True, False], ids=["renameat2", "no renameat2"])
def swap(request, monkeypatch):
    """Both ways to replace: renameat2 where the file system has it, and the fallback where it has not."""
    if not request.param:
        monkeypatch.setattr(atomic, "_renameat2_fn", None)
    return request.param


def test_new_outputs_of_a_run_appear_together(tmp_path, swap):
    targets = [tmp_path / "a.safetensors", tmp_path / "b"]
    temps = [_temp_file(targets[0], "A"), _temp_folder(targets[1], "B")]
    assert atomic.publish_all(list(zip(temps, targets, strict=True)), force=False) == tuple(targets)
    assert targets[0].read_text() == "A" and (targets[1] / "model.safetensors").read_text() == "B"
    assert not leftovers(tmp_path)


def test_force_replaces_a_file_and_a_folder(tmp_path, swap):
    file, folder = tmp_path / "a.safetensors", tmp_path / "b"
    file.write_text("old")
    folder.mkdir()
    (folder / "model.safetensors").write_text("old")
    moves = [(_temp_file(file, "new"), file), (_temp_folder(folder, "new"), folder)]
    atomic.publish_all(moves, force=True)
    assert file.read_text() == "new" and (folder / "model.safetensors").read_text() == "new"
    assert not leftovers(tmp_path)


def test_a_failed_move_undoes_the_moves_before_it(tmp_path, swap, monkeypatch):
    replaced, created, failing = tmp_path / "a", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    replaced.mkdir()
    (replaced / "model.safetensors").write_text("old")
    moves = [(_temp_folder(replaced, "new"), replaced), (_temp_file(created, "new"), created)]
    moves.append((_temp_file(failing, "new"), failing))
    real = atomic._move_in

    def third_fails(temp, target, *, force):
        if target == failing:
            raise OSError(errno.EIO, "Input/output error")
        return real(temp, target, force=force)

    monkeypatch.setattr(atomic, "_move_in", third_fails)
    with pytest.raises(OSError, match="Input/output error"):
        atomic.publish_all(moves, force=True)
    assert (replaced / "model.safetensors").read_text() == "old", "the replaced OUT is back"
    assert not created.exists(), "the new OUT is gone again"
    for temp, _ in moves[2:]:
        atomic.remove(temp)
    assert not leftovers(tmp_path)


def test_an_out_that_appeared_meanwhile_is_never_overwritten_without_force(tmp_path, swap):
    target = tmp_path / "out"
    temp = _temp_folder(target, "new")
    target.mkdir()  # another run took the name
    (target / "theirs.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="appeared while the merge ran"):
        atomic.publish_all([(temp, target)], force=False)
    assert [p.name for p in target.iterdir()] == ["theirs.safetensors"]
    atomic.remove(temp)


def test_an_empty_folder_out_is_taken_without_force(tmp_path, swap):
    """An empty folder holds nothing to lose: a folder output takes its place, as check_outputs allows."""
    target = tmp_path / "out"
    temp = _temp_folder(target, "new")
    target.mkdir()
    atomic.publish_all([(temp, target)], force=False)
    assert target.is_dir() and any(target.iterdir()) and not leftovers(tmp_path)


def test_a_failed_run_removes_the_folders_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new1" / "new2" / "out.safetensors"
    temp = atomic.reserve_temp(target, folder=False)
    assert temp.parent == target.parent and temp.exists()
    atomic.remove(temp)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_a_folder_created_for_one_output_stays_while_another_output_uses_it(tmp_path):
    first = atomic.reserve_temp(tmp_path / "new" / "a.safetensors", folder=False)
    second = atomic.reserve_temp(tmp_path / "new" / "b.safetensors", folder=False)
    atomic.remove(first)
    assert second.exists()
    atomic.remove(second)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, Interrupted), (signal.SIGTERM, Terminated)])
def test_a_signal_while_publishing_is_raised_once_every_output_is_in_place(tmp_path, monkeypatch, sig, raised):
    targets = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    moves = [(_temp_file(t, "new"), t) for t in targets]
    real = atomic._move_in

    def signalled(temp, target, *, force):
        if target == targets[0]:
            os.kill(os.getpid(), sig)  # arrives between the two moves
        return real(temp, target, force=force)

    monkeypatch.setattr(atomic, "_move_in", signalled)
    with pytest.raises(raised) as caught:
        atomic.publish_all(moves, force=False)
    assert caught.value.published == tuple(targets)
    assert all(t.read_text() == "new" for t in targets) and not leftovers(tmp_path)


def test_within_a_run_signals_wait_for_its_end_once_outputs_move(tmp_path):
    target = tmp_path / "a.safetensors"
    with pytest.raises(Terminated) as caught, atomic.terminate_as_interrupt():
        atomic.publish_all([(_temp_file(target, "new"), target)], force=False)
        os.kill(os.getpid(), signal.SIGTERM)  # after publishing, e.g. while the report is made
        reached_the_end = True
    assert reached_the_end and caught.value.published == (target,)


def test_before_publishing_a_signal_in_a_run_is_raised_at_once(tmp_path):
    with pytest.raises(Terminated) as caught, atomic.terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM should have raised")
    assert caught.value.published == ()


def test_replace_file_writes_whole_and_replaces(tmp_path):
    """A scan's files: written whole beside the target and renamed over it; no temporary is left, and no signal is
    held back (a scan stays interruptible between its rows)."""
    target = tmp_path / "scan" / "scan.json"
    target.parent.mkdir()
    atomic.replace_file(target, b"first")
    atomic.replace_file(target, b"second")
    assert target.read_bytes() == b"second" and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_replace_file_keeps_the_old_version_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "scan.json"
    atomic.replace_file(target, b"rows so far")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic.replace_file(target, b"more rows")
    assert target.read_bytes() == b"rows so far" and leftovers(tmp_path) == []
