"""Format-agnostic streaming: options, methods, the dense plan and run, transfers, and the one output loop."""

from extsub_kernels.engine.dense import run_dense
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.options import RunOptions, parse_lams, parse_size, resolve_device
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.writing import LazyOutput, OutputSet, write_outputs

__all__ = ["LazyOutput", "MergeReport", "OutputSet", "RunOptions", "apply_method", "parse_lams", "parse_size"]
__all__ += ["resolve_device", "run_dense", "write_outputs"]
