"""What a model's config.json says about how its weights are laid out: GPT-2's Conv1D stores (in, out).

Ext-Sub pairs rows of ΔW (output features). nn.Linear stores (out, in), so rows are dim 0;
Conv1D layers (GPT-2 family: c_attn, q_attn, c_proj, c_fc) store the transpose, so there the
merge pairs columns of the stored tensor.
"""

import re
from collections.abc import Callable

# Models whose linear layers are GPT-2's Conv1D, storing weights as (in, out) instead of (out, in).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_ARCHITECTURE_PREFIXES = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer")
_CONV1D_WEIGHT = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")

TransposedRule = Callable[[str, tuple[int, ...]], bool]


def never_transposed(name: str, shape: tuple[int, ...]) -> bool:
    """The rule for models without Conv1D layers: every weight is stored (out, in)."""
    return False


def transposed_weights(config: dict | None) -> TransposedRule:
    """A predicate (name, shape) → whether that weight is stored transposed (GPT-2 Conv1D), from config.json.

    Example:
        >>> transposed_weights({"model_type": "gpt2"})("h.0.attn.c_attn.weight", (64, 192))
        True
    """
    config = config if isinstance(config, dict) else {}
    architectures = config.get("architectures")
    architectures = architectures if isinstance(architectures, list) else []
    uses_conv1d = config.get("model_type") in CONV1D_MODEL_TYPES or any(
        isinstance(a, str) and a.startswith(CONV1D_ARCHITECTURE_PREFIXES) for a in architectures
    )
    if not uses_conv1d:
        return never_transposed
    return lambda name, shape: len(shape) == 2 and _CONV1D_WEIGHT.search(name) is not None
