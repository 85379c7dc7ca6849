"""LoRA adapters in a scan: PEFT LoRA layers of rank r⁺ + r⁻ whose factors are rewritten for each (method, λ).

The factored merge's rank does not depend on λ, so the base is wrapped once in LoRA layers of the largest rank over the
scanned methods (scaling 1) and each point copies B' and A' in, zero-padded, from a `LoraSweep` on the model's device.
"""

from collections.abc import Sequence

import torch

from extsub_kernels.adapters import LoraAdapter, LoraModule, LoraSweep, PeftAdapter
from extsub_kernels.adapters.lora import exact_pattern
from extsub_kernels.lambda_scan.installers.base import ADAPTER_NAME, AdapterInstaller, put


class LoraInstaller(AdapterInstaller):
    """`LoraAdapter`s installed into PEFT LoRA layers."""

    kind = "LoRA adapters"

    def __init__(self, adapters: Sequence[LoraAdapter], methods: Sequence[str]):
        self.sweeps: dict[str, LoraSweep] = {}
        super().__init__(adapters, methods)
        self.ranks: dict[str, int] = {}
        for merged in self.checked.values():  # ranks do not depend on λ
            for name, module in merged.modules.items():
                self.ranks[name] = max(self.ranks.get(name, 0), module.rank)

    def prepare(self, methods: Sequence[str]) -> dict[str, PeftAdapter]:
        """One `LoraSweep` per method (it checks the adapters); its template is the merge at λ = 1."""
        self.sweeps = {method: LoraSweep(self.expert, self.antis, method) for method in methods}
        return {method: sweep.template for method, sweep in self.sweeps.items()}

    def attach(self, model: torch.nn.Module, base_name: str) -> None:
        """Wrap `model` in PEFT LoRA layers of the merged ranks (scaling 1, zero weights)."""
        import peft

        default = max(self.ranks.values())
        config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=default,
            lora_alpha=default,
            rank_pattern={exact_pattern(name): r for name, r in self.ranks.items() if r != default},
            target_modules=sorted(self.ranks),
            lora_dropout=0.0,
            fan_in_fan_out=self.expert.fan_in_fan_out,
            bias="none",
        )
        self.model = self.wrap(model, config, base_name, list(self.ranks))
        device = next(self.model.parameters()).device
        if device.type != "cpu":
            self.sweeps = {method: sweep.to(device) for method, sweep in self.sweeps.items()}
        self.slots = {name: self._slot(name, base_name) for name in self.ranks}

    def _slot(self, name: str, base_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A weight, lora_B weight) of module `name`, zeroed, its layer's scaling set to 1, its shape checked."""
        layer = self.model.base_model.model.get_submodule(name)
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        layer.scaling[ADAPTER_NAME] = 1.0
        module = next(m.modules[name] for m in self.checked.values() if name in m.modules)
        expected, found = (module.out_features, module.in_features), (b.shape[0], a.shape[1])
        if found != expected:
            raise self._shape_error(f"module {name} (out, in)", expected, found, base_name)
        with torch.no_grad():
            a.zero_()
            b.zero_()
        return a, b

    def install(self, method: str, lam: float) -> None:
        """Copy B' and A' of the merge at (method, λ) into every layer, zero-padded to the layer's rank."""
        merged: dict[str, LoraModule] = self.sweeps[method].modules(lam)
        with torch.no_grad():
            for name, (a, b) in self.slots.items():
                module = merged.get(name)
                if module is None:  # not part of this method's result
                    b.zero_()
                    continue
                r = module.rank
                scaled = module.lora_B if module.scaling == 1.0 else module.lora_B.double() * module.scaling
                put(a[:r], module.lora_A, f"module {name} lora_A", method, lam)
                put(b[:, :r], scaled, f"module {name} lora_B", method, lam)
                b[:, r:].zero_()
