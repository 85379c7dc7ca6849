"""Read safetensors checkpoints lazily: headers validated up front, then one tensor (or row block) at a time, by
`pread` into the caller's buffer (a memory map's pages would count toward RSS until the file is closed)."""

import gc
import hashlib
import json
import os
import re
import reprlib
import stat
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import torch

from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io.format import DTYPES, HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, METADATA_KEY, readable_dtypes

# safetensors: header numbers and a shape's running product (even before a 0) in u64; torch: dims and strides in int64.
_U64_MAX = 2**64 - 1
_INT64_MAX = 2**63 - 1
_MAX_DIGITS = len(str(_U64_MAX))
# No weight has more dimensions; a shape of millions of 1s would only slow every later step.
_MAX_RANK = 64
_ENTRY_FIELDS = frozenset(("dtype", "shape", "data_offsets"))

# Values from a hostile header go into messages shortened: a 90 MB name or list stays a few words.
_show = reprlib.Repr()
_show.maxstring, _show.maxother, _show.maxlist, _show.maxdict, _show.maxlevel = 80, 80, 6, 4, 2
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate (a JSON escape like \ud800): not valid Unicode


class TensorInfo(NamedTuple):
    """Where one tensor lives: file, absolute byte offset and size, dtype, shape (a light record: a million of them)."""

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
    """Parse and validate a safetensors header, no tensor data read, refusing what `safetensors` or torch would.

    Raises:
        InputError: naming the file (and tensor): not a regular file, too short, or a header that is not valid
            safetensors JSON (unknown or extra fields, a dtype this `safetensors` cannot load, an overflowing
            shape, lone surrogates, a repeated key, offsets that do not tile the data section).
    """
    path = Path(path)
    raw, size = _read_header_bytes(path)
    # What the header means depends only on these: a header still in use is not parsed again.
    key = (os.fspath(path), size, hashlib.blake2b(raw, digest_size=32).digest())
    cached = _headers_in_use.get(key)
    if cached is not None:
        return cached
    data_start = HEADER_LENGTH_BYTES + len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: the header is not valid JSON (not UTF-8: {e.reason} at header byte {e.start}); the file is "
            "corrupt or not a safetensors file"
        ) from None
    del raw  # freed before parsing, which is when memory peaks
    # Millions of objects in no cycle: the collector's passes would double the parsing time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        parsed = _parse_json(path, text)
        del text
        metadata = _parse_metadata(path, parsed.pop(METADATA_KEY, None))
        dtypes = readable_dtypes()
        shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape
        infos = [_parse_entry(path, name, entry, data_start, dtypes, shapes) for name, entry in parsed.items()]
        del parsed
        infos.sort(key=attrgetter("offset", "nbytes"))
        _check_layout(path, infos, data_start, size)
        header = Header(path=path, tensors={info.name: info for info in infos}, metadata=metadata)
    finally:
        if collecting:
            gc.enable()
    _headers_in_use[key] = header
    return header


# Headers still referenced (a ResolvedInput keeps its files'), by path, size and header digest: parsed once.
_headers_in_use: "weakref.WeakValueDictionary[tuple, Header]" = weakref.WeakValueDictionary()


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """The header's JSON bytes and the file's size (a FIFO refused without waiting), the length field checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{path}: not a regular file; a checkpoint is a .safetensors file")
            with open(fd, "rb", closefd=False) as f:
                prefix = f.read(HEADER_LENGTH_BYTES)
                n = int.from_bytes(prefix, "little")
                if len(prefix) == HEADER_LENGTH_BYTES and n <= min(MAX_HEADER_BYTES, st.st_size - HEADER_LENGTH_BYTES):
                    raw = f.read(n)
        finally:
            os.close(fd)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    size, rest = st.st_size, st.st_size - HEADER_LENGTH_BYTES
    if len(prefix) < HEADER_LENGTH_BYTES:
        raise InputError(
            f"{path}: {size} bytes is too short for a safetensors file (it starts with an 8-byte header length); the "
            "file is truncated or not a safetensors file"
        )
    if n > MAX_HEADER_BYTES:
        raise InputError(
            f"{path}: the header length field says {n} bytes, above the {MAX_HEADER_BYTES} that safetensors "
            "allows; the file is corrupt or not a safetensors file"
        )
    if n > rest:
        raise InputError(
            f"{path}: the header claims {n} bytes but the file has {rest} after the length field; the file is "
            "truncated or not a safetensors file"
        )
    if len(raw) < n:
        raise InputError(
            f"{path}: the file ended inside its {n}-byte header; it is truncated or was replaced while read"
        )
    return raw, size


class _BadJson(ValueError):
    """Raised from the JSON parser's hooks: the message says what was found."""


def _parse_int(text: str) -> int | float:
    digits = len(text) - text.startswith("-")
    if digits > _MAX_DIGITS:
        raise _BadJson(
            f"a {digits}-digit integer, where dimensions and offsets are 64-bit (at most {_MAX_DIGITS} digits)"
        )
    # safetensors' parser reads -0 as the float -0.0, which no dimension or offset may be; so does this one.
    return -0.0 if text == "-0" else int(text)


def _refuse_float(text: str) -> float:
    raise _BadJson(f"the number {_show.repr(text)[1:-1]}, where dimensions and offsets are integers")


def _refuse_constant(text: str) -> float:
    raise _BadJson(f"the literal {text}, which is not JSON")


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _BadJson(f"the key {_show.repr(twice)} twice in one object (names and fields must be unique)")
    return obj


def _parse_json(path: Path, text: str) -> dict:
    """The header parsed, refusing what safetensors' parser refuses (floats, >64-bit ints, NaN, repeated keys)."""
    try:
        parsed = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_refuse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_object,
        )
    except _BadJson as e:
        raise InputError(f"{path}: the header holds {e}; the file is corrupt or not a safetensors file") from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}: the header is not valid JSON ({e}); the file is corrupt or not a safetensors file"
        ) from None
    except RecursionError:
        raise InputError(
            f"{path}: the header nests JSON deeper than a parser allows (a safetensors header is 3 levels deep); "
            "the file is corrupt or not a safetensors file"
        ) from None
    if type(parsed) is not dict:
        raise InputError(
            f"{path}: the header is {_kind(parsed)}, not an object of tensors; the file is corrupt or not a "
            "safetensors file"
        )
    return parsed


def _kind(value: object) -> str:
    """A JSON value described for a message, shortened: "the integer 7", "a list ['F32']", "null"."""
    if value is None:
        return "null"
    if type(value) is bool:
        return f"the boolean {str(value).lower()}"
    names = {dict: "an object", list: "a list", str: "the string", int: "the integer", float: "the number"}
    return f"{names.get(type(value), type(value).__name__)} {_show.repr(value)}"


def _unencodable(text: str) -> bool:
    """Whether `text` holds a lone surrogate, which UTF-8 cannot encode."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if type(metadata) is not dict:
        raise InputError(
            f"{path}: the header's __metadata__ is {_kind(metadata)}, not an object of strings; the file is corrupt"
        )
    for key, value in metadata.items():
        if type(value) is not str:
            raise InputError(
                f"{path}: the header's __metadata__[{_show.repr(key)}] is {_kind(value)}, not a string "
                "(safetensors metadata maps strings to strings); the file is corrupt"
            )
        if _unencodable(key) or _unencodable(value):
            raise InputError(
                f"{path}: the header's __metadata__ entry {_show.repr(key)} holds a lone surrogate escape, "
                "which is not valid Unicode; the file is corrupt"
            )
    return metadata  # type: ignore[return-value]


def _parse_entry(
    path: Path,
    name: str,
    entry: object,
    data_start: int,
    dtypes: dict[str, torch.dtype],
    shapes: dict[tuple[int, ...], tuple[int, ...]],
) -> TensorInfo:
    """One tensor's entry, lean (a million tensors): on any doubt `_entry_error` finds what is wrong."""
    if type(entry) is dict and len(entry) == 3:
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        dtype = dtypes.get(code) if type(code) is str else None
        if dtype is not None and type(offsets) is list and len(offsets) == 2:
            nbytes = _nbytes(shape, dtype.itemsize)
            begin, end = offsets
            if (
                nbytes is not None
                and type(begin) is int
                and type(end) is int
                and begin >= 0
                and end - begin == nbytes
                and (name.isascii() or not _unencodable(name))
            ):
                shape = tuple(shape)  # type: ignore[arg-type]
                return TensorInfo(name, dtype, shapes.setdefault(shape, shape), path, data_start + begin, nbytes)
    raise _entry_error(path, name, entry, dtypes)


def _nbytes(shape: object, itemsize: int) -> int | None:
    """Bytes of a tensor of this shape, or None unless safetensors and torch both take it (see the constants)."""
    if type(shape) is not list or len(shape) > _MAX_RANK:
        return None
    n = 1
    for d in shape:
        if type(d) is not int or d < 0 or d > _INT64_MAX:
            return None
        n *= d
        if n > _U64_MAX:
            return None
    n *= itemsize
    if n > _U64_MAX:
        return None
    if n == 0:
        stride = 1
        for d in shape[1:]:
            stride *= d or 1
            if stride > _INT64_MAX:
                return None
    return n


def _entry_error(path: Path, name: str, entry: object, dtypes: dict[str, torch.dtype]) -> InputError:
    """The first thing wrong with a tensor's entry, as an error naming the file, the tensor and the field."""
    if _unencodable(name):
        return InputError(
            f"{path}: a tensor name holds a lone surrogate escape ({_show.repr(name)}), which is not valid "
            "Unicode; the file is corrupt"
        )
    return InputError(f"{path}: tensor {_show.repr(name)}: {_entry_problem(entry, dtypes)}")


def _entry_problem(entry: object, dtypes: dict[str, torch.dtype]) -> str:
    corrupt = "the file is corrupt"
    if type(entry) is not dict:
        return f"the header entry is {_kind(entry)}, not an object with dtype, shape and data_offsets; {corrupt}"
    if missing := sorted(_ENTRY_FIELDS - entry.keys()):
        return f"the header entry has no {', '.join(missing)}; {corrupt}"
    if extra := sorted(entry.keys() - _ENTRY_FIELDS):
        return (
            f"the header entry has the unexpected field {_show.repr(extra[0])} (safetensors entries hold dtype, "
            f"shape and data_offsets only); {corrupt} or was written by another format"
        )
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(code) is not str:
        return f"dtype is {_kind(code)}, not a string like 'F32'; {corrupt}"
    if code not in dtypes and code in DTYPES:
        import safetensors

        return (
            f"dtype {code} cannot be loaded back by the installed safetensors {safetensors.__version__}, so no "
            f"output could hold it; convert the tensor to one of {', '.join(dtypes)}, or upgrade safetensors"
        )
    if code not in dtypes:
        return f"unknown dtype {_show.repr(code)}; expected one of {', '.join(dtypes)}"
    if type(shape) is not list:
        return f"shape is {_kind(shape)}, not a list of dimensions; {corrupt}"
    if len(shape) > _MAX_RANK:
        return f"shape has {len(shape)} dimensions, more than the {_MAX_RANK} accepted; {corrupt}"
    for i, d in enumerate(shape):
        if type(d) is not int or not 0 <= d <= _INT64_MAX:
            return (
                f"shape {_show.repr(shape)} has {_kind(d)} as dimension {i}, where dimensions are integers from 0 "
                f"to 2**63-1; {corrupt}"
            )
    nbytes = _nbytes(shape, dtypes[code].itemsize)
    if nbytes is None:  # every dimension is fine: the product or a stride overflows
        return (
            f"shape {_show.repr(shape)} of dtype {code} overflows 64-bit sizes or strides (safetensors or torch "
            f"would refuse it); {corrupt}"
        )
    pair = type(offsets) is list and len(offsets) == 2 and all(type(o) is int for o in offsets)
    if not (pair and 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {_show.repr(offsets)} are not [begin, end] with integers 0 <= begin <= end; {corrupt}"
    return (
        f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but dtype {code} and shape "
        f"{_show.repr(shape)} need {nbytes}; {corrupt}"
    )


def _check_layout(path: Path, infos: list[TensorInfo], data_start: int, size: int) -> None:
    """Tensors (sorted by offset, then size) must tile the data section exactly: no gap, overlap or overrun."""
    position = data_start
    for info in infos:
        end = info.offset + info.nbytes
        if end > size:
            raise InputError(
                f"{path}: tensor {_show.repr(info.name)} ends at byte {end - data_start} of the data section but "
                f"the file holds only {size - data_start} data bytes; the file is truncated (or its header is corrupt)"
            )
        if info.offset != position:
            what = "overlaps the previous tensor" if info.offset < position else "leaves a gap before it"
            raise InputError(
                f"{path}: tensor {_show.repr(info.name)} {what} (offset {info.offset - data_start}); "
                "the file is corrupt"
            )
        position = end
    if position != size:
        raise InputError(
            f"{path}: {size - position} bytes after the last tensor are not described by the header; "
            "the file is corrupt or was appended to"
        )


class CheckpointReader:
    """The tensors of one checkpoint (a file, or shards of one model), read one at a time, keys in file order.

    Example:
        >>> with CheckpointReader(["model.safetensors"]) as r:
        ...     w = r.read("lm_head.weight")
    """

    def __init__(self, files: Sequence[str | os.PathLike], *, label: str = "checkpoint"):
        self.label = label
        self.headers = [read_header(f) for f in files]
        self._infos: dict[str, TensorInfo] = {}
        for header in self.headers:
            if not self._infos.keys().isdisjoint(header.tensors):
                name = next(n for n in header.tensors if n in self._infos)
                raise InputError(
                    f"{label}: tensor {_show.repr(name)} is in two shards, {self._infos[name].path} and {header.path}; "
                    "the checkpoint's shards overlap"
                )
            self._infos.update(header.tensors)
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
        """Bytes [start, start + length) (default: to the end) of tensor `name` into uint8 CPU `out`; `out[:length]`."""
        info = self.info(name)
        length = info.nbytes - start if length is None else length
        if start < 0 or length < 0 or start + length > info.nbytes:
            raise ValueError(f"bytes [{start}, {start + length}) are outside tensor {name!r} ({info.nbytes} bytes)")
        _check_out(out, length)
        target = out[:length]
        if length:
            self._pread_exact(info.path, memoryview(target.numpy()), info.offset + start)
        return target

    def read_whole_into(self, names: Sequence[str], out: torch.Tensor) -> int:
        """Whole tensors `names`, back to back, into contiguous uint8 CPU `out` (adjacent ones in one pread); bytes."""
        infos = [self.info(name) for name in names]
        total = sum(info.nbytes for info in infos)
        _check_out(out, total)
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
                    f"{path}: the file ended at byte {offset + done} while reading; "
                    "it was truncated or replaced during the merge"
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


def _check_out(out: torch.Tensor, n: int) -> None:
    if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < n:
        raise ValueError(f"out must be a contiguous uint8 CPU tensor of at least {n} bytes")
