"""Public names imported on first use: every listed name resolves, unknown names fail clearly, torch waits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import extsub_kernels
import extsub_kernels.lambda_scan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", [extsub_kernels, extsub_kernels.lambda_scan], ids=lambda p: p.__name__)
def test_every_public_name_resolves_and_unknown_names_are_attribute_errors(package):
    for name in package.__all__:
        assert getattr(package, name) is not None, name
    with pytest.raises(AttributeError, match=rf"module '{package.__name__}' has no attribute 'not_there'"):
        package.not_there  # noqa: B018


def test_importing_the_packages_loads_no_torch():
    code = "import sys, extsub_kernels, extsub_kernels.lambda_scan; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "False"
