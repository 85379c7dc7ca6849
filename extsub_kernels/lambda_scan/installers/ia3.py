"""(IA)³ adapters in a scan: PEFT (IA)³ layers on the loaded base whose `ia3_l` each point overwrites with the
family merge's l' (one vector for every module of any input)."""

from collections.abc import Sequence

import torch

from extsub_kernels.adapters import IA3Adapter
from extsub_kernels.lambda_scan.installers.base import ADAPTER_NAME, AdapterInstaller, put


class IA3Installer(AdapterInstaller):
    """`IA3Adapter`s installed into PEFT (IA)³ layers."""

    kind = "(IA)³ adapters"

    def __init__(self, adapters: Sequence[IA3Adapter], methods: Sequence[str]):
        super().__init__(adapters, methods)
        self.shapes: dict[str, torch.Size] = {}
        self.feedforward: set[str] = set()
        for merged in self.checked.values():
            self.shapes |= {name: vector.shape for name, vector in merged.vectors.items()}
            self.feedforward |= merged.feedforward

    def attach(self, model: torch.nn.Module, base_name: str) -> None:
        """Wrap `model` in PEFT (IA)³ layers for every vector's module, by full name (as the `ia3` format writes)."""
        import peft

        config = peft.IA3Config(
            task_type="CAUSAL_LM",
            target_modules=sorted(self.shapes),
            feedforward_modules=sorted(self.feedforward),
            fan_in_fan_out=self.expert.fan_in_fan_out,
        )
        self.model = self.wrap(model, config, base_name, list(self.shapes))
        self.slots: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            vector = self.model.base_model.model.get_submodule(name).ia3_l[ADAPTER_NAME]
            if vector.shape != shape:
                raise self._shape_error(f"vector {name}", shape, vector.shape, base_name)
            self.slots[name] = vector

    def install(self, method: str, lam: float) -> None:
        """Copy every merged vector l' into its layer."""
        merged = self.merge(method, lam)
        with torch.no_grad():
            for name, slot in self.slots.items():
                put(slot, merged.vectors[name], f"vector {name}", method, lam)
