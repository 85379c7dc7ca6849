"""extsub: exact, fast Ext-Sub (Extraction-before-Subtraction, AAAI 2024) for weights, checkpoints and LoRA adapters."""

__version__ = "0.1.0"

from extsub_kernels.adapter import AdapterError, load_adapter, write_adapter  # noqa: E402
from extsub_kernels.lora import LoraAdapter, LoraMergeReport, LoraModule, MergedAdapter, merge_adapters  # noqa: E402
from extsub_kernels.lora_files import merge_adapter_files  # noqa: E402
from extsub_kernels.materialize import iter_delta, iter_dense_lora, to_delta, to_dense_lora, to_peft  # noqa: E402
from extsub_kernels.merge import MergeReport, merge  # noqa: E402
from extsub_kernels.ops import ext_sub, ext_sub_, extract_deficiency, subtract_  # noqa: E402
from extsub_kernels.reference import ext_sub_reference  # noqa: E402

__all__ = [
    "AdapterError",
    "LoraAdapter",
    "LoraMergeReport",
    "LoraModule",
    "MergeReport",
    "MergedAdapter",
    "__version__",
    "ext_sub",
    "ext_sub_",
    "ext_sub_reference",
    "extract_deficiency",
    "iter_delta",
    "iter_dense_lora",
    "load_adapter",
    "merge",
    "merge_adapter_files",
    "merge_adapters",
    "subtract_",
    "to_delta",
    "to_dense_lora",
    "to_peft",
    "write_adapter",
]
