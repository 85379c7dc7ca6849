"""extsub: exact, fast Ext-Sub (Extraction-before-Subtraction, AAAI 2024) for weights, checkpoints and PEFT adapters.

The op (`ext_sub_`, in place on any float tensor, a fused Triton kernel on CUDA), the
streaming merge of checkpoints and adapters (`merge`, also the `extsub-merge` command), the
adapter types (LoRA, (IA)³, prefix-tuning) and formats they use, and the λ scan (`scan`, also
the `extsub-scan` command).

Names are imported on first use: importing the package does not load torch. Run as one of the
commands, the package's first instruction notes SIGINT and SIGTERM (`_signals`), so a Ctrl-C at
any moment of start-up ends as cleanly as later.
"""

import sys
from typing import TYPE_CHECKING

from extsub_kernels import _signals

_signals.install_for_commands(sys.argv[0] if sys.argv else "")

from extsub_kernels._lazy import lazy_getattr  # noqa: E402
from extsub_kernels._version import __version__  # noqa: E402

if TYPE_CHECKING:
    from extsub_kernels.adapters import (
        AdapterOptions,
        AdapterReport,
        IA3Adapter,
        LoraAdapter,
        LoraModule,
        LoraScaling,
        MergedAdapter,
        PeftAdapter,
        PrefixAdapter,
        iter_delta,
        iter_dense_lora,
        load_adapter,
        merge_adapters,
        to_delta,
        to_dense_lora,
        to_peft,
        write_adapter,
        write_tensors,
    )
    from extsub_kernels.engine import MergeReport
    from extsub_kernels.errors import AdapterError, InputError, MergeError, ScanInterrupted
    from extsub_kernels.lambda_scan import Recommendation, ScanResult, ScanRow, scan
    from extsub_kernels.merge import merge, merge_adapter_files
    from extsub_kernels.ops import (
        ext_sub,
        ext_sub_,
        ext_sub_coefficients,
        extract_deficiency,
        row_products,
        subtract_,
    )
    from extsub_kernels.reference import ext_sub_reference

_LOCATIONS = {
    "AdapterOptions": "extsub_kernels.adapters",
    "AdapterReport": "extsub_kernels.adapters",
    "IA3Adapter": "extsub_kernels.adapters",
    "LoraAdapter": "extsub_kernels.adapters",
    "LoraModule": "extsub_kernels.adapters",
    "LoraScaling": "extsub_kernels.adapters",
    "MergedAdapter": "extsub_kernels.adapters",
    "PeftAdapter": "extsub_kernels.adapters",
    "PrefixAdapter": "extsub_kernels.adapters",
    "iter_delta": "extsub_kernels.adapters",
    "iter_dense_lora": "extsub_kernels.adapters",
    "load_adapter": "extsub_kernels.adapters",
    "merge_adapters": "extsub_kernels.adapters",
    "to_delta": "extsub_kernels.adapters",
    "to_dense_lora": "extsub_kernels.adapters",
    "to_peft": "extsub_kernels.adapters",
    "write_adapter": "extsub_kernels.adapters",
    "write_tensors": "extsub_kernels.adapters",
    "MergeReport": "extsub_kernels.engine",
    "AdapterError": "extsub_kernels.errors",
    "InputError": "extsub_kernels.errors",
    "MergeError": "extsub_kernels.errors",
    "ScanInterrupted": "extsub_kernels.errors",
    "Recommendation": "extsub_kernels.lambda_scan",
    "ScanResult": "extsub_kernels.lambda_scan",
    "ScanRow": "extsub_kernels.lambda_scan",
    "scan": "extsub_kernels.lambda_scan",
    "merge": "extsub_kernels.merge",
    "merge_adapter_files": "extsub_kernels.merge",
    "ext_sub": "extsub_kernels.ops",
    "ext_sub_": "extsub_kernels.ops",
    "ext_sub_coefficients": "extsub_kernels.ops",
    "row_products": "extsub_kernels.ops",
    "extract_deficiency": "extsub_kernels.ops",
    "subtract_": "extsub_kernels.ops",
    "ext_sub_reference": "extsub_kernels.reference",
}


__getattr__ = lazy_getattr(__name__, _LOCATIONS, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AdapterError",
    "AdapterOptions",
    "AdapterReport",
    "IA3Adapter",
    "InputError",
    "LoraAdapter",
    "LoraModule",
    "LoraScaling",
    "MergeError",
    "MergeReport",
    "MergedAdapter",
    "PeftAdapter",
    "PrefixAdapter",
    "Recommendation",
    "ScanInterrupted",
    "ScanResult",
    "ScanRow",
    "__version__",
    "ext_sub",
    "ext_sub_",
    "ext_sub_coefficients",
    "ext_sub_reference",
    "extract_deficiency",
    "iter_delta",
    "iter_dense_lora",
    "load_adapter",
    "merge",
    "merge_adapter_files",
    "merge_adapters",
    "row_products",
    "scan",
    "subtract_",
    "to_delta",
    "to_dense_lora",
    "to_peft",
    "write_adapter",
    "write_tensors",
]
