"""extsub: exact, fast Ext-Sub (Extraction-before-Subtraction, AAAI 2024) for weights, checkpoints and LoRA adapters."""

__version__ = "0.1.0"

from extsub_kernels.merge import MergeReport, merge  # noqa: E402
from extsub_kernels.ops import ext_sub, ext_sub_, extract_deficiency, subtract_  # noqa: E402
from extsub_kernels.reference import ext_sub_reference  # noqa: E402

__all__ = [
    "MergeReport",
    "__version__",
    "ext_sub",
    "ext_sub_",
    "ext_sub_reference",
    "extract_deficiency",
    "merge",
    "subtract_",
]
