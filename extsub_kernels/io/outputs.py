"""Where outputs go, checked before any work: an OUT ending in `.safetensors` is a file, any other a folder, several
get `-lam<label>` suffixes; none is onto, into or around an input or another output (by identity, `identity.where`);
an existing OUT is replaced only when forced, by one of its kind, never a mount point."""

import json
import os
import stat
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

from extsub_kernels.constants import CARD_NAME, INDEX_SUFFIX, SAFETENSORS_SUFFIX
from extsub_kernels.errors import InputError
from extsub_kernels.io.files import file_kind, options_named
from extsub_kernels.io.identity import file_id, folder_chain, is_mount_point, where
from extsub_kernels.io.resolve import ResolvedInput
from extsub_kernels.io.temps import clean_stale, empty_folder, name_max

# The mark of a model card this tool wrote (a README.md without it is someone else's).
GENERATED_MARK = "<!-- written by extsub-merge; extsub-merge --force may replace this folder -->"


def is_folder_output(path: str | os.PathLike) -> bool:
    """Whether OUT is a folder (any path not ending in .safetensors) rather than one file.

    Example:
        >>> is_folder_output("merged/"), is_folder_output("merged.safetensors")
        (True, False)
    """
    return Path(path).suffix != SAFETENSORS_SUFFIX


def out_path(out: str | os.PathLike) -> Path:
    """OUT as a path with a name (`.`, `..`, `x/..` become the folder they denote); InputError for the root folder.

    Example:
        >>> out_path("merged.safetensors")
        PosixPath('merged.safetensors')
    """
    path = Path(out)
    if path.name in ("", ".", ".."):
        path = Path(os.path.realpath(path))
    if not path.name:
        raise InputError(f"OUT {os.fspath(out)!r} is the root folder; give a file or folder to write")
    return path


def output_paths(out: Path, labels: Sequence[str]) -> list[Path]:
    """One OUT per λ label: OUT itself for one, else out-lam0.5.safetensors or out-lam0.5/."""
    if len(labels) == 1:
        return [out]
    if is_folder_output(out):
        return [out.with_name(f"{out.name}-lam{label}") for label in labels]
    return [out.with_name(f"{out.stem}-lam{label}{SAFETENSORS_SUFFIX}") for label in labels]


def _error(message: str, *named: str) -> InputError:
    """An InputError whose message names each of `named` ("OUT x", "report=x", "force="), with their Python options."""
    return InputError(message, options=options_named(*named))


def refuse_existing(path: Path, *, force: bool, what: str | None = None) -> None:
    """InputError when `path` (`what`: "OUT path") exists without `force`, or is no regular file or folder."""
    what = what or f"OUT {path}"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise _error(f"{what} cannot be examined: {getattr(e, 'strerror', None) or e}", what) from None
    if not force:
        raise _error(f"{what} already exists; pass force=True to replace it", "force=", what)
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise _error(f"{what} is {file_kind(mode)}; force= replaces only regular files and folders", "force=", what)


def check_outputs(
    paths: Sequence[Path],
    inputs: Sequence[tuple[str, ResolvedInput]],
    *,
    force: bool,
    others: Sequence[tuple[str, Path]] = (),
    read: Sequence[tuple[str, Path]] = (),
) -> None:
    """Refuse an OUT that is, is in or holds an input or output, exists (without force; an empty folder is taken)
    or cannot be replaced.

    Args:
        paths: the outputs of the run (one per λ setting).
        inputs: (role, input) pairs, the role (EXPERT, ANTI, BASE) naming it in messages.
        force: replace an OUT of the same kind (a regular file, or a folder of what this tool wrote, `written_names`).
        others, read: (what, path) of the run's other outputs (a report, scan files) and other files it reads.

    Raises:
        InputError: naming the OUT, the input and what to do.
    """
    for parent in dict.fromkeys(Path(os.path.realpath(p.parent)) for p in paths):
        clean_stale(parent)
    _check_apart([*((f"OUT {p}", p) for p in paths), *others], inputs, read)
    for path in paths:
        if not os.path.lexists(path):
            continue
        refuse_existing(path, force=force or (is_folder_output(path) and empty_folder(path)))
        if is_mount_point(path):
            raise InputError(
                f"OUT {path} is a mount point, which cannot be replaced; write to a path inside it or elsewhere"
            )
        wants_folder = is_folder_output(path)
        if wants_folder != (path.is_dir() and not path.is_symlink()):
            kind = "a folder" if path.is_dir() else "a file"
            raise _error(
                f"OUT {path} exists and is {kind}; force=True only replaces an output of the same kind", "force="
            )
        if wants_folder:
            written = written_names(path)
            strangers = sorted(
                (p.name for p in path.iterdir() if not _is_checkpoint_file(p, written)), key=lambda n: n != CARD_NAME
            )  # a card not ours explains the rest: name it first
            if strangers:
                raise _error(
                    f"OUT {path} holds files extsub-merge did not write there (e.g. {strangers[0]!r}); "
                    "force=True replaces only folders holding what extsub-merge wrote (or weights alone)",
                    "force=",
                )


def check_report_path(
    path: Path,
    inputs: Sequence[tuple[str, ResolvedInput]],
    outputs: Sequence[Path],
    *,
    force: bool,
    read: Sequence[tuple[str, Path]] = (),
) -> None:
    """Refuse (InputError naming the file and what to do) a report file that is a folder, is or is in an input or an
    output, or exists (without force) and is no regular file; a FIFO or character device is written into, never
    replaced (`is_stream`)."""
    what = f"report={path}"
    if path.is_dir():
        raise _error(f"{what} is a folder; give a file name like report.json (or - for stdout)", what)
    _check_apart([(what, path), *((f"OUT {p}", p) for p in outputs)], inputs, read)
    if not is_stream(path):
        refuse_existing(path, force=force, what=what)


def is_stream(path: Path) -> bool:
    """Whether `path` leads (symlinks followed) to a FIFO or a character device: written into, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _check_apart(
    outputs: Sequence[tuple[str, Path]],
    inputs: Sequence[tuple[str, ResolvedInput]] = (),
    read: Sequence[tuple[str, Path]] = (),
) -> None:
    """No output (what, path) is, holds or lies in an input, a file read or another output, however spelled
    (symlinks, bind mounts, hard links), nor has a name longer than its file system takes."""
    for what, path in outputs:
        size, longest = len(os.fsencode(path.name)), name_max(path.parent)
        if size > longest:
            raise _error(f"{what}: the name is {size} bytes, the file system takes at most {longest}; shorten it", what)
    places = [(what, where(path)) for what, path in outputs]
    for (what, place), (_, path) in zip(places, outputs, strict=True):
        _check_apart_from_inputs(path, inputs, what)
        for name, file in read:
            other = where(file)
            if place == other or other.inside(place):
                verb = "is" if place == other else "holds"
                raise _error(f"{what} {verb} {name}, which this run reads; choose another path", what)
    for (what_a, a), (what_b, b) in combinations(places, 2):
        if a == b:
            raise _error(f"{what_a} and {what_b} are the same path; give each output a path of its own", what_a, what_b)
        if a.inside(b) or b.inside(a):
            inner, outer = (what_a, what_b) if a.inside(b) else (what_b, what_a)
            raise _error(f"{inner} is inside {outer}; write it beside, not into, the other output", inner, outer)


def check_report_folder(
    folder: Path,
    names: Sequence[str],
    inputs: Sequence[tuple[str, ResolvedInput]],
    *,
    force: bool,
    label: str = "SCAN_DIR",
    others: Sequence[tuple[str, Path]] = (),
    read: Sequence[tuple[str, Path]] = (),
) -> None:
    """Refuse a folder for report files (a scan's SCAN_DIR, an inspection's; `label` in messages) that cannot take
    `names`: one that is, is in or holds an input; a file; a file of `names` that is, holds or lies in an output
    of `others` or a file `read`; one holding any of `names`, unless `force`. Other files in it are left alone.
    The InputError names the folder, the input or the file in the way, and what to do."""
    _check_apart_from_inputs(folder, inputs, f"{label} {folder}")
    if os.path.lexists(folder) and not folder.is_dir():
        raise InputError(f"{label} {folder} exists and is not a folder; give a folder for {', '.join(names)}")
    if folder.is_dir():
        clean_stale(folder)
    _check_apart([*((f"{label} file {folder / name}", folder / name) for name in names), *others], inputs, read)
    present = [name for name in names if os.path.lexists(folder / name)]
    if present and not force:
        raise InputError(
            f"{folder} already holds {', '.join(present)} (an earlier run?); pass force=True to replace them, or give "
            "another folder",
            options=("force",),
        )
    for name in present:
        refuse_existing(folder / name, force=force, what=f"{label} file {folder / name}")


def _check_apart_from_inputs(path: Path, inputs: Sequence[tuple[str, ResolvedInput]], what: str) -> None:
    """Refuse a path written (`what`) that is an input, lies in an input folder or holds an input file."""
    target = file_id(path)
    holders = {identity: folder for folder, identity in folder_chain(path)}
    other = "OUT" if what.startswith("OUT ") else "path"
    for role, inp in inputs:
        if inp.kind in ("folder", "hub"):
            root = file_id(inp.root)
            if root is not None and root == target:
                raise _error(
                    f"{what} is the {role} folder; choose another {other} (inputs are never overwritten)", what
                )
            if root in holders:
                via = "" if Path(os.path.realpath(inp.root)) == holders[root] else f", reached as {holders[root]}"
                raise _error(f"{what} is inside the {role} folder {inp.root}{via}; choose another {other}", what)
        for f in (*inp.files, *inp.config_files):
            identity = file_id(f)
            if identity is not None and identity == target:
                raise _error(
                    f"{what} is the {role} file {f}; choose another {other} (inputs are never overwritten)", what
                )
            if target is not None and any(target == folder for _, folder in folder_chain(f)):
                raise _error(f"{what} contains the {role} file {f}; choose another {other}", what)


def _is_checkpoint_file(p: Path, written: frozenset[str]) -> bool:
    """Whether force=True may replace `p`: a regular file this tool wrote (`written_names`), or weights."""
    if p.is_symlink() or not p.is_file():
        return False
    return p.name in written or p.name.endswith((SAFETENSORS_SUFFIX, INDEX_SUFFIX))


_MANIFEST = "<!-- extsub-merge wrote: "


def manifest_line(names: Sequence[str]) -> str:
    """A model card's last line: the files this tool wrote into its folder (what force=True may replace later)."""
    listed = json.dumps(sorted(names), ensure_ascii=True).replace(">", "\\u003e")  # no name ends the comment
    return f"{_MANIFEST}{listed} -->\n"


def written_names(folder: Path) -> frozenset[str]:
    """The files this tool wrote into `folder`, as listed by the model card it wrote there (empty: none of ours)."""
    card = folder / CARD_NAME
    try:
        if not stat.S_ISREG(os.lstat(card).st_mode):
            return frozenset()
        with open(card, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return frozenset()
    start = text.rfind(_MANIFEST)
    if GENERATED_MARK not in text[: 1 << 16] or start < 0:
        return frozenset()
    try:
        names = json.loads(text[start + len(_MANIFEST) :].split(" -->", 1)[0])
    except ValueError:
        return frozenset()
    return frozenset(n for n in names if isinstance(n, str)) if isinstance(names, list) else frozenset()


def listed_files(path: Path) -> list[tuple[str, int]]:
    """(name, bytes) of an output: the file itself, or every file of a folder output by relative name."""
    if not path.is_dir():
        return [(path.name, path.stat().st_size)]
    return sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file())
