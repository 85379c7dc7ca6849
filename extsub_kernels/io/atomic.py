"""Whole-or-nothing outputs: write under a temporary name beside the target, fsync, rename.

Temporary paths are remembered until published or removed, and removed at interpreter exit
if something skipped the cleanup. Within `terminate_as_interrupt()`, SIGTERM raises like
Ctrl-C does, so the same cleanup runs for both.
"""

import atexit
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from extsub_kernels.errors import InputError, Terminated
from extsub_kernels.io.outputs import refuse_existing

_live: set[Path] = set()
_TEMP_TAG = ".extsub-tmp-"


def reserve_temp(target: Path, *, folder: bool) -> Path:
    """A fresh temporary path beside `target` (a created empty folder when `folder`, else a free name).

    Creates the target's parent folders. Raises InputError when they cannot be created or
    written to (this is the early check that an output location is usable).
    """
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {parent}: {e.strerror or e}") from None
    temp = parent / f".{target.name}{_TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if folder:
            temp.mkdir()
        else:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            temp.unlink()
    except OSError as e:
        raise InputError(f"cannot write in {parent}: {e.strerror or e}") from None
    _live.add(temp)
    return temp


def publish(temp: Path, target: Path, *, force: bool) -> None:
    """Move `temp` to `target` (replacing it when `force`), then fsync the folder holding it."""
    fsync_path(temp)
    if os.path.lexists(target):
        refuse_existing(target, force=force)
        aside = target.parent / f".{target.name}{_TEMP_TAG}old-{secrets.token_hex(4)}"
        _live.add(aside)
        os.rename(target, aside)
        try:
            os.rename(temp, target)
        except BaseException:
            os.rename(aside, target)
            _live.discard(aside)
            raise
        _live.discard(temp)
        remove(aside)
    else:
        os.rename(temp, target)
        _live.discard(temp)
    fsync_path(target.parent)


def remove(path: Path) -> None:
    """Delete a file or folder tree if it exists."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    _live.discard(path)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entries for renames; every file inside for folders we wrote)."""
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                fsync_path(child)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write a small text file and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_file(target: Path, data: bytes) -> None:
    """Write `data` to `target` whole or not at all: a temporary file beside it, fsync, rename over it.

    For small files that are rewritten as they grow (a scan's results after every row): a
    reader, or a Ctrl-C at any moment, sees the previous version or the new one, never half.
    """
    temp = reserve_temp(target, folder=False)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    finally:
        remove(temp)
    fsync_path(target.parent)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (a KeyboardInterrupt), so cleanup runs as for Ctrl-C.

    Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@atexit.register
def _remove_leftovers() -> None:
    for path in list(_live):
        remove(path)
