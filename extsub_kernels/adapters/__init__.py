"""The PEM family: PEFT adapters (LoRA, (IA)³, prefix-tuning) read, merged exactly in their own space, written."""

from extsub_kernels.adapters.factors import LoraModule
from extsub_kernels.adapters.family import PeftAdapter, merge_adapters
from extsub_kernels.adapters.formats import (
    iter_delta,
    iter_dense_lora,
    to_delta,
    to_dense_lora,
    to_peft,
    write_adapter,
    write_tensors,
)
from extsub_kernels.adapters.ia3 import IA3Adapter
from extsub_kernels.adapters.lora import LoraAdapter, LoraScaling, LoraSweep, MergedAdapter
from extsub_kernels.adapters.peft import MEMBERS, load_adapter, owns_adapter_key
from extsub_kernels.adapters.prefix import PrefixAdapter
from extsub_kernels.adapters.report import AdapterReport, AdapterSection
from extsub_kernels.adapters.run import AdapterOptions, run_adapters

__all__ = [
    "MEMBERS",
    "AdapterOptions",
    "AdapterReport",
    "AdapterSection",
    "IA3Adapter",
    "LoraAdapter",
    "LoraModule",
    "LoraScaling",
    "LoraSweep",
    "MergedAdapter",
    "PeftAdapter",
    "PrefixAdapter",
    "iter_delta",
    "iter_dense_lora",
    "load_adapter",
    "merge_adapters",
    "owns_adapter_key",
    "run_adapters",
    "to_delta",
    "to_dense_lora",
    "to_peft",
    "write_adapter",
    "write_tensors",
]
