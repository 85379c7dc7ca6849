"""extsub: exact, fast Ext-Sub (Extraction-before-Subtraction, AAAI 2024) for weights, checkpoints and LoRA adapters."""

from extsub_kernels.ops import ext_sub, ext_sub_, extract_deficiency, subtract_
from extsub_kernels.reference import ext_sub_reference

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ext_sub",
    "ext_sub_",
    "ext_sub_reference",
    "extract_deficiency",
    "subtract_",
]
