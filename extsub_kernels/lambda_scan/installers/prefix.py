"""Prefix-tuning adapters in a scan: a PEFT prefix in inference mode, where the saved `prompt_embeddings` are the
prefix's key/value rows, so each point copies the merged one in."""

import torch

from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan.installers.base import ADAPTER_NAME, AdapterInstaller, put


class PrefixInstaller(AdapterInstaller):
    """`PrefixAdapter`s installed as the prefix of a PEFT model."""

    kind = "prefix-tuning adapters"

    def attach(self, model: torch.nn.Module, base_name: str) -> None:
        """Wrap `model` in a PEFT prefix of the expert's geometry (inference mode: the saved tensor is the prefix)."""
        import peft

        try:
            config = peft.get_peft_config({**self.expert.config, "inference_mode": True})
        except (TypeError, ValueError) as e:
            raise InputError(f"{self.expert.source}: PEFT cannot read its prefix-tuning config ({e})") from None
        self.model = self.wrap(model, config, base_name)
        self.slot = self.model.prompt_encoder[ADAPTER_NAME].embedding.weight
        expected = self.expert.prompt_embeddings.shape
        if self.slot.shape != expected:
            raise self._shape_error("prompt_embeddings", expected, self.slot.shape, base_name)

    def install(self, method: str, lam: float) -> None:
        """Copy the merged prompt embeddings into the prefix."""
        merged = self.merge(method, lam)
        with torch.no_grad():
            put(self.slot, merged.prompt_embeddings, "prompt_embeddings", method, lam)
