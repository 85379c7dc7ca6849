"""Interruptions at the worst moments, with real signals in child processes: an OUT being replaced
survives until its successor is in place, a λ list is published as one step, and what a killed run
leaves behind is cleaned up (or put back) by the next run into the same folder."""

import signal

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels.cli import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM, main

from checkpoints import SHAPES, hashes, leftovers, random_delta, save
from helpers import finish, stopped_cli

HANDLED = [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)]


@pytest.fixture
def pair(tmp_path):
    folder = tmp_path / "in"
    expert, anti = random_delta(SHAPES), random_delta(SHAPES)
    return save(folder / "expert.safetensors", expert), save(folder / "anti.safetensors", anti)


@pytest.fixture
def old_file(tmp_path):
    """An existing OUT file with content of its own."""
    out = tmp_path / "out" / "merged.safetensors"
    save(out, {"old": torch.ones(3)})
    return out


@pytest.fixture
def old_folder(tmp_path):
    """An existing OUT folder (a checkpoint) with content of its own."""
    out = tmp_path / "out" / "merged"
    save(out / "model.safetensors", {"old": torch.ones(3)})
    return out


def _is_new(out):
    weights = out / "model.safetensors" if out.is_dir() else out
    return "lm_head.weight" in load_file(weights)


def _is_old(out):
    weights = out / "model.safetensors" if out.is_dir() else out
    return list(load_file(weights)) == ["old"]


def _rerun(capsys, pair, out, *extra):
    code = main([str(pair[0]), str(pair[1]), "-o", str(out), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("no_swap", [False, True], ids=["renameat2", "no renameat2"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_while_replacing_a_file_leaves_the_old_or_the_new_whole(
    tmp_path, capsys, pair, old_file, when, no_swap
):
    inputs = hashes(pair[0].parent)
    window = "rename" if no_swap else "exchange"
    proc = stopped_cli([*pair, "-o", old_file, "--force", "-q"], at=window, when=when, no_swap=no_swap)
    code, _ = finish(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert (_is_new if when == "after" else _is_old)(old_file), "OUT is one whole output at every moment"
    assert leftovers(old_file.parent), "the killed run had no chance to clean up"
    code, err = _rerun(capsys, pair, old_file.parent / "other.safetensors")
    assert code == 0 and "a temporary output left by a run that was killed" in err
    assert not leftovers(tmp_path), "the next run into the folder removed what the dead one left"
    assert (_is_new if when == "after" else _is_old)(old_file)
    assert hashes(pair[0].parent) == inputs


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_while_swapping_a_folder_leaves_the_old_or_the_new_whole(tmp_path, capsys, pair, old_folder, when):
    proc = stopped_cli([*pair, "-o", old_folder, "--force", "-q"], at="exchange", when=when)
    assert finish(proc, signal.SIGKILL)[0] == -signal.SIGKILL
    assert (_is_new if when == "after" else _is_old)(old_folder)
    code, err = _rerun(capsys, pair, old_folder.parent / "other")
    assert code == 0 and "left by a run that was killed" in err and not leftovers(tmp_path)


def test_sigkill_between_the_renames_of_the_fallback_puts_the_old_folder_back_on_the_next_run(
    tmp_path, capsys, pair, old_folder
):
    # Without renameat2 a folder is replaced in two renames: OUT aside, then the new one in. Killed in between,
    # OUT is missing for a moment; the next run into the folder puts the old one back before anything else.
    proc = stopped_cli([*pair, "-o", old_folder, "--force", "-q"], at="rename", when="after", no_swap=True)
    assert finish(proc, signal.SIGKILL)[0] == -signal.SIGKILL
    assert not old_folder.exists() and leftovers(old_folder.parent)
    code, err = _rerun(capsys, pair, old_folder)
    assert code == EXIT_BAD_INPUT and "already exists" in err, "without --force the put-back OUT is kept"
    assert f"put back {old_folder}" in err and _is_old(old_folder) and not leftovers(tmp_path)
    code, err = _rerun(capsys, pair, old_folder, "--force", "-q")
    assert code == 0 and _is_new(old_folder) and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "sig, expected, no_swap",
    [(signal.SIGINT, EXIT_SIGINT, False), (signal.SIGTERM, EXIT_SIGTERM, True)],
    ids=["SIGINT, renameat2", "SIGTERM, no renameat2"],
)
def test_a_signal_while_replacing_is_held_until_the_new_output_is_in_place(
    tmp_path, pair, old_folder, sig, expected, no_swap
):
    window = "rename" if no_swap else "exchange"
    proc = stopped_cli([*pair, "-o", old_folder, "--force", "-q"], at=window, when="after", no_swap=no_swap)
    code, err = finish(proc, sig)
    assert code == expected, err
    assert "nothing was written" not in err and f"every one was complete: {old_folder}" in err
    assert _is_new(old_folder) and not leftovers(tmp_path)


@pytest.mark.parametrize("sig, expected", HANDLED, ids=["SIGINT", "SIGTERM"])
def test_a_lam_list_interrupted_while_publishing_publishes_every_output(tmp_path, pair, sig, expected):
    out = tmp_path / "out" / "merged.safetensors"
    proc = stopped_cli([*pair, "-o", out, "--lam", "0.5,1", "-q"], at="_move_in", when="after")
    code, err = finish(proc, sig)
    outputs = [out.with_name("merged-lam0.5.safetensors"), out.with_name("merged-lam1.safetensors")]
    assert code == expected and "nothing was written" not in err, err
    assert all(str(p) in err for p in outputs) and "every one was complete" in err
    assert all(_is_new(p) for p in outputs) and not leftovers(tmp_path)


def test_a_lam_list_killed_while_publishing_leaves_whole_outputs_and_the_next_run_cleans_up(tmp_path, capsys, pair):
    out = tmp_path / "out" / "merged.safetensors"
    proc = stopped_cli([*pair, "-o", out, "--lam", "0.5,1", "-q"], at="_move_in", when="after")
    assert finish(proc, signal.SIGKILL)[0] == -signal.SIGKILL
    first, second = out.with_name("merged-lam0.5.safetensors"), out.with_name("merged-lam1.safetensors")
    assert _is_new(first) and not second.exists() and leftovers(out.parent)
    code, err = _rerun(capsys, pair, out, "--lam", "0.5,1", "--force")
    assert code == 0 and "left by a run that was killed" in err
    assert not leftovers(tmp_path) and _is_new(first) and _is_new(second)
