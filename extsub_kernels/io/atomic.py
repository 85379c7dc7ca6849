"""Whole-or-nothing outputs: written under a temporary name beside the target, fsynced, then published together by
`publish_all`, which holds Ctrl-C and SIGTERM back and undoes its moves on a failure; a replaced OUT keeps its name
until its successor takes it in one step (rename over a file; `renameat2(RENAME_EXCHANGE)` for a folder, else set
aside and put back on error, or by the next run: `temps`). Unpublished temporaries and their folders go at exit."""

import atexit
import contextlib
import ctypes
import errno
import itertools
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from extsub_kernels import _signals
from extsub_kernels.errors import InputError, Interrupted, PublishError, Terminated
from extsub_kernels.io import temps

_live: dict[Path, list[Path]] = {}  # temporary → the folders created for it (outermost first)


def reserve_temp(target: Path, *, folder: bool) -> Path:
    """A fresh, locked, empty temporary folder or file beside `target`, missing folders created (removed with it);
    InputError where it cannot be (the early check of OUT)."""
    parent = target.parent
    missing = list(itertools.takewhile(lambda path: not os.path.lexists(path), (parent, *parent.parents)))
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty_folders(missing[::-1])
        raise InputError(f"cannot create the output folder {parent}: {e.strerror or e}") from None
    created = missing[::-1]  # outermost first
    temp = temps.temp_path(target)
    try:
        if folder:
            temp.mkdir()
        else:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644))
        _live[temp] = created
        temps.hold(temp)
    except OSError as e:
        _live.setdefault(temp, created)
        remove(temp)
        raise InputError(f"cannot write in {target.parent}: {e.strerror or e}") from None
    return temp


def _remove_empty_folders(created: Sequence[Path]) -> None:
    """Remove folders made for an output while empty, innermost first (one holding a live temporary passes to it)."""
    for i in reversed(range(len(created))):
        try:
            created[i].rmdir()
        except OSError:
            heir = next((t for t in _live if created[i] in t.parents), None)
            if heir is not None:
                _live[heir] = list(dict.fromkeys([*created[: i + 1], *_live[heir]]))
            return


def remove(path: Path) -> None:
    """Delete a temporary (file or folder tree) if it exists, and the folders created for it if now empty."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        if os.path.lexists(path):  # a read-only file system answers EROFS for a name that is not there
            raise
    temps.release(path)
    _remove_empty_folders(_live.pop(path, []))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entries for renames; every file inside for folders we wrote)."""
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file() and not child.is_symlink():
                fsync_path(child)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str | bytes) -> None:
    """Write a small file (text as UTF-8) and fsync it."""
    with open(path, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())


def write_into(target: Path, data: bytes) -> None:
    """Write `data` into an existing FIFO or character device, never replacing it; a FIFO nobody reads fails (ENXIO)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OSError(e.errno, "nobody reads this FIFO", str(target)) from None
        raise
    try:
        os.set_blocking(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def replace_file(target: Path, data: bytes) -> None:
    """Write `data` to `target` whole or not at all, holding no signal back (a scan's growing results)."""
    temp = reserve_temp(target, folder=False)
    try:
        write_text(temp, data)
        os.replace(temp, target)
    finally:
        remove(temp)
    fsync_path(target.parent)


def publish(temp: Path, target: Path, *, force: bool) -> None:
    """Move one temporary output into place (see `publish_all`)."""
    publish_all([(temp, target)], force=force)


def publish_all(moves: Sequence[tuple[Path, Path]], *, force: bool) -> tuple[Path, ...]:
    """Move every (temporary, target) into place, fsynced, all or none; a target is replaced only with `force`, never
    left missing. Ctrl-C and SIGTERM wait until the moves (inside `terminate_as_interrupt`: the run) end, then raise
    `Interrupted`/`Terminated` whose `published` names the outputs in place.

    Raises:
        InputError: a target exists and `force` is not set (another run created it meanwhile).
        PublishError: a move failed and could not be undone; `published` says what is in place.
        OSError: a move failed; every move made before it was undone.
    """
    _signals.raise_unanswered()  # a Ctrl-C swallowed on its way (`_signals`) stops the run before anything moves
    if threading.current_thread() is not threading.main_thread():
        return _publish(moves, force)  # signals reach the main thread only
    if _run is None:  # outside a run, this call is one
        with terminate_as_interrupt():
            return publish_all(moves, force=force)
    _run.holding = True  # from the first move to the end of the run, signals wait
    published = _publish(moves, force)
    _run.published.extend(published)
    return published


def _publish(moves: Sequence[tuple[Path, Path]], force: bool) -> tuple[Path, ...]:
    # Per move: the target, where its predecessor waits (None: none), the folders created for it.
    done: list[tuple[Path, Path | None, list[Path]]] = []
    try:
        for temp, target in moves:
            fsync_path(temp)
            fsync_path(target.parent)
            old = _move_in(temp, target, force=force)
            temps.move_hold(temp, target)  # the lock is the new output's, wherever it now is
            done.append((target, old, _live.pop(temp, [])))
            if old is not None:
                _live.setdefault(old, [])
        for target, _, _ in done:
            fsync_path(target.parent)
    except BaseException as error:
        _undo(done, error)
        raise
    for target, old, _ in done:
        temps.release(target)
        if old is not None:
            remove(old)
    return tuple(target for target, _, _ in done)


def _move_in(temp: Path, target: Path, *, force: bool) -> Path | None:
    """Put `temp` at `target`; returns where the predecessor waits (None: there was none)."""
    if not os.path.lexists(target):
        try:
            _rename_noreplace(temp, target)
        except FileExistsError:
            raise _appeared(target) from None
        return None
    if not force and not (temp.is_dir() and temps.empty_folder(target)):
        raise _appeared(target)
    try:
        exchange(temp, target)
        return temp  # the swap left the old output at the temporary's name
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    aside = temps.temp_path(target, old=True)
    if not target.is_dir() or target.is_symlink():
        try:  # a second name for the old file, then one rename replaces it: the target is never missing
            os.link(target, aside, follow_symlinks=False)
            _live[aside] = []
            os.rename(temp, target)
            return aside
        except OSError:
            if aside in _live:
                remove(aside)
    os.rename(target, aside)
    _live[aside] = []
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(aside, target)
        _live.pop(aside, None)
        raise
    return aside


def _appeared(target: Path) -> InputError:
    return InputError(
        f"OUT {target} appeared while the merge ran; run again (with force=True to replace it)", options=("force",)
    )


def _undo(done: list[tuple[Path, Path | None, list[Path]]], error: BaseException) -> None:
    """Reverse the moves of a failed publish, last first; what cannot be reversed is attached to `error`."""
    stuck = []
    for target, old, created in reversed(done):
        try:
            if old is None:
                _live[target] = created
                remove(target)
            elif target.is_dir() and not target.is_symlink():
                try:
                    exchange(old, target)
                    remove(old)
                except OSError:
                    swapped = temps.temp_path(target)
                    os.rename(target, swapped)
                    os.rename(old, target)
                    _live.pop(old, None)
                    remove(swapped)
            else:
                os.rename(old, target)
                _live.pop(old, None)
            temps.release(target)
        except OSError:
            stuck.append(target)
    if stuck:
        published = tuple(reversed(stuck))
        raise PublishError(
            f"publishing the outputs failed ({type(error).__name__}: {error}) and could not be undone for "
            f"{', '.join(map(str, published))}: those are complete outputs of this run, the others were not written",
            published=published,
        ) from error


def exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); OSError(EINVAL/ENOSYS) where unsupported."""
    _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing with FileExistsError if `dst` exists (a plain rename would replace an empty folder)."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
# What renameat2 answers where the platform, the kernel or the file system cannot do a flag.
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)
_AT_FDCWD = -100


try:  # libc's renameat2 (Linux only)
    _renameat2_fn = ctypes.CDLL(None, use_errno=True).renameat2 if sys.platform.startswith("linux") else None
except (AttributeError, OSError):
    _renameat2_fn = None
if _renameat2_fn is not None:
    _renameat2_fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2_fn.restype = ctypes.c_int


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    if _renameat2_fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here")
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


@dataclass
class _RunSignals:
    """Signals during a run (`terminate_as_interrupt`): raised at once until the outputs start to move, then held."""

    holding: bool = False
    pending: list[int] = field(default_factory=list)
    published: list[Path] = field(default_factory=list)


_run: _RunSignals | None = None  # the run in progress in the main thread


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """One run's signals: SIGTERM raises `Terminated` (a KeyboardInterrupt) so cleanup runs as for Ctrl-C; from the
    first move of `publish_all` both wait until the block ends, then raise with `published` (as does any error after
    publishing). Ignored signals stay ignored; outside the main thread this does nothing."""
    global _run
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state, outer = _RunSignals(), _run

    def _handle(signum: int, frame: object) -> None:
        if state.holding:
            state.pending.append(signum)
        else:
            _signals.note(signum)
            raise _signals.exception_for(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _handle)
    _run = state
    try:
        yield
    except BaseException as error:
        if state.published and not getattr(error, "published", ()):  # failed after publishing: say what is in place
            with contextlib.suppress(AttributeError):
                error.published = tuple(state.published)  # type: ignore[attr-defined]
        raise
    finally:
        _run = outer
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state.pending:
        raise (Terminated if state.pending[0] == signal.SIGTERM else Interrupted)(published=tuple(state.published))


@atexit.register
def _remove_leftovers() -> None:
    """Last-chance clean-up at exit; what cannot be removed (a read-only file system) stays for `temps.clean_stale`."""
    for path in list(_live):
        try:
            remove(path)
        except OSError:
            _live.pop(path, None)
