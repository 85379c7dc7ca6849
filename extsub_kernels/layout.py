"""An output described before it is computed, and the one loop that writes such outputs, of any size.

A `Layout` lists an output's tensors (names, dtypes, shapes: the header-first writer needs
them up front) and says how to make each one: `load` does a tensor's I/O (in the reader
thread), `produce` its compute (in the calling thread). `write_layouts` streams one tensor at
a time through `CheckpointWriter`s, overlapping load, compute and write (`pipeline`), so
memory holds a few tensors whatever the output's size, and every output appears whole or not
at all. The LoRA formats (`materialize`), the full model with a base (`full_model`) and a
state dict already in memory are all layouts.
"""

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from extsub_kernels.errors import MergeError
from extsub_kernels.io import CheckpointWriter, TensorEntry, all_or_nothing, check_free_space
from extsub_kernels.io.resolve import ADAPTER_CONFIG
from extsub_kernels.pipeline import run_pipeline


def _nothing(name: str) -> None:
    return None


@dataclass
class Layout:
    """One output: its tensors in order, how to make each, and the files that go beside them.

    Attributes:
        entries: name, dtype and shape of every tensor, in the order to assign them to shards.
        produce: (name, what `load` returned) → the CPU tensor of that entry's dtype and shape.
        load: name → the input data `produce` needs (read in the I/O thread; None by default).
        adapter_config: written as adapter_config.json beside the weights (adapter outputs).
        weights_name: the weights file of a folder output (model.safetensors, adapter_model.safetensors).
        extra_files: files copied into a folder output (a base model's config and tokenizer).
    """

    entries: list[TensorEntry]
    produce: Callable[[str, Any], torch.Tensor]
    load: Callable[[str], Any] = _nothing
    adapter_config: Mapping | None = None
    weights_name: str = "model.safetensors"
    extra_files: Sequence[Path] = field(default=())

    @classmethod
    def lazy(cls, makers: Sequence[tuple[TensorEntry, Callable[[], torch.Tensor]]], **fields: Any) -> "Layout":
        """A layout whose tensors are made on demand by the zero-argument `makers`, one per entry."""
        by_name = {entry.name: make for entry, make in makers}
        return cls([entry for entry, _ in makers], lambda name, _loaded: by_name[name](), **fields)

    @classmethod
    def of_tensors(cls, tensors: Mapping[str, torch.Tensor], **fields: Any) -> "Layout":
        """A layout of tensors already in memory (a state dict).

        Example:
            >>> Layout.of_tensors({"w": torch.zeros(2, 3)}).entries[0].shape
            (2, 3)
        """
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        entries = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        return cls(entries, lambda name, _loaded: tensors[name].detach().cpu(), **fields)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, loaded and produced."""
        return self.produce(name, self.load(name))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in entry order, one at a time."""
        for entry in self.entries:
            yield entry.name, self.tensor(entry.name)


def write_layouts(
    layouts: Sequence[Layout],
    paths: Sequence[Path],
    metadata: Sequence[Mapping[str, str]],
    *,
    max_shard_size: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> tuple[tuple[Path, ...], int]:
    """Write each layout to its path, all of them in one pass over their tensors.

    The layouts of one run (one per λ setting) list the same tensors and share their inputs:
    each tensor is loaded once (by the first layout) and produced by every layout, so the
    inputs are read once whatever the number of outputs. The free space is checked before
    anything is written; on any error every output is removed.

    Args:
        layouts: the outputs' layouts, with equal entries.
        paths: one target per layout: a .safetensors file, or a folder.
        metadata: `__metadata__` per output (format=pt is added).
        max_shard_size: folder outputs: the largest shard in bytes (None: one weights file).
        force: replace existing targets.
        progress: a progress bar over the bytes written (stderr).

    Returns:
        (the paths written, bytes written with headers).

    Example:
        >>> write_layouts([Layout.of_tensors({"w": torch.ones(2)})], [Path("w.safetensors")], [{}])  # doctest: +SKIP
    """
    with all_or_nothing() as writers:
        for layout, path, meta in zip(layouts, paths, metadata, strict=True):
            writers.append(
                CheckpointWriter(path, layout.entries, {"format": "pt", **meta}, max_shard_size=max_shard_size,
                                 weights_name=layout.weights_name, extra_files=layout.extra_files, force=force)
            )  # fmt: skip
        order = writers[0].order
        if any(w.order != order for w in writers[1:]):
            raise MergeError("the outputs of one run list different tensors; they cannot be written in one pass")
        check_free_space(writers)
        bar = tqdm(total=sum(e.nbytes for e in order) * len(writers), unit="B", unit_scale=True, unit_divisor=1000,
                   desc="extsub-merge", disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)  # fmt: skip

        def compute(entry: TensorEntry, loaded: Any) -> list[torch.Tensor]:
            return [_checked(entry, layout.produce(entry.name, loaded)) for layout in layouts]

        def write(entry: TensorEntry, tensors: list[torch.Tensor]) -> None:
            for writer, tensor in zip(writers, tensors):
                writer.write(entry.name, tensor)
            bar.update(entry.nbytes * len(writers))

        with bar:
            run_pipeline(order, lambda entry: layouts[0].load(entry.name), compute, write)
        for writer, layout in zip(writers, layouts):
            if layout.adapter_config is not None:
                writer.add_text(ADAPTER_CONFIG, json.dumps(layout.adapter_config, indent=2, sort_keys=True) + "\n")
        outputs = tuple(w.commit() for w in writers)
        return outputs, sum(w.bytes_written for w in writers)


def _checked(entry: TensorEntry, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if it is what the header promised for `entry`; the writer only counts bytes."""
    if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise MergeError(
            f"tensor {entry.name!r} came out {tensor.dtype} {tuple(tensor.shape)} but the output header says "
            f"{entry.dtype} {entry.shape}"
        )
    return tensor
