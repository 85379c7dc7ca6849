"""The outputs of a run and the one loop that writes them: every path (dense, adapters, full model) goes through here.

An `OutputSet` is the run's outputs, one per λ setting, each a header-first `CheckpointWriter`
under a temporary name: tensors stream in (whole, or a block of rows at a time) through
`stream`, which overlaps reading, computing and writing (`pipeline`) behind one progress bar,
and `commit` publishes them. Any error, Ctrl-C included, removes everything the run wrote.

A `LazyOutput` describes an output before it is computed (names, dtypes and shapes up front,
as the header-first writer needs) with how to make each tensor; `write_outputs` streams such
outputs one tensor at a time, so memory holds a few tensors whatever the output's size.
"""

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from extsub_kernels._version import __version__
from extsub_kernels.engine.options import RunOptions
from extsub_kernels.engine.pipeline import run_pipeline
from extsub_kernels.errors import MergeError
from extsub_kernels.io import CheckpointWriter, ResolvedInput, TensorEntry, check_free_space


@dataclass
class Piece:
    """What the compute stage hands the writer: one tensor (or a block of its rows) for every output, on the host.

    Attributes:
        name: the output tensor the bytes belong to.
        tensors: one per output, in the outputs' order.
        progress: bytes to advance the progress bar by.
        ready: called before writing (waits for a device → host copy); None when the data is there.
        release: called after writing (hands buffers back to a pool).
    """

    name: str
    tensors: Sequence[torch.Tensor]
    progress: int
    ready: Callable[[], None] | None = None
    release: Callable[[], None] | None = None


class OutputSet:
    """The outputs of one run, one per λ setting: created under temporary names, streamed into, committed together.

    Creating the set creates every temporary output and checks the free space, so an unusable
    OUT fails before any work. Leaving a `with` block on an error removes them all.

    Args:
        paths: one target per output (a .safetensors file, or a folder).
        entries: the tensors of every output, in the order to assign them to shards.
        metadata: `__metadata__` per output.
        max_shard_size: folder outputs: the largest shard in bytes (None: one weights file).
        weights_name: the weights file of a folder output.
        extra_files: files copied into folder outputs (config, tokenizer).
        force: replace existing targets.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        entries: Sequence[TensorEntry],
        metadata: Sequence[Mapping[str, str]],
        *,
        max_shard_size: int | None = None,
        weights_name: str = "model.safetensors",
        extra_files: Sequence[Path] = (),
        force: bool = False,
    ):
        self.writers: list[CheckpointWriter] = []
        try:
            for path, meta in zip(paths, metadata, strict=True):
                writer = CheckpointWriter(
                    path,
                    entries,
                    dict(meta),
                    max_shard_size=max_shard_size,
                    weights_name=weights_name,
                    extra_files=extra_files,
                    force=force,
                )
                self.writers.append(writer)
            check_free_space(self.writers)
        except BaseException:
            self.abort()
            raise
        self.order: list[TensorEntry] = self.writers[0].order

    def stream(
        self,
        items: Iterable[Any],
        read: Callable[[Any], Any],
        compute: Callable[[Any, Any], Piece],
        *,
        total: int,
        progress: bool,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        """For each item: read it (a thread), compute its `Piece` (this thread), write it to every output (a thread).

        Items must come in the outputs' tensor order. `total` is the progress bar's bytes.
        `on_stop` runs when the stages stop (see `pipeline.run_pipeline`).
        """
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="extsub-merge",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

        def write(item: Any, piece: Piece) -> None:
            if piece.ready is not None:
                piece.ready()
            for writer, tensor in zip(self.writers, piece.tensors, strict=True):
                writer.write(piece.name, tensor)
            if piece.release is not None:
                piece.release()
            bar.update(piece.progress)

        with bar:
            run_pipeline(items, read, compute, write, on_stop=on_stop)

    def add_texts(self, texts: Sequence[Mapping[str, str]]) -> None:
        """Small generated files (an adapter_config.json, a model card) per output, by file name."""
        for writer, files in zip(self.writers, texts, strict=True):
            for name, text in files.items():
                writer.add_text(name, text)

    def commit(self) -> tuple[Path, ...]:
        """Finish and publish every output; returns their paths."""
        return tuple(w.commit() for w in self.writers)

    def abort(self) -> None:
        """Remove everything written so far (outputs already committed stay)."""
        for w in self.writers:
            w.abort()

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.writers)

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # a no-op for committed outputs


def output_metadata(
    setting: Sequence[float],
    method: str,
    expert: str,
    antis: Sequence[str],
    base: str | None = None,
    output_format: str | None = None,
) -> dict[str, str]:
    """`__metadata__` of an output: format=pt, method, λ, the inputs' names, the tool's version (and an adapter format).

    Example:
        >>> output_metadata((0.5,), "ext-sub", "expert.safetensors", ["anti.safetensors"])["extsub.lam"]
        '[0.5]'
    """
    meta = {
        "format": "pt",
        "extsub.method": method,
        "extsub.lam": json.dumps(list(setting)),
        "extsub.expert": expert,
        "extsub.anti": json.dumps(list(antis)),
        "extsub.version": __version__,
    }
    if base is not None:
        meta["extsub.base"] = base
    if output_format is not None:
        meta["extsub.format"] = output_format
    return meta


def run_metadata(
    inputs: Sequence[tuple[str, ResolvedInput]], options: RunOptions, output_format: str | None = None
) -> list[dict[str, str]]:
    """`__metadata__` of each output of a run (one per λ setting), naming the inputs by their display names."""
    names = {role: inp.name for role, inp in inputs}
    antis = [name for role, name in names.items() if role.startswith("ANTI")]
    return [
        output_metadata(setting, options.method, names["EXPERT"], antis, names.get("BASE"), output_format)
        for setting in options.settings
    ]


def _nothing(name: str) -> None:
    return None


@dataclass
class LazyOutput:
    """One output described before it is computed: its tensors in order, how to make each, the files beside them.

    Attributes:
        entries: name, dtype and shape of every tensor, in the order to assign them to shards.
        produce: (name, what `load` returned) → the CPU tensor of that entry's dtype and shape.
        load: name → the input data `produce` needs (read in the I/O thread; None by default).
        texts: generated files written beside the weights of a folder output (file name → text).
        weights_name: the weights file of a folder output (model.safetensors, adapter_model.safetensors).
        extra_files: files copied into a folder output (a base model's config and tokenizer).
    """

    entries: list[TensorEntry]
    produce: Callable[[str, Any], torch.Tensor]
    load: Callable[[str], Any] = _nothing
    texts: Mapping[str, str] = field(default_factory=dict)
    weights_name: str = "model.safetensors"
    extra_files: Sequence[Path] = field(default=())

    @classmethod
    def lazy(cls, makers: Sequence[tuple[TensorEntry, Callable[[], torch.Tensor]]], **fields: Any) -> "LazyOutput":
        """An output whose tensors are made on demand by the zero-argument `makers`, one per entry."""
        by_name = {entry.name: make for entry, make in makers}
        return cls([entry for entry, _ in makers], lambda name, _loaded: by_name[name](), **fields)

    @classmethod
    def of_tensors(cls, tensors: Mapping[str, torch.Tensor], **fields: Any) -> "LazyOutput":
        """An output of tensors already in memory (a state dict).

        Example:
            >>> LazyOutput.of_tensors({"w": torch.zeros(2, 3)}).entries[0].shape
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


def write_outputs(
    outputs: Sequence[LazyOutput],
    paths: Sequence[Path],
    metadata: Sequence[Mapping[str, str]],
    *,
    max_shard_size: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> tuple[tuple[Path, ...], int]:
    """Write each lazy output to its path, all of them in one pass over their tensors.

    The outputs of one run (one per λ setting) list the same tensors and share their inputs:
    each tensor is loaded once (by the first output) and produced by every output, so the
    inputs are read once whatever the number of outputs.

    Args:
        outputs: the lazy outputs, with equal entries, weights names and extra files.
        paths: one target per output: a .safetensors file, or a folder.
        metadata: `__metadata__` per output (format=pt is added).
        max_shard_size: folder outputs: the largest shard in bytes (None: one weights file).
        force: replace existing targets.
        progress: a progress bar over the bytes written (stderr).

    Returns:
        (the paths written, bytes written with headers).

    Example:
        >>> one = LazyOutput.of_tensors({"w": torch.ones(2)})  # doctest: +SKIP
        >>> write_outputs([one], [Path("w.safetensors")], [{}])  # doctest: +SKIP
    """
    first = outputs[0]
    if any(o.entries != first.entries for o in outputs[1:]):
        raise MergeError("the outputs of one run list different tensors; they cannot be written in one pass")
    with OutputSet(
        paths,
        first.entries,
        [{"format": "pt", **meta} for meta in metadata],
        max_shard_size=max_shard_size,
        weights_name=first.weights_name,
        extra_files=first.extra_files,
        force=force,
    ) as out:

        def compute(entry: TensorEntry, loaded: Any) -> Piece:
            tensors = [_checked(entry, o.produce(entry.name, loaded)) for o in outputs]
            return Piece(entry.name, tensors, entry.nbytes * len(outputs))

        total = sum(e.nbytes for e in out.order) * len(outputs)
        out.stream(out.order, lambda entry: first.load(entry.name), compute, total=total, progress=progress)
        out.add_texts([o.texts for o in outputs])
        return out.commit(), out.bytes_written


def _checked(entry: TensorEntry, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if it is what the header promised for `entry`; the writer only counts bytes."""
    if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise MergeError(
            f"tensor {entry.name!r} came out {tensor.dtype} {tuple(tensor.shape)} but the output header says "
            f"{entry.dtype} {entry.shape}"
        )
    return tensor
