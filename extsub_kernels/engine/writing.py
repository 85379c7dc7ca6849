"""The outputs of a run and the one loop that writes them, for every path: an `OutputSet` (one `CheckpointWriter`
per λ setting) streams, commits together, and on any error removes all; `write_outputs` streams `LazyOutput`s."""

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from extsub_kernels._tensors import nonfinite_summary
from extsub_kernels.constants import MODEL_WEIGHTS
from extsub_kernels.engine.pipeline import run_pipeline
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import CheckpointWriter, TensorEntry, check_space, is_folder_output
from extsub_kernels.io.atomic import publish_all
from extsub_kernels.io.writer import plan_layout


@dataclass
class Piece:
    """One tensor (or block of rows) per output, on the host: `progress` bytes, `ready` called before writing,
    `release` after; `last`: each of `tensors` holds the run `name`…`last`."""

    name: str
    tensors: Sequence[torch.Tensor]
    progress: int
    ready: Callable[[], None] | None = None
    release: Callable[[], None] | None = None
    last: str | None = None


class OutputSet:
    """The outputs of one run, one per λ setting, created at once (a bad OUT or too little space fails before any
    work), removed on an error, published together once `check_inputs` passes; arguments as `CheckpointWriter`'s."""

    def __init__(
        self,
        paths: Sequence[Path],
        entries: Sequence[TensorEntry],
        metadata: Sequence[Mapping[str, str]],
        *,
        max_shard_size: int | None = None,
        weights_name: str = MODEL_WEIGHTS,
        extra_files: Sequence[Path] = (),
        force: bool = False,
        check_inputs: Callable[[], None] | None = None,
    ):
        self.writers: list[CheckpointWriter] = []
        self.force = force
        self._check_inputs = check_inputs
        try:
            folder = is_folder_output(paths[0])
            layout = plan_layout(entries, folder=folder, max_shard_size=max_shard_size, weights_name=weights_name)
            for path, meta in zip(paths, metadata, strict=True):
                files = dict(weights_name=weights_name, extra_files=extra_files, force=force, layout=layout)
                self.writers.append(CheckpointWriter(path, metadata=dict(meta), max_shard_size=max_shard_size, **files))
            check_space((w.target.parent, w.total_bytes) for w in self.writers)
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
        """Read (a thread), compute a `Piece` (here), write to every output (a thread), each item in tensor order."""
        with progress_bar(total, progress) as bar:
            run_pipeline(items, read, compute, write_stage(bar, self.writers), on_stop=on_stop)

    def add_texts(self, texts: Sequence[Mapping[str, str]]) -> None:
        """Small generated files per output, by name, between `stream` and `commit`."""
        for writer, files in zip(self.writers, texts, strict=True):
            for name, text in files.items():
                writer.add_text(name, text)

    def commit(self) -> tuple[Path, ...]:
        """Finish every output, check the inputs, publish all together (`io.atomic.publish_all`); their paths."""
        temps = [w.finish() for w in self.writers]
        if self._check_inputs is not None:
            self._check_inputs()
        try:
            published = publish_all([(t, w.target) for t, w in zip(temps, self.writers, strict=True)], force=self.force)
        except KeyboardInterrupt as interrupt:
            if getattr(interrupt, "published", ()):  # a signal held back until every output was in place
                for w in self.writers:
                    w.published()
            raise
        for w in self.writers:
            w.published()
        return published

    def abort(self) -> None:
        for w in reversed(self.writers):
            w.abort()

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.writers)

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        self.abort()  # a no-op for committed outputs
        if isinstance(error, InputError) and error.args and isinstance(error.args[0], str):
            # Bad input found while streaming (NaN/Inf, an overflow): the temporaries are gone, so say so.
            error.args = (f"{error.args[0]}; nothing was written", *error.args[1:])


def progress_bar(total: int, progress: bool, desc: str = "extsub-merge", *, unit: str = "B") -> tqdm:
    """The progress bar of every long loop: on stderr, hidden unless `progress`; bytes (SI prefixes), or `unit`s."""
    shown = dict(desc=desc, disable=not progress, file=_Unfailing(sys.stderr), dynamic_ncols=True, mininterval=0.5)
    return tqdm(total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1000, **shown)


class _Unfailing:
    """A progress bar's stream: a failed write (a full or closed stderr) is dropped, never the run's failure."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def write_stage(bar: tqdm, writers: Sequence[CheckpointWriter] = ()) -> Callable[[Any, Piece], None]:
    """The write stage: wait for the piece, write it to `writers` (none: statistics only), free, move the bar."""

    def write(item: Any, piece: Piece) -> None:
        if piece.ready is not None:
            piece.ready()
        for writer, tensor in zip(writers, piece.tensors if writers else (), strict=True):
            writer.write(piece.name, tensor, last=piece.last)
        if piece.release is not None:
            piece.release()
        bar.update(piece.progress)

    return write


@dataclass
class LazyOutput:
    """One output before it is computed: entries, `produce(name, load(name))` (load in the I/O thread) making each
    CPU tensor, and a folder output's generated `texts` and copied `extra_files`."""

    entries: list[TensorEntry]
    produce: Callable[[str, Any], torch.Tensor]
    load: Callable[[str], Any] = lambda name: None
    texts: Mapping[str, str] = field(default_factory=dict)
    weights_name: str = MODEL_WEIGHTS
    extra_files: Sequence[Path] = field(default=())

    @classmethod
    def lazy(cls, makers: Sequence[tuple[TensorEntry, Callable[[], torch.Tensor]]], **fields: Any) -> "LazyOutput":
        """An output whose tensors are made on demand by the zero-argument `makers`, one per entry."""
        by_name = {entry.name: make for entry, make in makers}
        return cls([entry for entry, _ in makers], lambda name, _loaded: by_name[name](), **fields)

    @classmethod
    def of_tensors(cls, tensors: Mapping[str, torch.Tensor], **fields: Any) -> "LazyOutput":
        """An output of tensors already in memory (a state dict)."""
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        entries = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        return cls(entries, lambda name, _loaded: tensors[name].detach().cpu(), **fields)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in entry order, one at a time."""
        for entry in self.entries:
            yield entry.name, self.produce(entry.name, self.load(entry.name))


def write_outputs(
    outputs: Sequence[LazyOutput],
    paths: Sequence[Path],
    metadata: Sequence[Mapping[str, str]],
    *,
    max_shard_size: int | None = None,
    force: bool = False,
    progress: bool = False,
    check_inputs: Callable[[], None] | None = None,
) -> tuple[tuple[Path, ...], int]:
    """Write lazy outputs (one per λ setting, equal entries) in one pass, each tensor loaded once; returns (paths,
    bytes written). Other arguments as `OutputSet`'s; format=pt is added to each `metadata`."""
    first = outputs[0]
    if any(o.entries != first.entries for o in outputs[1:]):
        raise MergeError("the outputs of one run list different tensors; they cannot be written in one pass")
    files = dict(weights_name=first.weights_name, extra_files=first.extra_files, force=force, check_inputs=check_inputs)
    metadata = [{"format": "pt", **meta} for meta in metadata]
    with OutputSet(paths, first.entries, metadata, max_shard_size=max_shard_size, **files) as out:

        def load(run: list[TensorEntry]) -> list[Any]:
            return [first.load(entry.name) for entry in run]

        def compute(run: list[TensorEntry], loaded: list[Any]) -> Piece:
            pairs = list(zip(run, loaded, strict=True))
            made = [[_checked(e, o.produce(e.name, data)) for e, data in pairs] for o in outputs]
            progress = sum(e.nbytes for e in run) * len(outputs)
            if len(run) == 1:
                return Piece(run[0].name, [tensors[0] for tensors in made], progress)
            return Piece(run[0].name, [_joined(tensors) for tensors in made], progress, last=run[-1].name)

        total = sum(e.nbytes for e in out.order) * len(outputs)
        out.stream(_runs(out.order), load, compute, total=total, progress=progress)
        out.add_texts([o.texts for o in outputs])
        return out.commit(), out.bytes_written


# Consecutive tensors under this size are made and written as one item (a run), not one each.
_SMALL_TENSOR_BYTES = 1 << 16
_RUN_BYTES = 32 << 20


def _runs(order: Sequence[TensorEntry]) -> Iterator[list[TensorEntry]]:
    """`order` as items to stream: each large tensor alone, consecutive small ones together (up to 32 MB)."""
    run: list[TensorEntry] = []
    size = 0
    for entry in order:
        if entry.nbytes >= _SMALL_TENSOR_BYTES or size + entry.nbytes > _RUN_BYTES:
            if run:
                yield run
            run, size = [], 0
            if entry.nbytes >= _SMALL_TENSOR_BYTES:
                yield [entry]
                continue
        run.append(entry)
        size += entry.nbytes
    if run:
        yield run


def _joined(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bytes of CPU tensors, back to back, as one uint8 tensor (a run's data for the writer)."""
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
    return torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)


def _checked(entry: TensorEntry, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if it is what the header promised for `entry` and finite; the writer only counts bytes."""
    if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise MergeError(
            f"tensor {entry.name!r} came out {tensor.dtype} {tuple(tensor.shape)} but the output header says "
            f"{entry.dtype} {entry.shape}"
        )
    problem = nonfinite_summary(tensor)
    if problem is not None:
        raise InputError(
            f"tensor {entry.name!r} came out with {problem.replace('NaN or Inf', 'NaN or ±inf', 1)} although the "
            f"inputs are finite: the merge overflows {str(tensor.dtype).removeprefix('torch.')}; use a smaller λ "
            "or a wider dtype=",
            options=("dtype",),
        )
    return tensor
