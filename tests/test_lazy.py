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


def test_a_public_name_stays_the_function_after_every_submodule_is_imported():
    code = (
        "import importlib, pkgutil, extsub_kernels.merging, extsub_kernels.lambda_scan.run\n"
        "from extsub_kernels import merge, scan\n"
        "print(callable(merge), type(merge).__name__, callable(scan), type(scan).__name__)\n"
        "import extsub_kernels as p\n"
        "mods = {m.name for m in pkgutil.iter_modules(p.__path__)}\n"
        "print(sorted(mods & set(p.__all__)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split("\n")[:2] == ["True function True function", "[]"], done.stdout
