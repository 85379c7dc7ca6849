"""Checkpoint I/O: resolve inputs · read one tensor at a time · header-first, atomic writer."""

from extsub_kernels.io.reader import CheckpointReader, Header, TensorInfo, read_header
from extsub_kernels.io.resolve import ResolvedInput, resolve_input
from extsub_kernels.io.writer import (
    CheckpointWriter,
    SafetensorsFileWriter,
    TensorEntry,
    all_or_nothing,
    build_header,
    check_free_space,
    parse_size,
)

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "Header",
    "ResolvedInput",
    "SafetensorsFileWriter",
    "TensorEntry",
    "TensorInfo",
    "all_or_nothing",
    "build_header",
    "check_free_space",
    "parse_size",
    "read_header",
    "resolve_input",
]
