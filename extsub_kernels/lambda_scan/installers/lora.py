"""LoRA adapters in a scan: PEFT LoRA layers of rank r⁺ + r⁻ whose factors are rewritten for each (method, λ).

The factored merge (DESIGN §3) gives, per module, ΔW' = B'·A' of rank r⁺ + Σr⁻ whatever λ;
only B' changes with λ. So the base model is wrapped once in PEFT LoRA layers of those ranks
(the largest over the scanned methods: `sub` keeps modules only anti-experts have, `ext-sub`
drops them) and each point copies B' and A' in, padded with zeros; ΔW' is never formed. The
scaling is folded into B', so every layer's scaling is 1.
"""

import warnings
from collections.abc import Sequence

import torch

from extsub_kernels.adapters import LoraAdapter, merge_adapters
from extsub_kernels.adapters.peft import exact_pattern
from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan.installers.base import Installer

ADAPTER_NAME = "default"


class LoraInstaller(Installer):
    """LoRA adapters (`LoraAdapter`s) installed into PEFT LoRA layers on the loaded base model.

    Args:
        adapters: the expert, then the anti-experts in order.
        methods: the methods the scan will install (their ranks fix the layers' shapes).
    """

    kind = "LoRA adapters"

    def __init__(self, adapters: Sequence[LoraAdapter], methods: Sequence[str]):
        self.expert, self.antis = adapters[0], list(adapters[1:])
        for adapter in adapters:
            if adapter.extra:
                raise InputError(
                    f"{adapter.source} holds {len(adapter.extra)} non-LoRA tensors (modules_to_save or trained biases, "
                    f"e.g. {next(iter(adapter.extra))}); the scan installs LoRA modules only. Merge them into full "
                    "models with extsub-merge --base, and scan those"
                )
        self.ranks: dict[str, int] = {}
        for method in methods:  # ranks do not depend on λ; this also checks that the adapters fit together
            for name, module in self._merge(method, 1.0).modules.items():
                self.ranks[name] = max(self.ranks.get(name, 0), module.rank)

    def attach(self, model: torch.nn.Module, base_name: str) -> None:
        """Wrap `model` in PEFT LoRA layers of the merged ranks (scaling 1, zero weights)."""
        import peft

        ranks = self.ranks
        default = max(ranks.values())
        config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=default,
            lora_alpha=default,
            rank_pattern={exact_pattern(name): r for name, r in ranks.items() if r != default},
            target_modules=sorted(ranks),
            lora_dropout=0.0,
            fan_in_fan_out=self.expert.fan_in_fan_out,
            bias="none",
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        except ValueError as e:
            raise InputError(
                f"the LoRA modules of {self.expert.source} do not fit BASE {base_name}: {e}; "
                "is BASE the model the adapters were trained on?"
            ) from None
        self.slots = {name: self._slot(name) for name in ranks}

    def _merge(self, method: str, lam: float) -> LoraAdapter:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report's notes (zero rows, dropped modules) are not the scan's
            return merge_adapters(self.expert, self.antis, lam, method)

    def _slot(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A weight, lora_B weight) of module `name`, its scaling set to 1, its shapes checked."""
        layer = self.model.base_model.model.get_submodule(name)
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        layer.scaling[ADAPTER_NAME] = 1.0
        module = self.expert.modules.get(name) or next(x.modules[name] for x in self.antis if name in x.modules)
        if (b.shape[0], a.shape[1]) != (module.out_features, module.in_features):
            raise InputError(
                f"LoRA module {name} adapts a ({module.out_features}, {module.in_features}) weight but BASE's layer "
                f"is ({b.shape[0]}, {a.shape[1]}); is BASE the model the adapters were trained on?"
            )
        with torch.no_grad():
            a.zero_()
            b.zero_()
        return a, b

    def install(self, method: str, lam: float) -> None:
        """Copy B' and A' of the merge at (method, λ) into every layer, zero-padded to the layer's rank."""
        merged = self._merge(method, lam)
        with torch.no_grad():
            for name, (a, b) in self.slots.items():
                module = merged.modules.get(name)
                if module is None:  # not part of this method's result
                    b.zero_()
                    continue
                r = module.rank
                scaled = module.lora_B if module.scaling == 1.0 else module.lora_B.double() * module.scaling
                a[:r].copy_(module.lora_A)
                b[:, :r].copy_(scaled)
                b[:, r:].zero_()
