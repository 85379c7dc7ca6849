"""Header-first safetensors writer: the whole header is known before any tensor data is written.

A checkpoint goes to one file, or to shards plus a `model.safetensors.index.json` in the
Hugging Face layout. Tensors are appended in header order, a block of rows at a time if
the caller likes, so no more than one block is ever held for writing. Everything is written
under temporary names and appears at the target only on `commit()` (see `atomic`).
"""

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import atomic
from extsub_kernels.io.format import HEADER_LENGTH_BYTES, METADATA_KEY, dtype_code, nbytes_of, write_order_key
from extsub_kernels.io.outputs import is_folder_output

INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the output: name, dtype and shape (its bytes follow from them, computed once)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", nbytes_of(self.dtype, self.shape))


def build_header(entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header for `entries` laid out in the given order.

    The JSON is compact, `__metadata__` first, padded with spaces to a multiple of 8 bytes, as
    `safetensors` writes it (so a file in `safetensors`' tensor order is byte-identical).
    """
    return header_bytes(tensor_json(entries), metadata)


def tensor_json(entries: Sequence[TensorEntry]) -> str:
    """The tensors' part of a header: `"name":{"dtype":..,"shape":..,"data_offsets":[..]}` joined by commas.

    Built as text (one f-string per tensor), about 6× faster than `json.dumps` of the same
    dict, which matters for a header of a million tensors; the output is the same bytes.
    """
    shapes: dict[tuple[int, ...], str] = {}
    parts = []
    offset = 0
    for entry in entries:
        shape = shapes.get(entry.shape)
        if shape is None:
            shape = shapes[entry.shape] = ",".join(map(str, entry.shape))
        end = offset + entry.nbytes
        parts.append(
            f'{_json_string(entry.name)}:{{"dtype":"{dtype_code(entry.dtype)}","shape":[{shape}],'
            f'"data_offsets":[{offset},{end}]}}'
        )
        offset = end
    return ",".join(parts)


def header_bytes(tensors: str, metadata: dict[str, str] | None = None) -> bytes:
    """The length field and padded JSON of a header whose tensors' part is `tensors` (see `tensor_json`)."""
    head = ""
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        head = f'"{METADATA_KEY}":' + json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)
        head += "," if tensors else ""
    raw = ("{" + head + tensors + "}").encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(HEADER_LENGTH_BYTES, "little") + raw


_json_string = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) writes for a str


def safetensors_order(entries: Sequence[TensorEntry]) -> list[TensorEntry]:
    """`entries` in the order `safetensors` writes a file: by dtype alignment, then name."""
    ranks = {dtype: write_order_key("", dtype)[0] for dtype in {e.dtype for e in entries}}
    return sorted(entries, key=lambda e: (ranks[e.dtype], e.name))


def plan_shards(
    entries: Sequence[TensorEntry], max_shard_size: int | None, weights_name: str = "model.safetensors"
) -> list[tuple[str, list[TensorEntry]]]:
    """Split `entries` (kept in their order) into files of at most `max_shard_size` tensor bytes.

    One file is named `weights_name`; several are named as Hugging Face names them
    (`model-00001-of-00003.safetensors`). A tensor larger than the limit gets a file of its own.
    Within each file tensors are in `safetensors`' order.
    """
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if max_shard_size is not None and groups[-1] and size + entry.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    if len(groups) == 1:
        return [(weights_name, safetensors_order(groups[0]))]
    stem = weights_name.removesuffix(".safetensors")
    n = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", safetensors_order(g)) for i, g in enumerate(groups)]


def planned_files(
    target: Path,
    entries: Sequence[TensorEntry],
    metadata: dict[str, str] | None = None,
    *,
    max_shard_size: int | None = None,
    weights_name: str = "model.safetensors",
    extra_files: Sequence[Path] = (),
    texts: Sequence[str] = (),
) -> list[tuple[str, int | None]]:
    """(file name, bytes) of every file an output will hold, without creating anything (--dry-run).

    Weights files (headers included), the shard index, copied files; generated texts
    (`texts`, written after the tensors) have no size yet (None).
    """
    if not is_folder_output(target):
        return [(target.name, len(build_header(safetensors_order(entries), metadata)) + sum(e.nbytes for e in entries))]
    shards = plan_shards(entries, max_shard_size, weights_name)
    files: list[tuple[str, int | None]] = [
        (name, len(build_header(group, metadata)) + sum(e.nbytes for e in group)) for name, group in shards
    ]
    if len(shards) > 1:
        files.append((f"{weights_name}{INDEX_SUFFIX}", len(json.dumps(build_index(shards), indent=2)) + 1))
    files += [(src.name, src.stat().st_size) for src in extra_files]
    files += [(name, None) for name in texts]
    return files


def build_index(shards: Sequence[tuple[str, Sequence[TensorEntry]]], metadata: dict[str, str] | None = None) -> dict:
    """The `*.safetensors.index.json` content: `metadata.total_size` and a sorted `weight_map`."""
    weight_map = {e.name: file for file, group in shards for e in group}
    total = sum(e.nbytes for _, group in shards for e in group)
    return {"metadata": {**(metadata or {}), "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


class SafetensorsFileWriter:
    """Writes one safetensors file: the header on open, then each tensor's bytes in header order.

    `write(name, data)` appends data to tensor `name`; a tensor may come in several pieces
    (blocks of rows), and the writer checks that names and byte counts follow the header.
    With `last`, the data are the bytes of every tensor from `name` to `last`, in order: a run
    of small tensors written in one call.

    Args:
        path: the file to create; with `created`, an empty file that exists already (a reserved temporary).
        entries: the tensors, in file order.
        metadata: `__metadata__`.
        header: the header bytes, when the caller has built them (see `header_bytes`).
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str] | None = None,
        *,
        header: bytes | None = None,
        created: bool = False,
    ):
        self.path = path
        self.entries = list(entries)
        self._names: set[str] | None = None
        self._header = header if header is not None else build_header(self.entries, metadata)
        self._created = created
        self._fd: int | None = None
        self._index = 0
        self._written = 0  # bytes of the current tensor written so far
        self.bytes_written = 0

    @property
    def header_size(self) -> int:
        return len(self._header)

    def open(self) -> None:
        """Create the file (it must not exist, unless `created`) and write the header."""
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        if self._created:
            flags |= os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        else:
            flags |= os.O_CREAT | os.O_EXCL
        self._fd = os.open(self.path, flags, 0o644)
        self._write_all(memoryview(self._header))

    @property
    def done(self) -> bool:
        self._skip_empty()
        return self._index == len(self.entries)

    @property
    def current(self) -> str | None:
        """The name of the tensor the next bytes belong to (None when all are written)."""
        self._skip_empty()
        return self.entries[self._index].name if self._index < len(self.entries) else None

    def has(self, name: str) -> bool:
        """Whether tensor `name` is in this file."""
        if self._names is None:
            self._names = {e.name for e in self.entries}
        return name in self._names

    def write(
        self, name: str, data: torch.Tensor | bytes | memoryview, *, last: str | None = None
    ) -> tuple[memoryview, bool]:
        """Append `data` (a CPU tensor, written as its raw bytes, or bytes) to tensor `name` (through `last`).

        Returns (the bytes of a run that go past this file's end, for the next shard; whether
        the run reached the end of `last`).
        """
        view = _as_bytes(data)
        if not len(view) and last is None and self.has(name):
            return view, True  # an empty tensor (or block) has nothing to write
        self._skip_empty()
        if self._index >= len(self.entries) or self.entries[self._index].name != name:
            expected = self.entries[self._index].name if self._index < len(self.entries) else "nothing more"
            raise MergeError(f"{self.path}: got bytes for tensor {name!r} but the header says {expected!r} comes next")
        if last is None:
            self._append_block(view)
            return view[len(view) :], True
        return self.append_run(view, last)

    def _append_block(self, view: memoryview) -> None:
        """Bytes within the current tensor (a block of its rows)."""
        entry = self.entries[self._index]
        if self._written + len(view) > entry.nbytes:
            raise MergeError(
                f"{self.path}: tensor {entry.name!r} has {entry.nbytes} bytes in the header but "
                f"{self._written + len(view)} were written"
            )
        self._write_all(view)
        self._written += len(view)
        if self._written == entry.nbytes:
            self._index += 1
            self._written = 0

    def append_run(self, view: memoryview, last: str) -> tuple[memoryview, bool]:
        """Bytes of the tensors from the current position to the end of `last`, in order.

        Returns (what goes past this file's end, whether `last` was reached); a run that ends
        inside this file must end exactly at the end of `last`.
        """
        if self._fd is None:
            raise MergeError(f"{self.path}: write before open or after close")
        take, remaining, finished = 0, len(view), False
        while self._index < len(self.entries):
            entry = self.entries[self._index]
            step = min(entry.nbytes - self._written, remaining)
            take, remaining, self._written = take + step, remaining - step, self._written + step
            if self._written < entry.nbytes:
                break
            self._index += 1
            self._written = 0
            if entry.name == last:
                finished = True
                break
        if (remaining and finished) or (not finished and self._index < len(self.entries)):
            problem = "go past its end" if finished else "end before its end"
            raise MergeError(f"{self.path}: the bytes of a run of tensors through {last!r} {problem}")
        self._write_all(view[:take])
        return view[take:], finished

    def close(self) -> None:
        """Check every tensor is complete, then flush to disk (fsync) and close."""
        if self._fd is None:
            return
        if not self.done:
            raise MergeError(f"{self.path}: closed before tensor {self.current!r} was written")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def discard(self) -> None:
        """Close without checks (the caller removes the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _skip_empty(self) -> None:
        while self._index < len(self.entries) and self._written == 0 and self.entries[self._index].nbytes == 0:
            self._index += 1

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.bytes_written += len(view)


def _as_bytes(data: torch.Tensor | bytes | memoryview) -> memoryview:
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise MergeError(f"tensor data must be on the CPU to be written, got {data.device}")
        flat = data.detach().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    return memoryview(data).cast("B")


@dataclass(frozen=True)
class Shard:
    """One file of an output: its name, its tensors in file order, and the tensors' part of its header."""

    name: str
    entries: list[TensorEntry]
    tensors: str


def plan_layout(
    entries: Sequence[TensorEntry],
    *,
    folder: bool,
    max_shard_size: int | None = None,
    weights_name: str = "model.safetensors",
) -> list[Shard]:
    """The files of an output and their headers' tensor parts, computed once for every output of a run.

    A file output is one shard (named later after its target); a folder output is sharded by
    `plan_shards`. Raises MergeError for duplicate tensor names.
    """
    names = {e.name for e in entries}
    if len(names) != len(entries):
        raise MergeError("duplicate tensor names in the output plan")
    groups = plan_shards(entries, max_shard_size, weights_name) if folder else [("", safetensors_order(entries))]
    return [Shard(name, group, tensor_json(group)) for name, group in groups]


class CheckpointWriter:
    """An output checkpoint: one `.safetensors` file, or a folder of shards, index and extra files.

    Nothing appears at `target` before `commit()` (or `finish()` then `atomic.publish_all`);
    `abort()` (or leaving a `with` block on an error) removes everything written. Creating the
    writer creates the temporary output, so an unwritable target fails here, before any work.

    Args:
        target: a path ending in `.safetensors` (one file) or any other path (a folder).
        entries: the tensors, in the order they should be assigned to shards.
        metadata: `__metadata__` for every file (str → str).
        max_shard_size: folder outputs only: largest tensor bytes per shard (None: one file).
        weights_name: the file name in a folder output (`model.safetensors`, `adapter_model.safetensors`).
        extra_files: files copied into a folder output (config, tokenizer, ...).
        force: replace an existing target.
        layout: the shards from `plan_layout`, when several outputs share them (then `entries`,
            `max_shard_size` and `weights_name` are not used).

    Example:
        >>> with CheckpointWriter(Path("out.safetensors"), entries, {"format": "pt"}) as w:
        ...     for e in w.order:
        ...         w.write(e.name, tensors[e.name])
        ...     w.commit()
    """

    def __init__(
        self,
        target: str | os.PathLike,
        entries: Sequence[TensorEntry] = (),
        metadata: dict[str, str] | None = None,
        *,
        max_shard_size: int | None = None,
        weights_name: str = "model.safetensors",
        extra_files: Sequence[Path] = (),
        force: bool = False,
        layout: Sequence[Shard] | None = None,
    ):
        self.target = Path(target)
        self.is_folder = is_folder_output(self.target)
        if not self.is_folder and max_shard_size is not None:
            raise InputError(f"{self.target}: a .safetensors OUT is one file; give a folder OUT to shard it")
        if not self.is_folder and extra_files:
            raise InputError(f"{self.target}: a .safetensors OUT is one file; give a folder OUT to add config files")
        if layout is None:
            folder = self.is_folder
            layout = plan_layout(entries, folder=folder, max_shard_size=max_shard_size, weights_name=weights_name)
        self.force = force
        self.shards = [(shard.name or self.target.name, shard.entries) for shard in layout]
        self._layout = layout
        self._metadata = metadata
        self._extra_files = list(extra_files)
        self._weights_name = weights_name
        self._names: set[str] | None = None
        self._files: list[SafetensorsFileWriter] = []
        self._shard = 0
        self._closed = False
        self._temp = atomic.reserve_temp(self.target, folder=self.is_folder)
        try:
            self._open_files()
        except BaseException:
            self.abort()
            raise

    @property
    def order(self) -> list[TensorEntry]:
        """Every tensor in the order its bytes are written: shard by shard, each in file order."""
        return [e for _, group in self.shards for e in group]

    @property
    def total_bytes(self) -> int:
        """Bytes the output will take: headers and tensors (extra files not counted)."""
        return sum(f.header_size + sum(e.nbytes for e in f.entries) for f in self._files)

    def _open_files(self) -> None:
        for shard in self._layout:
            path = self._temp / shard.name if self.is_folder else self._temp
            header = header_bytes(shard.tensors, self._metadata)
            self._files.append(SafetensorsFileWriter(path, shard.entries, header=header, created=not self.is_folder))
        self._files[0].open()

    @property
    def bytes_written(self) -> int:
        """Bytes written so far, headers included."""
        return sum(f.bytes_written for f in self._files)

    def write(self, name: str, data: torch.Tensor | bytes | memoryview, *, last: str | None = None) -> None:
        """Append `data` to tensor `name` (tensors come in `self.order`, each whole or in row blocks).

        With `last`, `data` holds the bytes of every tensor from `name` to `last` in `self.order`
        (a run of small tensors, which may cross from one shard into the next).
        """
        if last is None and not _as_bytes(data).nbytes and self._has(name):
            return  # an empty tensor (or block) has nothing to write, wherever it sits
        while self._files[self._shard].done and self._shard + 1 < len(self._files):
            self._next_shard()
        rest, finished = self._files[self._shard].write(name, data, last=last)
        while not finished and self._shard + 1 < len(self._files):
            self._next_shard()
            rest, finished = self._files[self._shard].append_run(rest, last)
        if not finished:
            raise MergeError(f"{self.target}: the bytes of a run of tensors through {last!r} end before its end")

    def _has(self, name: str) -> bool:
        if self._names is None:
            self._names = {e.name for _, group in self.shards for e in group}
        return name in self._names

    def _next_shard(self) -> None:
        self._files[self._shard].close()
        self._shard += 1
        self._files[self._shard].open()

    def add_text(self, name: str, text: str) -> None:
        """Add a small generated file (e.g. an adapter_config.json) to a folder output."""
        if not self.is_folder:
            raise InputError(f"{self.target}: a .safetensors OUT is one file; give a folder OUT to add {name}")
        if Path(name).name != name or name in {n for n, _ in self.shards}:
            raise ValueError(f"{name!r} must be a plain file name that is not one of the weight files")
        atomic.write_text(self._temp / name, text)

    def finish(self) -> Path:
        """Complete every file (index and extra files too) and fsync it; returns the temporary to publish."""
        while self._shard + 1 < len(self._files):
            self._next_shard()
        self._files[self._shard].close()
        if self.is_folder:
            if len(self.shards) > 1:
                index = json.dumps(build_index(self.shards), indent=2) + "\n"
                atomic.write_text(self._temp / f"{self._weights_name}{INDEX_SUFFIX}", index)
            for src in self._extra_files:
                shutil.copyfile(src, self._temp / src.name)
                atomic.fsync_path(self._temp / src.name)
        return self._temp

    def published(self) -> None:
        """The temporary was moved to the target (by `atomic.publish_all`): nothing is left to clean up."""
        self._closed = True

    def commit(self) -> Path:
        """Finish every file, fsync, and move the output into place. Returns the target."""
        atomic.publish(self.finish(), self.target, force=self.force)
        self._closed = True
        return self.target

    def abort(self) -> None:
        """Remove everything written so far; the target is left as it was."""
        if self._closed:
            return
        for f in self._files:
            f.discard()
        atomic.remove(self._temp)
        self._closed = True

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._closed:
            self.abort()


@contextmanager
def all_or_nothing() -> Iterator[list[CheckpointWriter]]:
    """A list to collect the writers of one run: on any error (Ctrl-C included) every one is aborted.

    The caller appends writers as it creates them and publishes them together at the end of
    the block (`atomic.publish_all`); a failure before that leaves no output of this run.

    Example:
        >>> with all_or_nothing() as writers:
        ...     writers.append(CheckpointWriter(path, entries))
        ...     ...  # write
        ...     outputs = atomic.publish_all([(w.finish(), w.target) for w in writers], force=False)
    """
    writers: list[CheckpointWriter] = []
    try:
        yield writers
    except BaseException:
        for w in reversed(writers):
            w.abort()
        raise


def check_free_space(writers: Sequence[CheckpointWriter]) -> None:
    """Raise an InputError before any data is written when the outputs will not fit on their disks."""
    need: dict[Path, int] = {}
    for w in writers:
        need[w.target.parent] = need.get(w.target.parent, 0) + w.total_bytes
    check_space(need)


def check_space(need: Mapping[Path, int]) -> None:
    """Raise an InputError when the bytes needed in a folder exceed the free space of its disk."""
    for folder, n in need.items():
        while not folder.exists() and folder != folder.parent:  # a dry run creates no folder: ask the nearest one
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if n > free:
            raise InputError(
                f"not enough space for OUT in {folder}: the output needs {n / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
            )
