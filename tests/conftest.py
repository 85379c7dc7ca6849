"""Shared fixtures: Triton's interpreter on CPU-only machines, a fresh seed per run, devices."""

import os
import random

import pytest
import torch

# The kernel module reads TRITON_INTERPRET when it is first imported: set it before any test
# imports extsub_kernels.kernels, so CPU-only machines (CI) run the real kernel's logic.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED = int(os.environ.get("EXTSUB_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config: pytest.Config) -> str:
    return f"extsub test seed: {SEED} (rerun with EXTSUB_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Fresh random inputs each run, reproducible from the seed in the report header."""
    torch.manual_seed(SEED)
    random.seed(SEED)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def backend_available(backend: str, device: str) -> bool:
    """Whether `backend` can run on `device` here (Triton on CPU needs the interpreter)."""
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return device == "cuda" or interpreting()
    return True
