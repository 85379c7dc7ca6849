"""The one reader of every small file a user names (a recipe, a JSON config, a scan's text sets): bounded.

A regular file only, and at most `limit` bytes: a FIFO, a device (`/dev/zero`, `/dev/urandom`),
a socket or a folder is refused at once, never read (opening does not wait for a FIFO's
writer), and a file that grows past the limit while it is read is refused too. The size is
checked before anything is read, so nothing unbounded is allocated.
"""

import os
import stat
from pathlib import Path

from extsub_kernels.errors import InputError

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def read_bounded(path: Path, what: str, limit: int, *, error: type[InputError] = InputError) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; `error` naming `what` and the file otherwise.

    Example:
        >>> read_bounded(Path("recipe.yaml"), "--config", 1 << 20)  # doctest: +SKIP
        b'expert: ...'
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as e:
        raise error(f"{what} {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        mode, size = (st := os.fstat(fd)).st_mode, st.st_size
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise error(f"{what} {path} is {kind}; give a regular file")
        if size > limit:
            raise error(f"{what} {path} is {size} bytes; it may take at most {limit}")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while chunk := os.read(fd, min(limit + 1 - total, 1 << 20) or 1):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise error(f"{what} {path} grew past {limit} bytes while it was read")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_bounded_text(path: Path, what: str, limit: int, *, error: type[InputError] = InputError) -> str:
    """`read_bounded` decoded as UTF-8; `error` for bytes that are not UTF-8."""
    data = read_bounded(path, what, limit, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path}: cannot be read as UTF-8 text (byte {e.start} is not UTF-8)") from None
