"""What both commands share: interrupts end with one line and their exit code, from start-up on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from extsub_kernels.cli.common import EXIT_SIGINT, EXIT_SIGTERM, run_command
from extsub_kernels.errors import Terminated

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "error, code, word", [(KeyboardInterrupt, EXIT_SIGINT, "interrupted"), (Terminated, EXIT_SIGTERM, "terminated")]
)
def test_an_interrupt_anywhere_is_one_line_and_its_exit_code(capsys, error, code, word):
    def body() -> int:
        raise error

    assert run_command("extsub-inspect", body) == code
    assert capsys.readouterr().err == f"extsub-inspect: error: {word}; nothing was written\n"


def test_extsub_inspect_runs_as_a_module_and_says_its_version():
    done = subprocess.run(
        [sys.executable, "-m", "extsub_kernels.cli.inspect", "--version"],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    from extsub_kernels import __version__

    assert done.stdout.strip() == f"extsub-inspect {__version__}"


@pytest.mark.parametrize("command", ["merge", "inspect", "scan"])
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["--no-such-flag"]])
def test_help_version_and_usage_errors_answer_before_torch_loads(command, argv):
    """Parsing needs only the option names: --help, --version and usage errors never import torch (seconds)."""
    code = (
        "import sys\n"
        f"from extsub_kernels.cli.{command} import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr


def test_python_m_on_a_command_module_runs_it_once_without_a_warning():
    """The package's import notes signals under `python -m` too, and cli/ imports its commands lazily, so runpy
    does not find the module already imported (its RuntimeWarning) and runs it once."""
    done = subprocess.run(
        [sys.executable, "-m", "extsub_kernels.cli.merge", "--version"],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().startswith("extsub-merge ") and done.stderr == ""


@pytest.mark.parametrize(
    "argv, orig_argv, noted",
    [
        (["/usr/bin/extsub-merge"], ["python", "/usr/bin/extsub-merge"], True),
        (["-m"], ["python", "-X", "importtime", "-m", "extsub_kernels.cli.scan"], True),
        (["-m"], ["python", "-m", "extsub_kernels"], True),
        (["-m"], ["python", "-m", "pytest"], False),
        (["/usr/bin/python"], ["python", "-c", "import extsub_kernels", "-m", "extsub_kernels"], False),
    ],
)
def test_the_package_notes_signals_from_its_import_only_in_a_command(argv, orig_argv, noted):
    import signal

    from extsub_kernels import _signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _signals.install_for_commands(argv, orig_argv)
        assert (signal.getsignal(signal.SIGINT) is _signals._note_only) is noted
    finally:
        _signals.restore(before)
