"""The PEM family: PEFT adapters read, merged exactly in their own parameter space, and written in several formats."""

from extsub_kernels.adapters.formats import (
    iter_delta,
    iter_dense_lora,
    to_delta,
    to_dense_lora,
    to_peft,
    write_adapter,
    write_tensors,
)
from extsub_kernels.adapters.lora import LoraAdapter, LoraModule, MergedAdapter, merge_adapters
from extsub_kernels.adapters.peft import LoraScaling, load_adapter
from extsub_kernels.adapters.report import AdapterReport, AdapterSection
from extsub_kernels.adapters.run import AdapterOptions, run_adapters

__all__ = [
    "AdapterOptions",
    "AdapterReport",
    "AdapterSection",
    "LoraAdapter",
    "LoraModule",
    "LoraScaling",
    "MergedAdapter",
    "iter_delta",
    "iter_dense_lora",
    "load_adapter",
    "merge_adapters",
    "run_adapters",
    "to_delta",
    "to_dense_lora",
    "to_peft",
    "write_adapter",
    "write_tensors",
]
