"""What a path is, and whether an input stayed the same: files and folders compared by identity, not spelling.

Two paths name the same file or folder when they have the same device and inode, after every
symlink of every component is followed: `in/../in/a`, a symlinked parent, a hard link and a
bind mount all compare equal. An input is its files (each with its identity, size,
modification and change times) and, for a folder, the names in it that make up a checkpoint:
a file added to or removed from a folder input changes that input.
"""

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from extsub_kernels.errors import MergeError
from extsub_kernels.io.resolve import CONFIG_PATTERNS, ResolvedInput


@dataclass(frozen=True)
class FileId:
    """A file or folder as the kernel knows it: device and inode."""

    dev: int
    ino: int


def file_id(path: Path) -> FileId | None:
    """The identity of what `path` names, following symlinks; None when nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return FileId(st.st_dev, st.st_ino)


def folder_chain(path: Path) -> list[tuple[Path, FileId]]:
    """Every existing folder that holds `path` (its real parent, then the parent's parent, ...), with its identity.

    `path` itself is not included. Symlinks in its parents are followed first, so a folder
    reached through a link, a `..` or a bind mount shows up under its own identity.
    """
    chain = []
    for folder in Path(os.path.realpath(path)).parents:
        identity = file_id(folder)
        if identity is not None:
            chain.append((folder, identity))
    return chain


@dataclass(frozen=True)
class Place:
    """Where a path leads, whether or not it exists yet: the deepest existing file or folder on its way (by identity,
    every symlink followed) and the names below it that do not exist yet.

    Two paths are the same place when their places are equal, however they are spelled
    (`sub/../out`, a symlinked folder, a bind mount, a hard link of an existing file).
    """

    anchor: FileId
    rest: tuple[str, ...]
    holders: frozenset[FileId]  # every existing folder above the anchor

    def same(self, other: "Place") -> bool:
        return (self.anchor, self.rest) == (other.anchor, other.rest)

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
        anchor = FileId(-1, -1)
    return Place(anchor, tuple(reversed(rest)), frozenset(identity for _, identity in folder_chain(real)))


@dataclass(frozen=True)
class _FileState:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def change_from(self, before: "_FileState") -> str | None:
        if (self.dev, self.ino) != (before.dev, before.ino):
            return "it was replaced by another file"
        if self.size != before.size:
            return f"its size went from {before.size} to {self.size} bytes"
        if self.mtime_ns != before.mtime_ns:
            return "it was written to"
        if self.ctime_ns != before.ctime_ns:
            return "its inode changed (written to, or its times or permissions were set)"
        return None


def _state(path: Path) -> _FileState | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _listing(folder: Path) -> frozenset[str] | None:
    """The names in `folder` that make up a checkpoint (weights, index, configs, tokenizers)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    return frozenset(n for n in names if n.endswith(".safetensors") or any(Path(n).match(p) for p in CONFIG_PATTERNS))


_AGAIN = "no output was published; run again once the inputs are stable"


@dataclass(frozen=True)
class _InputState:
    role: str
    files: tuple[tuple[Path, _FileState | None], ...]
    folder: Path | None
    listing: frozenset[str] | None


class InputSnapshot:
    """The state of a run's inputs when it started, to check before anything is published that none changed.

    Example:
        >>> snapshot = InputSnapshot(inputs)  # doctest: +SKIP
        >>> ...  # read and write
        >>> snapshot.check()  # doctest: +SKIP
    """

    def __init__(self, inputs: Sequence[tuple[str, ResolvedInput]], *, reader: str = "the merge", then: str = _AGAIN):
        """`reader` and `then` word the error: who read the inputs, and what it means for the outputs."""
        self._inputs = [(role, inp) for role, inp in inputs if inp.kind != "memory"]
        self._reader, self._then = reader, then
        self._before = self._take()

    def _take(self) -> list[_InputState]:
        states = []
        for role, inp in self._inputs:
            files = tuple((f, _state(f)) for f in _unique((*inp.files, *inp.config_files)))
            folder = inp.root if inp.kind in ("folder", "hub") else None
            states.append(_InputState(role, files, folder, _listing(folder) if folder is not None else None))
        return states

    def check(self) -> None:
        """Raise MergeError naming the input and the file when any changed since the snapshot was taken."""
        for before, after in zip(self._before, self._take(), strict=True):
            for (path, old), (_, new) in zip(before.files, after.files, strict=True):
                if new is None:
                    change = "it was deleted or moved away" if old is not None else None
                elif old is None:
                    change = "it appeared"
                else:
                    change = new.change_from(old)
                if change is not None:
                    raise MergeError(
                        f"{before.role} {path} changed while {self._reader} read it ({change}); {self._then}"
                    )
            if before.listing != after.listing:
                added = sorted((after.listing or frozenset()) - (before.listing or frozenset()))
                removed = sorted((before.listing or frozenset()) - (after.listing or frozenset()))
                what = ", ".join([f"{n} added" for n in added[:3]] + [f"{n} removed" for n in removed[:3]])
                raise MergeError(
                    f"the {before.role} folder {before.folder} changed while {self._reader} read it ({what}); "
                    f"{self._then}"
                )


def _unique(paths: Iterable[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


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
    """Where things are mounted, from /proc/self/mountinfo (Linux; empty elsewhere): bind mounts within one
    file system look like plain folders to `os.path.ismount`."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.split(" ") for line in f]
    except OSError:
        return set()
    return {_unescape(parts[4]) for parts in fields if len(parts) > 4}


def _unescape(text: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)
