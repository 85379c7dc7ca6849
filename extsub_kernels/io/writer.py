"""Header-first safetensors writer: one file, or shards and their index in the Hugging Face layout, each tensor
appended in header order (whole or by row blocks) under temporary names published on `commit()` (see `atomic`)."""

import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from extsub_kernels.constants import CARD_NAME, INDEX_SUFFIX, MODEL_WEIGHTS, SAFETENSORS_SUFFIX, SHARD_NAME
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import atomic
from extsub_kernels.io.format import HEADER_LENGTH_BYTES, METADATA_KEY, dtype_code, write_rank
from extsub_kernels.io.outputs import GENERATED_MARK, is_folder_output, manifest_line


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the output: name, dtype and shape (its bytes follow from them, computed once)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", math.prod(self.shape) * self.dtype.itemsize)


def build_header(entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header for `entries` in order, byte for byte as `safetensors` writes it."""
    return header_bytes(_tensor_json(entries), metadata)


def _tensor_json(entries: Sequence[TensorEntry]) -> str:
    """The tensors' part of a header, built as text: the bytes of `json.dumps`, about 6× faster (a million tensors)."""
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
    """The length field and padded JSON of a header whose tensors' part is `tensors` (see `_tensor_json`)."""
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


def _safetensors_order(entries: Sequence[TensorEntry]) -> list[TensorEntry]:
    """`entries` in the order `safetensors` writes a file: by dtype alignment, then name."""
    ranks = {dtype: write_rank(dtype) for dtype in {e.dtype for e in entries}}
    return sorted(entries, key=lambda e: (ranks[e.dtype], e.name))


@dataclass(frozen=True)
class Shard:
    """One file of an output: name ("" in a file output), tensors in file order, its header's tensor part."""

    name: str
    entries: list[TensorEntry]
    tensors: str


def plan_layout(
    entries: Sequence[TensorEntry],
    *,
    folder: bool,
    max_shard_size: int | None = None,
    weights_name: str = MODEL_WEIGHTS,
) -> list[Shard]:
    """The files of an output in safetensors' order: a folder output's cut at `max_shard_size` tensor bytes (a larger
    tensor alone), several named as Hugging Face does (model-00001-of-00003…); MergeError for duplicate names."""
    if len({e.name for e in entries}) != len(entries):
        raise MergeError("duplicate tensor names in the output plan")
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if folder and max_shard_size is not None and groups[-1] and size + entry.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    stem, count = weights_name.removesuffix(SAFETENSORS_SUFFIX), len(groups)
    names = [SHARD_NAME.format(stem=stem, index=i + 1, count=count) for i in range(count)]
    names = names if count > 1 else [weights_name if folder else ""]
    ordered = [_safetensors_order(group) for group in groups]
    return [Shard(name, group, _tensor_json(group)) for name, group in zip(names, ordered, strict=True)]


def _index_file(weights_name: str, layout: Sequence[Shard]) -> tuple[str, str]:
    """The shard index of sharded weights (model.safetensors.index.json) and its text: `metadata.total_size` and a
    sorted `weight_map`."""
    weight_map = dict(sorted((e.name, shard.name) for shard in layout for e in shard.entries))
    total = sum(e.nbytes for shard in layout for e in shard.entries)
    text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    return weights_name.removesuffix(SAFETENSORS_SUFFIX) + INDEX_SUFFIX, text


def planned_files(
    target: Path,
    entries: Sequence[TensorEntry],
    metadata: dict[str, str] | None = None,
    *,
    max_shard_size: int | None = None,
    weights_name: str = MODEL_WEIGHTS,
    extra_files: Sequence[Path] = (),
    texts: Sequence[str] = (),
) -> list[tuple[str, int | None]]:
    """(file name, bytes) of every file an output will hold, creating nothing (a dry run); `texts`' bytes are None."""
    folder = is_folder_output(target)
    layout = plan_layout(entries, folder=folder, max_shard_size=max_shard_size, weights_name=weights_name)
    files: list[tuple[str, int | None]] = [
        (s.name or target.name, len(header_bytes(s.tensors, metadata)) + sum(e.nbytes for e in s.entries))
        for s in layout
    ]
    if not folder:
        return files
    if len(layout) > 1:
        name, text = _index_file(weights_name, layout)
        files.append((name, len(text)))
    return files + [(src.name, src.stat().st_size) for src in extra_files] + [(name, None) for name in texts]


class SafetensorsFileWriter:
    """One file of a `CheckpointWriter`: `header` on open, then the bytes of `entries` in order (whole, by row blocks
    or in runs), names and counts checked; `path` is created, or with `created` exists empty (a reserved temporary)."""

    def __init__(self, path: Path, entries: Sequence[TensorEntry], header: bytes, *, created: bool = False):
        self.path = path
        self.entries = list(entries)
        self.header_size = len(header)
        self._header: bytes | None = header
        self._created = created
        self._fd: int | None = None
        self._index = 0
        self._written = 0  # bytes of the current tensor written so far
        self.bytes_written = 0

    def open(self) -> None:
        """Create the file (it must not exist, unless `created`) and write the header."""
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        flags |= (os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)) if self._created else (os.O_CREAT | os.O_EXCL)
        self._fd = os.open(self.path, flags, 0o644)
        self._write_all(memoryview(self._header))
        self._header = None

    @property
    def done(self) -> bool:
        """Whether every tensor of the file is written (empty ones need nothing)."""
        while self._index < len(self.entries) and self._written == 0 and self.entries[self._index].nbytes == 0:
            self._index += 1
        return self._index == len(self.entries)

    def write(
        self, name: str, data: torch.Tensor | bytes | memoryview, *, last: str | None = None
    ) -> tuple[memoryview, bool]:
        """Append `data` (a CPU tensor or bytes) to tensor `name` (with `last`: the tensors through it); returns (bytes
        of a run past this file's end, whether the run reached `last`'s end)."""
        view = _as_bytes(data)
        expected = "nothing more" if self.done else self.entries[self._index].name
        if expected != name:
            raise MergeError(f"{self.path}: got bytes for tensor {name!r} but the header says {expected!r} comes next")
        if last is not None:
            return self.append_run(view, last)
        entry = self.entries[self._index]
        if self._written + len(view) > entry.nbytes:
            raise MergeError(
                f"{self.path}: tensor {entry.name!r} has {entry.nbytes} bytes in the header but "
                f"{self._written + len(view)} were written"
            )
        self._write_all(view)
        self._written += len(view)
        if self._written == entry.nbytes:
            self._index, self._written = self._index + 1, 0
        return view[len(view) :], True

    def append_run(self, view: memoryview, last: str) -> tuple[memoryview, bool]:
        """Bytes of the tensors from here through `last` (see `write`); one ending in this file ends with `last`."""
        if self._fd is None:
            raise MergeError(f"{self.path}: write before open or after close")
        take, remaining, finished = 0, len(view), False
        while self._index < len(self.entries):
            entry = self.entries[self._index]
            step = min(entry.nbytes - self._written, remaining)
            take, remaining, self._written = take + step, remaining - step, self._written + step
            if self._written < entry.nbytes:
                break
            self._index, self._written = self._index + 1, 0
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
            raise MergeError(f"{self.path}: closed before tensor {self.entries[self._index].name!r} was written")
        os.fsync(self._fd)
        self.discard()

    def discard(self) -> None:
        """Close without checks (the caller removes the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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


class CheckpointWriter:
    """An output checkpoint: one `.safetensors` file, or a folder of shards, index and extra files.

    Nothing appears at `target` before `commit()` (or `finish()`, then `atomic.publish_all`); `abort()` or leaving a
    `with` block removes everything written; an unwritable target fails on creation.

    Args:
        target: a path ending in `.safetensors` (one file) or any other path (a folder).
        entries: the tensors, in the order they are assigned to shards.
        metadata: `__metadata__` for every file (str → str).
        max_shard_size: folder outputs only: largest tensor bytes per shard (None: one file).
        weights_name: the weights file's name in a folder output.
        extra_files: files copied into a folder output (config, tokenizer, ...).
        force: replace an existing target.
        layout: shards from `plan_layout` shared by several outputs (`entries`, `max_shard_size` then unused).

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
        weights_name: str = MODEL_WEIGHTS,
        extra_files: Sequence[Path] = (),
        force: bool = False,
        layout: Sequence[Shard] | None = None,
    ):
        self.target = Path(target)
        self.is_folder = is_folder_output(self.target)
        if max_shard_size is not None:
            self._need_folder("shard it")
        if extra_files:
            self._need_folder("add config files")
        if layout is None:
            layout = plan_layout(
                entries, folder=self.is_folder, max_shard_size=max_shard_size, weights_name=weights_name
            )
        self.force = force
        self._layout = layout
        self._extra_files = list(extra_files)
        self._weights_name = weights_name
        self._names: set[str] | None = None
        self._shard = 0
        self._closed = False
        self._files: list[SafetensorsFileWriter] = []
        self._temp = atomic.reserve_temp(self.target, folder=self.is_folder)
        try:
            self._files = [
                SafetensorsFileWriter(
                    self._temp / shard.name if self.is_folder else self._temp,
                    shard.entries,
                    header_bytes(shard.tensors, metadata),
                    created=not self.is_folder,
                )
                for shard in layout
            ]
            self._files[0].open()
        except BaseException:
            self.abort()
            raise

    def _need_folder(self, to: str) -> None:
        if not self.is_folder:
            raise InputError(f"{self.target}: a .safetensors OUT is one file; give a folder OUT to {to}")

    @property
    def order(self) -> list[TensorEntry]:
        """Every tensor in the order its bytes are written: shard by shard, each in file order."""
        return [e for shard in self._layout for e in shard.entries]

    @property
    def total_bytes(self) -> int:
        """Bytes the output will take: headers and tensors (extra files not counted)."""
        return sum(f.header_size + sum(e.nbytes for e in f.entries) for f in self._files)

    @property
    def bytes_written(self) -> int:
        """Bytes written so far, headers included."""
        return sum(f.bytes_written for f in self._files)

    def write(self, name: str, data: torch.Tensor | bytes | memoryview, *, last: str | None = None) -> None:
        """Append `data` to tensor `name` (tensors come in `self.order`, each whole or in row blocks); with `last`,
        the bytes of every tensor from `name` to `last` (a run of small tensors, maybe across shards)."""
        if self._names is None:
            self._names = {e.name for e in self.order}
        if last is None and not _as_bytes(data).nbytes and name in self._names:
            return  # an empty tensor (or block) has nothing to write, wherever it sits
        while self._files[self._shard].done and self._shard + 1 < len(self._files):
            self._next_shard()
        rest, finished = self._files[self._shard].write(name, data, last=last)
        while not finished and self._shard + 1 < len(self._files):
            self._next_shard()
            rest, finished = self._files[self._shard].append_run(rest, last)
        if not finished:
            raise MergeError(f"{self.target}: the bytes of a run of tensors through {last!r} end before its end")

    def _next_shard(self) -> None:
        self._files[self._shard].close()
        self._shard += 1
        self._files[self._shard].open()

    def add_text(self, name: str, text: str) -> None:
        """Add a small generated file (e.g. an adapter_config.json) to a folder output."""
        self._need_folder(f"add {name}")
        if Path(name).name != name or name in {shard.name for shard in self._layout}:
            raise ValueError(f"{name!r} must be a plain file name that is not one of the weight files")
        atomic.write_text(self._temp / name, text)

    def finish(self) -> Path:
        """Complete every file (index and extra files too) and fsync it; returns the temporary to publish."""
        while self._shard + 1 < len(self._files):
            self._next_shard()
        self._files[self._shard].close()
        if not self.is_folder:
            return self._temp
        if len(self._layout) > 1:
            name, text = _index_file(self._weights_name, self._layout)
            atomic.write_text(self._temp / name, text)
        for src in self._extra_files:
            shutil.copyfile(src, self._temp / src.name)
            atomic.fsync_path(self._temp / src.name)
        card = self._temp / CARD_NAME  # ours ends with the names of every file: a later force=True replaces those
        if card.is_file() and GENERATED_MARK in (text := card.read_text(encoding="utf-8")):
            atomic.write_text(card, text + manifest_line(os.listdir(self._temp)))
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
        self.abort()


def check_space(need: Iterable[tuple[Path, int]]) -> None:
    """Raise an InputError, before any write, when the bytes bound for a folder exceed its disk's free space."""
    totals: dict[Path, int] = {}
    for folder, n in need:
        totals[folder] = totals.get(folder, 0) + n
    for folder, n in totals.items():
        while not folder.exists() and folder != folder.parent:  # a dry run creates no folder: ask the nearest one
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if n > free:
            raise InputError(
                f"not enough space for OUT in {folder}: the output needs {n / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
            )
