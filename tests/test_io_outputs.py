"""Path rules of report folders (a λ scan's SCAN_DIR): apart from the inputs, a folder, earlier files replaced only
with force, temporaries of killed runs cleaned first."""

import subprocess
import sys

import pytest

from extsub_kernels.constants import TEMP_TAG
from extsub_kernels.errors import InputError
from extsub_kernels.io import resolve_input
from extsub_kernels.io.outputs import check_report_folder

from checkpoints import SHAPES, random_delta, save

NAMES = ("scan.json", "scan.csv")


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "expert"
    save(folder / "model.safetensors", random_delta(SHAPES))
    return [("EXPERT", resolve_input(folder))]


def test_a_new_or_unrelated_folder_is_fine(tmp_path, inputs):
    check_report_folder(tmp_path / "new" / "scan", NAMES, inputs, force=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("other files are left alone")
    check_report_folder(tmp_path / "mine", NAMES, inputs, force=False)
    assert not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("expert", r"SCAN_DIR .*expert is the EXPERT folder; choose another path"),
        ("expert/scan", r"SCAN_DIR .*expert/scan is inside the EXPERT folder"),
        ("file", r"SCAN_DIR .*file exists and is not a folder"),
    ],
)
def test_refused_folders(tmp_path, inputs, where, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=message):
        check_report_folder(tmp_path / where, NAMES, inputs, force=True)


def test_earlier_files_need_force(tmp_path, inputs):
    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "scan.csv").write_text("an earlier scan")
    with pytest.raises(InputError, match=r"scan already holds scan\.csv \(an earlier run\?\); pass force=True"):
        check_report_folder(folder, NAMES, inputs, force=False)
    check_report_folder(folder, NAMES, inputs, force=True)


def test_temporaries_of_a_killed_scan_are_cleaned_first(tmp_path, inputs):
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    folder = tmp_path / "scan"
    folder.mkdir()
    stale = folder / f".scan.json{TEMP_TAG}{pid}-0123abcd"
    stale.write_text("half a file")
    with pytest.warns(UserWarning, match="killed"):
        check_report_folder(folder, NAMES, inputs, force=False)
    assert not stale.exists()
