"""Checkpoint I/O: resolve inputs · read one tensor at a time · header-first, atomic writer · output path rules."""

from extsub_kernels.io.outputs import check_outputs, is_folder_output, output_paths
from extsub_kernels.io.reader import CheckpointReader, TensorInfo, read_header
from extsub_kernels.io.resolve import ResolvedInput, hub_repo_id, read_json_object, resolve_input
from extsub_kernels.io.writer import CheckpointWriter, TensorEntry, build_header, check_space

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "ResolvedInput",
    "TensorEntry",
    "TensorInfo",
    "build_header",
    "check_outputs",
    "check_space",
    "hub_repo_id",
    "is_folder_output",
    "output_paths",
    "read_header",
    "read_json_object",
    "resolve_input",
]
