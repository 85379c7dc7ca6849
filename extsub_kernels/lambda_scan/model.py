"""The model a scan evaluates: BASE loaded once with `transformers`, with its own tokenizer, on the device; and the
one check of the scan's optional dependencies (`require`), each named with the command that installs it."""

import importlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from extsub_kernels._version import install_hint
from extsub_kernels.errors import InputError
from extsub_kernels.io import ResolvedInput, read_header

# Files any of which means the folder has a tokenizer (AutoTokenizer reads them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def require(*packages: str) -> None:
    """Raise an InputError naming every one of `packages` that cannot be imported, with the install command."""
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise InputError(
            f"the λ scan needs {', '.join(missing)}, which {verb} not installed; install with: {install_hint('scan')}"
        )


def check_threads(threads: int | None) -> int:
    """`threads` checked (a positive integer); None: half the cores this process may use, at least 1 (on a shared
    2-core machine 2 threads were 3.5–7× slower than 1: README, "Choosing λ")."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // 2)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    return threads


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluation_dtype(requested: torch.dtype | None, device: torch.device, base: ResolvedInput) -> torch.dtype:
    """The dtype the model is loaded and evaluated in: as asked, else the checkpoint's on CUDA, float32 on the CPU."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        config = base.config() or {}
        name = config.get("dtype") or config.get("torch_dtype")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return torch.float32


def load_tokenizer(base: ResolvedInput):
    """BASE's tokenizer (`AutoTokenizer`), or None when its folder has no tokenizer files."""
    folder = _model_folder(base)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"BASE {base.spec}: its tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


def load_model(base: ResolvedInput, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """BASE as a causal language model (`AutoModelForCausalLM`), in `dtype`, on `device`, in eval mode; on the meta
    device its shapes only (no weight read), to check the sets against."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _model_folder(base)
    check_config_fits(base)
    try:
        with _quiet_transformers():
            if device.type == "meta":
                with device:
                    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise InputError(
            f"BASE {base.spec}: transformers cannot load it as a causal language model ({type(e).__name__}: {e})"
        ) from None
    return model.to(device).eval()


def check_config_fits(base: ResolvedInput) -> None:
    """Refuse a config.json that describes a model larger than BASE's weights, before transformers allocates it: a
    lower bound of its parameters (embeddings, one d×d projection per layer) against the weights' headers."""
    config = base.config() or {}
    sizes = {}
    for key, names in _CONFIG_SIZES.items():
        name = next((n for n in names if n in config), None)
        value = config[name] if name is not None else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"BASE {base.spec}: config.json {name} is {value!r}; a size is a non-negative integer")
        sizes[key] = value or 0
    hidden = sizes["hidden"]
    described = hidden * (sizes["vocab"] + sizes["layers"] * hidden)
    stored = sum(math.prod(t.shape) for path in base.files for t in read_header(path).tensors.values())
    if described > 2 * stored + (1 << 20):
        raise InputError(
            f"BASE {base.spec}: config.json describes at least {described:,} parameters (hidden size {hidden:,}, "
            f"{sizes['layers']:,} layers, vocabulary {sizes['vocab']:,}) but the weights hold {stored:,}; "
            "the config does not belong to these weights"
        )


# config.json names of the sizes `check_config_fits` reads (transformers' usual name first, then GPT-2's).
_CONFIG_SIZES = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab": ("vocab_size",),
}


def _model_folder(base: ResolvedInput):
    if base.kind == "file" or base.config_file("config.json") is None:
        raise InputError(
            f"BASE {base.spec}: the scan loads BASE with transformers, so it must be a model folder (or hub id) "
            "with a config.json beside the weights"
        )
    return base.root


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No loading bars or info logs from transformers while BASE loads (the scan has its own progress)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
