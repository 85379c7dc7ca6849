"""What every installer is: the merge at one (method, λ) put into a loaded model, in place (DESIGN §8).

A scan loads the base model once; an installer wraps it as its inputs need (PEFT layers for an
adapter type, nothing for full models) and, for each point, overwrites exactly the parameters
the merge changes. Each PEM type plugs in here by calling its own family merge.
"""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Installer(ABC):
    """Puts the merge of the expert and anti-experts at (method, λ) into `model`, in place.

    Attributes:
        kind: what is merged, in words ("LoRA adapters", "full models").
        model: the model to evaluate: the loaded base, wrapped as the inputs need.
    """

    kind: ClassVar[str]
    model: torch.nn.Module

    @abstractmethod
    def install(self, method: str, lam: float) -> None:
        """Overwrite the model's merged parameters with the merge at (method, λ); λ = 0 gives the expert."""

    def close(self) -> None:  # noqa: B027 (optional: most installers hold nothing open)
        """Release what the installer holds open (files); the model stays usable."""
