"""Read safetensors checkpoints lazily: headers validated up front, then one tensor (or row block) at a time.

Tensors are read with `pread` into a buffer the caller owns, not memory-mapped: pages of a
mapping stay resident and count toward the process's RSS until the file is closed, so
reading a whole model through one mapping would grow RSS to the model's size.
"""

import json
import os
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io.format import DTYPES, HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, METADATA_KEY, nbytes_of


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte offset and size, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file order and the `__metadata__` strings."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file without reading any tensor data.

    Raises InputError naming the file when it is too short, the header is not JSON of the
    expected form, or a tensor's offsets do not fit its dtype and shape or run past the end.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(HEADER_LENGTH_BYTES)
            if len(prefix) < HEADER_LENGTH_BYTES:
                raise InputError(
                    f"{path}: {size} bytes is too short for a safetensors file (it starts with an 8-byte "
                    "header length); the file is truncated or not a safetensors file"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - HEADER_LENGTH_BYTES:
                raise InputError(
                    f"{path}: the header claims {n} bytes but the file has {size - HEADER_LENGTH_BYTES} after the "
                    "length field; the file is truncated or not a safetensors file"
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: the header is not valid JSON ({e}); the file is corrupt or not a safetensors file") from None
    if not isinstance(parsed, dict):
        raise InputError(f"{path}: the header is JSON but not an object; the file is corrupt or not a safetensors file")
    data_start = HEADER_LENGTH_BYTES + n
    metadata = _parse_metadata(path, parsed.pop(METADATA_KEY, None))
    tensors = {name: _parse_entry(path, name, entry, data_start) for name, entry in parsed.items()}
    _check_layout(path, tensors, data_start, size)
    ordered = dict(sorted(tensors.items(), key=lambda item: item[1].offset))
    return Header(path=path, tensors=ordered, metadata=metadata)


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{path}: the header's __metadata__ must map strings to strings; the file is corrupt")
    return dict(metadata)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: header entry is not an object; the file is corrupt")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in DTYPES:
        raise InputError(f"{where}: unknown dtype {code!r}; expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers; the file is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise InputError(f"{where}: data_offsets {offsets!r} are not [begin, end] with begin <= end; the file is corrupt")
    dtype = DTYPES[code]
    expected = nbytes_of(dtype, tuple(shape))
    if offsets[1] - offsets[0] != expected:
        raise InputError(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but dtype {code} and shape "
            f"{shape} need {expected}; the file is corrupt"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], expected)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensors must tile the data section exactly, as the format requires: no gap, overlap or overrun."""
    data_bytes = size - data_start
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        end = info.offset + info.nbytes
        if end > size:
            raise InputError(
                f"{path}: tensor {info.name!r} ends at byte {end - data_start} of the data section but the file holds "
                f"only {data_bytes} data bytes; the file is truncated (or its header is corrupt)"
            )
        if info.offset != position:
            what = "overlaps the previous tensor" if info.offset < position else "leaves a gap before it"
            raise InputError(f"{path}: tensor {info.name!r} {what} (offset {info.offset - data_start}); the file is corrupt")
        position = end
    if position != size:
        raise InputError(
            f"{path}: {size - position} bytes after the last tensor are not described by the header; "
            "the file is corrupt or was appended to"
        )


class CheckpointReader:
    """The tensors of one checkpoint (a file, or shards of one model), read one at a time.

    Files are opened read-only. Keys come in file order (shard by shard, by offset).

    Example:
        >>> with CheckpointReader(["model.safetensors"]) as r:
        ...     w = r.read("lm_head.weight")
    """

    def __init__(self, files: Sequence[str | os.PathLike], *, label: str = "checkpoint"):
        self.label = label
        self.headers = [read_header(f) for f in files]
        self._infos: dict[str, TensorInfo] = {}
        for header in self.headers:
            for name, info in header.tensors.items():
                if name in self._infos:
                    raise InputError(
                        f"{label}: tensor {name!r} is in two shards, {self._infos[name].path} and {info.path}; "
                        "the checkpoint's shards overlap"
                    )
                self._infos[name] = info
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    @property
    def metadata(self) -> dict[str, str]:
        """`__metadata__` of the first file."""
        return self.headers[0].metadata if self.headers else {}

    def keys(self) -> list[str]:
        return list(self._infos)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor's info by name, in file order (a read-only view, for loops over a million tensors)."""
        return MappingProxyType(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.label}: no tensor {name!r}") from None

    def read_into(self, name: str, out: torch.Tensor, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Copy bytes [start, start + length) of tensor `name` into the uint8 CPU tensor `out`.

        Returns the filled prefix `out[:length]`. `length` defaults to the rest of the tensor.
        """
        info = self.info(name)
        length = info.nbytes - start if length is None else length
        if start < 0 or length < 0 or start + length > info.nbytes:
            raise ValueError(f"bytes [{start}, {start + length}) are outside tensor {name!r} ({info.nbytes} bytes)")
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < length:
            raise ValueError(f"out must be a contiguous uint8 CPU tensor of at least {length} bytes")
        target = out[:length]
        if length:
            self._pread_exact(info.path, memoryview(target.numpy()), info.offset + start)
        return target

    def read_whole_into(self, names: Sequence[str], out: torch.Tensor) -> int:
        """Whole tensors `names`, back to back, into the contiguous uint8 CPU tensor `out`; returns the bytes filled.

        Tensors that lie back to back in one file are read with one pread, so a run of small
        tensors costs a few system calls rather than one per tensor.
        """
        infos = [self.info(name) for name in names]
        total = sum(info.nbytes for info in infos)
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < total:
            raise ValueError(f"out must be a contiguous uint8 CPU tensor of at least {total} bytes")
        view = memoryview(out.numpy()) if total else memoryview(b"")
        path, start, length, dest = None, 0, 0, 0
        for info in infos:
            if info.path == path and info.offset == start + length:
                length += info.nbytes
                continue
            if length:
                self._pread_exact(path, view[dest : dest + length], start)
            dest += length
            path, start, length = info.path, info.offset, info.nbytes
        if length:
            self._pread_exact(path, view[dest : dest + length], start)
        return total

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as a new CPU tensor of its dtype and shape."""
        info = self.info(name)
        raw = self.read_into(name, torch.empty(info.nbytes, dtype=torch.uint8))
        return raw.view(info.dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._fds[path]

    def _pread_exact(self, path: Path, view: memoryview, offset: int) -> None:
        fd = self._fd(path)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise MergeError(f"{path}: read failed at byte {offset + done}: {e.strerror or e}") from None
            if n == 0:
                raise MergeError(
                    f"{path}: the file ended at byte {offset + done} while reading; it was truncated or replaced during the merge"
                )
            done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
