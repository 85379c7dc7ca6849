"""Shared fixtures: Triton's interpreter on CPU-only machines, one torch thread, a fixed seed (printed with every
failure), the gpu marker, tiny PEFT adapters, an offline hub cache."""

import os
import random

# One intra-op thread, in this process and the commands the tests start: the tests' tensors are tiny, and on a small
# shared machine torch's default (a thread per core) made them 10× slower, each thread waiting on the others. Tests of
# the C++ kernel's thread splits set their own counts. Set before torch loads, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hypothesis
import pytest
import torch

# hypothesis draws its examples from a fixed seed too (derandomize), and keeps no database between runs, so two runs
# of the suite try the same cases.
hypothesis.settings.register_profile("extsub", derandomize=True, database=None, print_blob=True)
hypothesis.settings.load_profile("extsub")

# The kernel module reads TRITON_INTERPRET when it is first imported: set it before any test
# imports extsub_kernels.kernels, so CPU-only machines (CI) run the real kernel's logic.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import SEED  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return f"extsub test seed: {SEED} (rerun with EXTSUB_TEST_SEED={SEED})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report names the seed its random inputs came from."""
    report = yield
    if report.failed:
        report.sections.append(("extsub test seed", f"{SEED} (rerun with EXTSUB_TEST_SEED={SEED})"))
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: long tests (a minute or so in all); they run in CI, `-m 'not slow'` skips them locally"
    )


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The same random inputs in every test and every run (EXTSUB_TEST_SEED draws others)."""
    torch.manual_seed(SEED)
    random.seed(SEED)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip, with the reason, where CUDA is missing."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _model_and_adapters(tmp_path_factory, name: str):
    fixtures = pytest.importorskip("peft_fixtures")
    torch.manual_seed(fixtures.SEED)
    model = fixtures.MODELS[name]()
    return model, fixtures.make_adapters(model, fixtures.ADAPTERS[name], tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A tiny LLaMA (random weights) and PEFT adapters of it: expert, anti, anti2 (peft_fixtures.LLAMA_ADAPTERS)."""
    return _model_and_adapters(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (Conv1D layers, fan_in_fan_out) and PEFT adapters of it: expert, anti."""
    return _model_and_adapters(tmp_path_factory, "gpt2")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline: nothing can reach the network."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Trained tiny models, adapters and evaluation sets (trained_fixtures.TrainedFixtures), each built on first use."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import trained_fixtures

    return trained_fixtures.get(tmp_path_factory)
