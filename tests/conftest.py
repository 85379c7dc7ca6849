"""Shared fixtures: Triton's interpreter on CPU-only machines, a fresh seed per run, the gpu marker,
tiny PEFT adapters, an offline hub cache."""

import os
import random

import pytest
import torch

# The kernel module reads TRITON_INTERPRET when it is first imported: set it before any test
# imports extsub_kernels.kernels, so CPU-only machines (CI) run the real kernel's logic.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import SEED


def pytest_report_header(config: pytest.Config) -> str:
    return f"extsub test seed: {SEED} (rerun with EXTSUB_TEST_SEED={SEED})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: long tests (a minute or so in all); they run in CI, `-m 'not slow'` skips them locally"
    )


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Fresh random inputs each run, reproducible from the seed in the report header."""
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
