"""extsub: exact, fast Ext-Sub (Extraction-before-Subtraction, AAAI 2024) for weights, checkpoints and PEFT adapters.

The op (`ext_sub_`), the streaming merge (`merge`, `extsub-merge`), the adapter types and the λ scan (`scan`,
`extsub-scan`). Names are imported on first use (no torch at import); run as a command, the first instruction notes
SIGINT and SIGTERM (`_signals`), so a Ctrl-C during start-up ends cleanly.
"""

import sys

from extsub_kernels import _signals

_signals.install_for_commands(sys.argv, getattr(sys, "orig_argv", ()))

from extsub_kernels._lazy import lazy_getattr  # noqa: E402
from extsub_kernels._version import __version__ as __version__  # noqa: E402

# The public names, by the module each is imported from on first use; `__all__` is this table. The LoRA-only
# layouts (to_peft, to_dense_lora, to_delta and their iterators) are `extsub_kernels.adapters`'s.
_PUBLIC = {
    "extsub_kernels.adapters": "AdapterOptions AdapterReport IA3Adapter LoraAdapter LoraModule LoraScaling "
    "MergedAdapter PeftAdapter PrefixAdapter load_adapter merge_adapters write_adapter write_tensors",
    "extsub_kernels.engine": "MergeReport",
    "extsub_kernels.errors": "AdapterError InputError MergeError ScanInterrupted",
    "extsub_kernels.lambda_scan": "Recommendation ScanResult ScanRow scan",
    "extsub_kernels.merging": "merge",
    "extsub_kernels.ops": "ext_sub ext_sub_ ext_sub_coefficients extract_deficiency row_products subtract_",
    "extsub_kernels.reference": "ext_sub_reference",
}
_LOCATIONS = {name: module for module, names in _PUBLIC.items() for name in names.split()}
__getattr__ = lazy_getattr(__name__, _LOCATIONS, globals())
__all__ = sorted([*_LOCATIONS, "__version__"])


def __dir__() -> list[str]:
    return __all__
