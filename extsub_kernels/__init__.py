"""extsub: exact, fast Ext-Sub (Extraction-before-Subtraction, AAAI 2024) for weights, checkpoints and LoRA adapters."""

from extsub_kernels.adapter import AdapterError, load_adapter, write_adapter
from extsub_kernels.lora import LoraAdapter, LoraModule, MergedAdapter, MergeReport, merge_adapters
from extsub_kernels.lora_files import merge_adapter_files
from extsub_kernels.materialize import iter_delta, iter_dense_lora, to_delta, to_dense_lora, to_peft
from extsub_kernels.ops import ext_sub, ext_sub_, extract_deficiency, subtract_
from extsub_kernels.reference import ext_sub_reference

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AdapterError",
    "LoraAdapter",
    "LoraModule",
    "MergeReport",
    "MergedAdapter",
    "ext_sub",
    "ext_sub_",
    "ext_sub_reference",
    "extract_deficiency",
    "iter_delta",
    "iter_dense_lora",
    "load_adapter",
    "merge_adapter_files",
    "merge_adapters",
    "subtract_",
    "to_delta",
    "to_dense_lora",
    "to_peft",
    "write_adapter",
]
