"""Interruptions at the worst moments, with real signals in child processes: an OUT being replaced
survives until its successor is in place, a λ list is published as one step, and what a killed run
leaves behind is cleaned up (or put back) by the next run into the same folder."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels.cli import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM, main
from extsub_kernels.io import read_header

from checkpoints import SHAPES, hashes, leftovers, random_delta, save, save_shards
from helpers import ROOT, finish, stopped_cli

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


# ------------------------------------------------------------------ paths compared by identity


def _refused(capsys, argv, *parts):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert all(p in err for p in parts), err


def test_out_through_a_symlinked_parent_into_an_input_folder_is_refused(tmp_path, capsys, pair):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dirlink").symlink_to(pair[0].parent)
    before = hashes(pair[0].parent)
    _refused(capsys, [pair[0].parent, pair[1], "-o", tmp_path / "out" / "dirlink" / "m"], "inside the EXPERT folder")
    assert hashes(pair[0].parent) == before and not leftovers(tmp_path)


def test_out_that_is_a_hard_link_to_an_input_is_refused(tmp_path, capsys, pair):
    link = tmp_path / "link.safetensors"
    os.link(pair[1], link)
    _refused(capsys, [*pair, "-o", link, "--force"], "is the ANTI file")


def _in_own_mounts(tmp_path, shell: str) -> subprocess.CompletedProcess:
    """`shell` run in a private mount namespace ($PY is this Python, $ROOT the repository), so it may bind-mount."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "PY": sys.executable}
    command = ["unshare", "--mount", "--map-root-user", "sh", "-c", shell]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)


def test_out_through_a_bind_mount_of_an_input_folder_is_refused(tmp_path, pair):
    before = hashes(pair[0].parent)
    done = _in_own_mounts(
        tmp_path,
        "mkdir bind && mount --bind in bind && "
        '"$PY" -m extsub_kernels in/expert.safetensors in/anti.safetensors -o bind/expert.safetensors --force -q; '
        'echo "rc=$?"; "$PY" -m extsub_kernels in bind/anti.safetensors -o bind/merged -q; echo "rc=$?"',
    )
    assert done.stdout.split() == ["rc=2", "rc=2"], done.stderr
    assert "is the EXPERT file" in done.stderr and "is inside the EXPERT folder" in done.stderr
    assert hashes(pair[0].parent) == before


def test_a_mount_point_is_never_replaced(tmp_path, pair):
    done = _in_own_mounts(
        tmp_path,
        "mkdir -p disk out && mount --bind disk out && "
        '"$PY" -m extsub_kernels in/expert.safetensors in/anti.safetensors -o out --force -q; echo "rc=$?"',
    )
    assert done.stdout.split() == ["rc=2"] and "is a mount point" in done.stderr, done.stderr


# ------------------------------------------------------------------ inputs changed during the run


def _rewrite_in_place(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)


def _add_a_shard(folder):
    save(folder / "extra.safetensors", {"extra": torch.ones(2)})


@pytest.mark.parametrize(
    "change, expert_is_folder, message",
    [
        (_rewrite_in_place, False, "expert.safetensors changed while the merge read it"),
        (lambda p: os.replace(save(p.with_name("x"), random_delta(SHAPES)), p), False, "replaced by another file"),
        (_add_a_shard, True, "extra.safetensors added"),
    ],
    ids=["rewritten in place", "replaced", "file added to a folder input"],
)
def test_an_input_changed_during_the_run_fails_with_exit_1_and_nothing_written(
    tmp_path, capsys, monkeypatch, pair, change, expert_is_folder, message
):
    from extsub_kernels.engine.writing import OutputSet

    expert = save_shards(tmp_path / "shards", load_file(pair[0]), 2, index=False) if expert_is_folder else pair[0]
    real = OutputSet.stream

    def changing(self, *args, **kwargs):
        real(self, *args, **kwargs)
        change(expert)  # every byte has been read, nothing is published yet

    monkeypatch.setattr(OutputSet, "stream", changing)
    out = tmp_path / "out" / "merged.safetensors"
    code = main([str(expert), str(pair[1]), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "no output was published" in err, err
    assert not out.parent.exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------ odd requests that used to fail


def test_out_dot_with_force_in_an_empty_folder(tmp_path, pair, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main([str(pair[0]), str(pair[1]), "-o", ".", "--force", "-q"]) == 0, capsys.readouterr().err
    written = sorted(p.name for p in here.iterdir())
    assert written == ["README.md", "extsub_recipe.yaml", "model.safetensors"] and not leftovers(tmp_path)


def test_a_failed_run_into_new_folders_leaves_none_of_them(tmp_path, capsys, pair):
    bad = save(tmp_path / "nan.safetensors", {k: v * float("nan") for k, v in random_delta(SHAPES).items()})
    code = main([str(pair[0]), str(bad), "-o", str(tmp_path / "new1" / "new2" / "o.safetensors"), "-q"])
    assert code == EXIT_BAD_INPUT and "NaN or Inf" in capsys.readouterr().err
    assert not (tmp_path / "new1").exists()


def test_a_closed_stderr_is_no_error(tmp_path, pair):
    out = tmp_path / "o.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "extsub_kernels", *map(str, pair), "-o", str(out)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(2),  # the child starts with no stderr, as after `2>&-`
    )
    assert done.returncode == 0 and _is_new(out)


def test_a_file_name_that_is_not_utf8(tmp_path, capsys, pair):
    odd = pair[0].with_name(os.fsdecode(b"\xff-expert.safetensors"))
    os.rename(pair[0], odd)
    out = tmp_path / "o.safetensors"
    assert main([str(odd), str(pair[1]), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    assert read_header(out).metadata["extsub.expert"] == "\\xff-expert.safetensors"


def test_a_huge_lam_is_a_clear_input_error(tmp_path, capsys, pair):
    _refused(capsys, [*pair, "-o", tmp_path / "o.safetensors", "--lam", "1e308"], "λ '1e308' is out of range")


def test_a_config_json_with_odd_architectures_is_no_error(tmp_path, capsys):
    expert = save(tmp_path / "expert" / "model.safetensors", random_delta(SHAPES)).parent
    (expert / "config.json").write_text('{"architectures": 5, "model_type": ["gpt2"]}')
    anti = save(tmp_path / "anti.safetensors", random_delta(SHAPES))
    assert main([str(expert), str(anti), "-o", str(tmp_path / "o.safetensors"), "-q"]) == 0, capsys.readouterr().err


def _lora_folder(folder, config: dict, b_scale: float = 1.0):
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(len(str(folder)))
    tensors = {}
    for name in ("m.0.q", "m.1.q"):
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, 6, generator=g)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(8, 2, generator=g) * b_scale
    save(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    return folder


def test_an_adapter_changed_during_the_run_fails_with_exit_1(tmp_path, capsys, monkeypatch):
    from extsub_kernels.engine.writing import OutputSet

    expert, anti = _lora_folder(tmp_path / "e", {}), _lora_folder(tmp_path / "a", {})
    real = OutputSet.stream

    def changing(self, *args, **kwargs):
        real(self, *args, **kwargs)
        (expert / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 5}')

    monkeypatch.setattr(OutputSet, "stream", changing)
    code = main([str(expert), str(anti), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "adapter_config.json changed while the merge read it" in err, err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_an_adapter_output_beyond_the_chosen_dtype_is_an_error_naming_the_module(tmp_path, capsys):
    expert, anti = _lora_folder(tmp_path / "e", {}, b_scale=1e5), _lora_folder(tmp_path / "a", {})
    code = main([str(expert), str(anti), "-o", str(tmp_path / "out"), "--dtype", "float16", "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "module m.0.q: base_model.model.m.0.q.lora_B.weight overflows float16" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_a_failure_after_publishing_never_claims_nothing_was_written(tmp_path, capsys, monkeypatch, pair):
    import extsub_kernels.engine.report as report

    def failing() -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(report, "peak_rss_bytes", failing)  # MergeReport.finished: after the outputs are in place
    out = tmp_path / "o.safetensors"
    code = main([str(pair[0]), str(pair[1]), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and f"after publishing its outputs (each complete: {out})" in err, err
    assert "nothing was written" not in err and _is_new(out)
