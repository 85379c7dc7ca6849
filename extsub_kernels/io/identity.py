"""What a path is (device and inode, every symlink followed), and whether an input stayed the same (its files'
identity, size and times, and a folder's checkpoint names)."""

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extsub_kernels.constants import MOUNT_INFO, SAFETENSORS_SUFFIX
from extsub_kernels.errors import MergeError
from extsub_kernels.io.resolve import CONFIG_PATTERNS, ResolvedInput

FileId = tuple[int, int]  # a file or folder as the kernel knows it: device and inode


def file_id(path: Path) -> FileId | None:
    """The identity of what `path` names, following symlinks; None when nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def folder_chain(path: Path) -> list[tuple[Path, FileId]]:
    """Every existing folder holding `path`'s real path, innermost first, with its identity."""
    return [(folder, i) for folder in Path(os.path.realpath(path)).parents if (i := file_id(folder)) is not None]


@dataclass(frozen=True)
class Place:
    """Where a path leads, existing or not: its deepest existing file or folder (by identity) and the names below."""

    anchor: FileId
    rest: tuple[str, ...]
    holders: frozenset[FileId] = field(compare=False)  # every existing folder above the anchor

    def inside(self, other: "Place") -> bool:
        """Whether this place lies strictly inside the folder `other` names (existing or to be created)."""
        if self.anchor == other.anchor:
            return len(self.rest) > len(other.rest) and self.rest[: len(other.rest)] == other.rest
        return not other.rest and other.anchor in self.holders


def where(path: Path) -> Place:
    """The `Place` of `path` (see there)."""
    real = Path(os.path.realpath(path))
    rest: list[str] = []
    while (anchor := file_id(real)) is None and real != real.parent:
        rest.append(real.name)
        real = real.parent
    if anchor is None:  # not even the root answers: compare by spelling
        anchor = (-1, -1)
    return Place(anchor, tuple(reversed(rest)), frozenset(identity for _, identity in folder_chain(real)))


def _state(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _change(old: os.stat_result | None, new: os.stat_result | None) -> str | None:
    """How a file changed between two `_state`s, in words (None: it did not)."""
    if new is None or old is None:
        return None if new is old else "it appeared" if old is None else "it was deleted or moved away"
    if (new.st_dev, new.st_ino) != (old.st_dev, old.st_ino):
        return "it was replaced by another file"
    if new.st_size != old.st_size:
        return f"its size went from {old.st_size} to {new.st_size} bytes"
    if new.st_mtime_ns != old.st_mtime_ns:
        return "it was written to"
    if new.st_ctime_ns != old.st_ctime_ns:
        return "its inode changed (written to, or its times or permissions were set)"
    return None


def _listing(folder: Path) -> frozenset[str] | None:
    """The names in `folder` that make up a checkpoint (weights, index, configs, tokenizers)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    return frozenset(
        n for n in names if n.endswith(SAFETENSORS_SUFFIX) or any(Path(n).match(p) for p in CONFIG_PATTERNS)
    )


class InputSnapshot:
    """The state of a run's inputs when it started, to check before anything is published that none changed.

    Example:
        >>> snapshot = InputSnapshot(inputs)  # doctest: +SKIP
        >>> ...  # read and write
        >>> snapshot.check()  # doctest: +SKIP
    """

    def __init__(
        self,
        inputs: Sequence[tuple[str, ResolvedInput]],
        *,
        reader: str = "the merge",
        then: str = "no output was published; run again once the inputs are stable",
    ):
        """`reader` and `then` word the error: who read the inputs, and what it means for the outputs."""
        self._inputs = [(role, inp) for role, inp in inputs if inp.kind != "memory"]
        self._reader, self._then = reader, then
        self._before = self._take()

    def _take(self) -> list[tuple[list[tuple[Path, os.stat_result | None]], frozenset[str] | None]]:
        return [
            (
                [(f, _state(f)) for f in dict.fromkeys((*inp.files, *inp.config_files))],
                _listing(inp.root) if inp.kind in ("folder", "hub") else None,
            )
            for _, inp in self._inputs
        ]

    def check(self) -> None:
        """Raise MergeError naming the input and the file when any changed since the snapshot was taken."""
        for (role, inp), (files, names), (files_now, names_now) in zip(
            self._inputs, self._before, self._take(), strict=True
        ):
            for (path, old), (_, new) in zip(files, files_now, strict=True):
                if (change := _change(old, new)) is not None:
                    raise MergeError(f"{role} {path} changed while {self._reader} read it ({change}); {self._then}")
            if names != names_now:
                added = sorted((names_now or frozenset()) - (names or frozenset()))
                removed = sorted((names or frozenset()) - (names_now or frozenset()))
                what = ", ".join([f"{n} added" for n in added[:3]] + [f"{n} removed" for n in removed[:3]])
                raise MergeError(
                    f"the {role} folder {inp.root} changed while {self._reader} read it ({what}); {self._then}"
                )


def is_mount_point(path: Path) -> bool:
    """Whether `path` is a folder something is mounted on, a bind mount included (it cannot be renamed or replaced)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        if os.path.ismount(path):
            return True
    except OSError:
        return False
    return os.path.realpath(path) in _mount_points()


def _mount_points() -> set[str]:
    """Where things are mounted, bind mounts included (Linux; paths unescaped from \\040)."""
    try:
        with open(MOUNT_INFO, encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.split(" ") for line in f]
    except OSError:
        return set()
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), parts[4]) for parts in fields if len(parts) > 4}
