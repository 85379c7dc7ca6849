"""Temporary names beside an output (`.NAME.extsub-tmp-PID-[old-]XXXXXXXX`), each under an exclusive `flock` until
published or removed; the next run into the folder removes those whose owner is gone (no such PID, lock free) and
puts back an old OUT a killed run set aside. A temporary of a live process is never touched."""

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
import warnings
from pathlib import Path

from extsub_kernels.constants import TEMP_TAG

_TEMP_NAME = re.compile(rf"^\.(?P<name>.+){re.escape(TEMP_TAG)}(?P<pid>[0-9]+)-(?P<old>old-)?[0-9a-f]{{8}}$", re.DOTALL)

_held: dict[Path, int] = {}  # our temporaries → the descriptor holding the lock on each


def temp_path(target: Path, *, old: bool = False) -> Path:
    """A fresh temporary name beside `target` for this process (`old`: where a replaced OUT waits); a name too long
    for the tag becomes a byte prefix, `~` and a hash, so it never fails where the target would not."""
    tail = f"{TEMP_TAG}{os.getpid()}-{'old-' if old else ''}{secrets.token_hex(4)}"
    name = os.fsencode(target.name)
    room = name_max(target.parent) - len(os.fsencode(f".{tail}"))
    if len(name) > room:
        digest = hashlib.sha256(name).hexdigest()[:_DIGEST]
        name = name[: max(room - _DIGEST - 1, 0)] + f"~{digest}".encode()
    return target.parent / f".{os.fsdecode(name)}{tail}"


_DIGEST = 16
_SHORTENED = re.compile(rf"~[0-9a-f]{{{_DIGEST}}}$")  # how a shortened name ends


def name_max(folder: Path) -> int:
    """The longest file name (bytes) on the file system of `folder` (or its nearest existing parent); else 255."""
    for place in (folder, *folder.parents):
        try:
            return os.pathconf(place, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def hold(path: Path) -> None:
    """Take the owner's lock on a temporary just created (without locks, the PID in its name protects it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held[path] = fd


def release(path: Path) -> None:
    """Drop the lock on `path` (after it was published or removed)."""
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def move_hold(src: Path, dst: Path) -> None:
    """The temporary at `src` is now called `dst` (a rename keeps the lock, which belongs to the inode)."""
    fd = _held.pop(src, None)
    if fd is not None:
        _held[dst] = fd


def clean_stale(folder: Path) -> list[str]:
    """Remove dead runs' temporaries in `folder`, put back an OUT a killed one set aside; a line (and warning) each."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    done = []
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None or _owner_alive(int(match["pid"])):
            continue
        if action := _clean_one(folder / name, folder / match["name"], old=bool(match["old"]), pid=match["pid"]):
            done.append(action)
    for line in done:
        warnings.warn(line, stacklevel=2)
    return done


def _clean_one(path: Path, target: Path, *, old: bool, pid: str) -> str | None:
    try:
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:  # an OSError: locked by a live run (in another PID namespace), or no locks here: not ours to judge
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if old and _SHORTENED.search(target.name):
            return None  # an OUT set aside under a shortened name: where it belongs is not known, so it stays
        if old and not os.path.lexists(target):
            os.rename(path, target)
            return f"put back {target}, which a run killed while replacing it (PID {pid}) had set aside"
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return f"removed {path.name}, a temporary output left by a run that was killed (PID {pid})"
    except OSError:
        return None
    finally:
        os.close(fd)


def _owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # it exists but belongs to someone else; or no PID at all: leave it
        pass
    return True


def empty_folder(path: Path) -> bool:
    """Whether `path` is a real, empty folder: an OUT with nothing to lose, taken without force=True."""
    try:
        return path.is_dir() and not path.is_symlink() and not any(os.scandir(path))
    except OSError:
        return False
