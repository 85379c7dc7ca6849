"""What every installer is: the merge at one (method, λ) put into a loaded model, in place (docs/design.md §8);
`AdapterInstaller` is what the PEM types share."""

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from extsub_kernels._tensors import cast_overflow
from extsub_kernels.adapters import PeftAdapter, merge_adapters
from extsub_kernels.errors import InputError, MergeError

ADAPTER_NAME = "default"  # the PEFT adapter name the scan's layers are created under


class Installer(ABC):
    """Puts the merge of the expert and anti-experts at (method, λ) into a loaded model, in place; `kind`: what is
    merged, in words ("LoRA adapters"); `model`: once attached, the loaded base wrapped as the inputs need."""

    kind: ClassVar[str]
    model: torch.nn.Module

    @abstractmethod
    def attach(self, model: torch.nn.Module, base_name: str) -> None:
        """Wrap the loaded base `model` (on its device) for installing; InputError if the inputs do not fit it."""

    @abstractmethod
    def install(self, method: str, lam: float) -> None:
        """Overwrite the model's merged parameters with the merge at (method, λ); λ = 0 gives the expert."""

    def close(self) -> None:  # noqa: B027 (optional: most installers hold nothing open)
        """Release what the installer holds open (files); the model stays usable."""


def put(slot: torch.Tensor, value: torch.Tensor, what: str, method: str, lam: float) -> None:
    """Copy a merged `value` into `slot` (part of a model parameter); MergeError if it overflows the slot's dtype."""
    slot.copy_(value)
    overflow = cast_overflow(value, slot) if slot.dtype != value.dtype else None
    if overflow is not None:
        raise too_large(what, method, lam, slot.dtype, overflow)


def too_large(what: str, method: str, lam: float, dtype: torch.dtype, detail: str = "") -> MergeError:
    """The error of a merged tensor the model's dtype cannot hold (λ too large for it): the scan stops there."""
    name = str(dtype).removeprefix("torch.")
    return MergeError(
        f"{what}: the merge at {method} λ={lam:g} does not fit the model's {name}{f' ({detail})' if detail else ''}; "
        "scan smaller λ, or evaluate in float32 (--dtype float32)"
    )


class AdapterInstaller(Installer):
    """What every PEM type shares: the adapters, their family merge (each of `methods` once at λ = 1, so misfits
    show before the base loads), PEFT wrapping with a clear error; a member implements `attach` and `install`."""

    def __init__(self, adapters: Sequence[PeftAdapter], methods: Sequence[str]):
        self.expert, self.antis = adapters[0], list(adapters[1:])
        for adapter in adapters:
            if adapter.extra:
                raise InputError(
                    f"{adapter.source} holds {len(adapter.extra)} non-{adapter.label} tensors (modules_to_save or "
                    f"trained biases, e.g. {next(iter(adapter.extra))}); the scan installs {adapter.label} parameters "
                    "only. Merge them into full models with extsub-merge --base, and scan those"
                )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the merge report's notes (zero rows, dropped modules) are not the scan's
            self.checked = self.prepare(methods)

    def prepare(self, methods: Sequence[str]) -> dict[str, PeftAdapter]:
        """The merge of each method at λ = 1 (what the result holds does not depend on λ); members may keep more."""
        return {method: merge_adapters(self.expert, self.antis, 1.0, method) for method in methods}

    def merge(self, method: str, lam: float) -> PeftAdapter:
        """The family merge at (method, λ), its warnings silenced."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return merge_adapters(self.expert, self.antis, lam, method)

    def wrap(
        self, model: torch.nn.Module, config: object, base_name: str, modules: Sequence[str] = ()
    ) -> torch.nn.Module:
        """`peft.get_peft_model(model, config)`, after checking that BASE has every one of the adapter's `modules`."""
        import peft

        present = {name for name, _ in model.named_modules()}
        missing = [name for name in modules if name not in present]
        if missing:
            more = f" (and {len(missing) - 1} more of its {len(modules)})" if len(missing) > 1 else ""
            raise InputError(
                f"the {self.expert.label} adapter {self.expert.source} does not fit BASE {base_name}: BASE has no "
                f"module {missing[0]}{more}; is BASE the model the adapters were trained on?"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapped = peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)
            return wrapped.requires_grad_(False)  # evaluated only, as PEFT's inference mode leaves a loaded adapter
        except ValueError as e:
            raise InputError(
                f"the {self.expert.label} adapter {self.expert.source} does not fit BASE {base_name}: {e}; "
                "is BASE the model the adapters were trained on?"
            ) from None

    def _shape_error(self, what: str, expected: Sequence[int], found: Sequence[int], base_name: str) -> InputError:
        return InputError(
            f"{self.expert.label} {what}: the adapters have {list(expected)} but BASE {base_name} gives "
            f"{list(found)}; is BASE the model the adapters were trained on?"
        )
