"""The one reader of every small file a user names (a recipe, a JSON config, a scan's text sets): a regular file
of at most `limit` bytes (checked first and while it grows); anything else is refused at once, never waited on."""

import os
import re
import stat
from pathlib import Path

from extsub_kernels.errors import InputError

_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def file_kind(mode: int) -> str:
    """What a file that is no regular file is, from its `st_mode`, for a message: "a FIFO", "a folder", ..."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def options_named(*named: str) -> tuple[str, ...]:
    """The Python options among labels a message names ("report=x", "force=", not "OUT x"), for `InputError.options`."""
    return tuple(m[1] for name in named if (m := re.match(r"(\w+)=", name)))


def read_bounded_text(path: Path, what: str, limit: int, *, error: type[InputError] = InputError) -> str:
    """The text (UTF-8) of the regular file `path`, at most `limit` bytes; `error` naming `what` and the file otherwise.

    Example:
        >>> read_bounded_text(Path("recipe.yaml"), "config=", 1 << 20)  # doctest: +SKIP
        'expert: ...'
    """

    def fail(problem: str) -> InputError:
        return error(f"{what} {path}{problem}", options=options_named(what))

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        raise fail(f": cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        mode, size = (st := os.fstat(fd)).st_mode, st.st_size
        if not stat.S_ISREG(mode):
            raise fail(f" is {file_kind(mode)}; give a regular file")
        if size > limit:
            raise fail(f" is {size} bytes; it may take at most {limit}")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while chunk := os.read(fd, min(limit + 1 - total, 1 << 20) or 1):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise fail(f" grew past {limit} bytes while it was read")
        return b"".join(chunks).decode("utf-8")
    except OSError as e:
        raise fail(f": cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise fail(f": cannot be read as UTF-8 text (byte {e.start} is not UTF-8)") from None
    finally:
        os.close(fd)
