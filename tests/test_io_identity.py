"""Paths compared by identity (symlinks, `..`, hard links and bind mounts seen through); inputs checked unchanged."""

import os
import subprocess
import sys

import pytest

from extsub_kernels.errors import MergeError
from extsub_kernels.io import resolve_input
from extsub_kernels.io.identity import InputSnapshot, file_id, folder_chain, is_mount_point

from checkpoints import SHAPES, random_delta, save, save_shards
from helpers import ROOT


def test_a_symlinked_parent_and_dot_dot_lead_to_the_same_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    chain = dict((p, i) for p, i in folder_chain(tmp_path / "link" / ".." / "real" / "x.safetensors"))
    assert file_id(tmp_path / "real") in chain.values() and file_id(tmp_path / "link") == file_id(tmp_path / "real")


def test_a_hard_link_is_the_same_file(tmp_path):
    (tmp_path / "a").write_text("x")
    os.link(tmp_path / "a", tmp_path / "b")
    assert file_id(tmp_path / "a") == file_id(tmp_path / "b") and file_id(tmp_path / "c") is None


@pytest.fixture
def expert_file(tmp_path):
    return save(tmp_path / "in" / "expert.safetensors", random_delta(SHAPES))


def _snapshot(spec):
    return InputSnapshot([("EXPERT", resolve_input(spec))])


def test_an_unchanged_input_passes(expert_file):
    _snapshot(expert_file).check()


def test_an_input_rewritten_in_place_with_the_same_size_and_time_is_caught(expert_file):
    snapshot = _snapshot(expert_file)
    st = expert_file.stat()
    data = bytearray(expert_file.read_bytes())
    data[-1] ^= 0xFF
    with open(expert_file, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    os.utime(expert_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # even its modification time put back
    with pytest.raises(MergeError, match=r"EXPERT .*expert.safetensors changed while the merge read it \(its inode"):
        snapshot.check()


def test_an_input_replaced_by_another_file_is_caught(expert_file, tmp_path):
    snapshot = _snapshot(expert_file)
    other = save(tmp_path / "other.safetensors", random_delta(SHAPES))
    os.replace(other, expert_file)
    with pytest.raises(MergeError, match="replaced by another file"):
        snapshot.check()


def test_a_file_added_to_a_folder_input_changes_that_input(tmp_path):
    folder = save_shards(tmp_path / "shards", random_delta(SHAPES), 2, index=False)
    snapshot = _snapshot(folder)
    save(folder / "extra.safetensors", random_delta({"x": (2,)}))
    with pytest.raises(MergeError, match=r"the EXPERT folder .*shards changed .*extra.safetensors added"):
        snapshot.check()


def test_a_deleted_input_is_caught(expert_file):
    snapshot = _snapshot(expert_file)
    expert_file.unlink()
    with pytest.raises(MergeError, match="deleted or moved away"):
        snapshot.check()


def test_a_bind_mount_is_seen_as_a_mount_point_and_through_to_its_folder(tmp_path):
    # A private mount namespace (unshare) lets the test mount without touching the machine's mounts.
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    code = (
        "import sys; from pathlib import Path; from extsub_kernels.io.identity import file_id, is_mount_point; "
        "src, mnt = Path(sys.argv[1]), Path(sys.argv[2]); "
        "print(is_mount_point(mnt), is_mount_point(src), file_id(mnt) == file_id(src))"
    )
    script = f'mount --bind "$1" "$2" && exec "{sys.executable}" -c "{code}" "$1" "$2"'
    done = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", tmp_path / "src", tmp_path / "mnt"],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert done.stdout.split() == ["True", "False", "True"], done.stderr
    assert not is_mount_point(tmp_path / "mnt"), "the mount lived in the test's own namespace only"


def test_the_reader_and_the_consequence_word_the_error(expert_file):
    """The scan checks the same snapshot with its own words: who read the inputs and what that means for its files."""
    snapshot = InputSnapshot([("EXPERT", resolve_input(expert_file))], reader="the scan", then="the rows are kept")
    os.utime(expert_file, ns=(1, 1))
    with pytest.raises(
        MergeError, match=r"EXPERT .*expert\.safetensors changed while the scan read it \(it was written"
    ):
        snapshot.check()
    with pytest.raises(MergeError, match=r"\); the rows are kept$"):
        snapshot.check()
