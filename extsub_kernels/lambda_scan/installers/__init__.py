"""Installers: the merge at each (method, λ) put into the loaded model in place; each PEM type names its own in
`scan_installer` (imported by `installer_for`), full models with a base have `FullModelInstaller`."""

import importlib
from collections.abc import Sequence

import torch

from extsub_kernels.adapters import PeftAdapter
from extsub_kernels.adapters.run import load_inputs
from extsub_kernels.errors import InputError
from extsub_kernels.io import ResolvedInput
from extsub_kernels.lambda_scan.installers.base import AdapterInstaller, Installer
from extsub_kernels.lambda_scan.installers.full_model import FullModelInstaller
from extsub_kernels.lambda_scan.installers.lora import LoraInstaller


def installer_for(adapter_type: type[PeftAdapter]) -> type[AdapterInstaller] | None:
    """The installer a PEM type names in `scan_installer` ("module:Class"), imported; None if it names none."""
    if adapter_type.scan_installer is None:
        return None
    module, _, name = adapter_type.scan_installer.partition(":")
    return getattr(importlib.import_module(module), name)


def make_installer(
    inputs: Sequence[tuple[str, ResolvedInput]], *, adapters: bool, methods: Sequence[str], device: torch.device
) -> Installer:
    """The installer for `inputs` (EXPERT, the ANTIs, BASE last), made before the base model loads, so bad inputs
    show first (InputError): adapters are loaded and merged once per method, full models planned from headers."""
    if not adapters:
        return FullModelInstaller(inputs, device)
    loaded = load_inputs([(role, inp) for role, inp in inputs[:-1]])
    installer = installer_for(type(loaded[0]))
    if installer is None:
        raise InputError(f"{loaded[0].source}: the scan cannot install {type(loaded[0]).__name__} adapters yet")
    return installer(loaded, methods)


__all__ = [
    "AdapterInstaller",
    "FullModelInstaller",
    "Installer",
    "LoraInstaller",
    "installer_for",
    "make_installer",
]
