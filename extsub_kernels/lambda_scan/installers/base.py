"""What every installer is: the merge at one (method, λ) put into a loaded model, in place (DESIGN §8).

An installer is made from the inputs alone, so everything that can be wrong with them shows
before the base model loads (adapters are loaded and merged once per method; full models are
planned from their headers). `attach` then wraps the loaded model as the inputs need (PEFT
layers for an adapter type, nothing for full models) and checks that they fit it; for each
point `install` overwrites exactly the parameters the merge changes. Each PEM type plugs in
here by calling its own family merge.
"""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Installer(ABC):
    """Puts the merge of the expert and anti-experts at (method, λ) into a loaded model, in place.

    Attributes:
        kind: what is merged, in words ("LoRA adapters", "full models").
        model: the model to evaluate, once attached: the loaded base, wrapped as the inputs need.
    """

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
