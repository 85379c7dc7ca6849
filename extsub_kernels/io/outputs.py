"""Where outputs go: the path rules every kind of output follows, checked before any work.

An OUT ending in `.safetensors` is one file; any other OUT is a folder. Several outputs of
one run get `-lam<label>` suffixes. An OUT is never onto, into or around an input, and an
existing OUT is replaced only when forced and only when it is an output of the same kind.
"""

import os
from collections.abc import Sequence
from pathlib import Path

from extsub_kernels.errors import InputError
from extsub_kernels.io.resolve import CONFIG_PATTERNS, ResolvedInput

SAFETENSORS_SUFFIX = ".safetensors"


def is_folder_output(path: str | os.PathLike) -> bool:
    """Whether OUT is a folder (any path not ending in .safetensors) rather than one file.

    Example:
        >>> is_folder_output("merged/"), is_folder_output("merged.safetensors")
        (True, False)
    """
    return Path(path).suffix != SAFETENSORS_SUFFIX


def output_paths(out: Path, labels: Sequence[str]) -> list[Path]:
    """One OUT per label (λ setting): OUT itself for one, else OUT with `-lam<label>` before `.safetensors`
    (or after a folder's name): out.safetensors → out-lam0.5.safetensors, out/ → out-lam0.5/."""
    if len(labels) == 1:
        return [out]
    if is_folder_output(out):
        return [out.with_name(f"{out.name}-lam{label}") for label in labels]
    return [out.with_name(f"{out.stem}-lam{label}{SAFETENSORS_SUFFIX}") for label in labels]


def refuse_existing(path: Path, *, force: bool) -> None:
    """Raise an InputError when `path` exists and replacing it was not asked for."""
    if os.path.lexists(path) and not force:
        raise InputError(f"OUT {path} already exists; pass --force (force=True in Python) to replace it")


def check_outputs(paths: Sequence[Path], inputs: Sequence[tuple[str, ResolvedInput]], *, force: bool) -> None:
    """Refuse an OUT that is, is inside, or contains an input; or exists (without force); or cannot be replaced.

    Args:
        paths: the outputs of the run (one per λ setting).
        inputs: (role, input) pairs, the role (EXPERT, ANTI, BASE) naming it in messages.
        force: an existing OUT may be replaced, when it is an output of the same kind (a file,
            or a folder holding only checkpoint files).

    Raises:
        InputError: naming the OUT, the input and what to do.
    """
    for path in paths:
        _check_apart_from_inputs(path, inputs)
        if not os.path.lexists(path):
            continue
        refuse_existing(path, force=force)
        wants_folder = is_folder_output(path)
        if wants_folder != (path.is_dir() and not path.is_symlink()):
            kind = "a folder" if path.is_dir() else "a file"
            raise InputError(f"OUT {path} exists and is {kind}; --force only replaces an output of the same kind")
        if wants_folder:
            strangers = [p.name for p in path.iterdir() if not _is_checkpoint_file(p)]
            if strangers:
                raise InputError(
                    f"OUT {path} holds files that are not part of a checkpoint (e.g. {strangers[0]!r}); "
                    "--force replaces only checkpoint folders"
                )


def check_report_folder(
    folder: Path, names: Sequence[str], inputs: Sequence[tuple[str, ResolvedInput]], *, force: bool
) -> None:
    """Refuse a folder for report files (a λ scan's SCAN_DIR) that cannot take them, before any work.

    The folder may exist (other files in it are left alone) or not (it is created when the
    first file is written). Refused: a folder that is, is inside or contains an input; a path
    that is a file; a folder already holding one of `names`, unless `force` (they are then replaced).

    Raises:
        InputError: naming the folder, the input or the file in the way, and what to do.
    """
    _check_apart_from_inputs(folder, inputs)
    if os.path.lexists(folder) and not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder; give a folder for the scan's files")
    present = [name for name in names if os.path.lexists(folder / name)]
    if present and not force:
        raise InputError(
            f"{folder} already holds {', '.join(present)} (an earlier scan?); pass --force (force=True in Python) "
            "to replace them, or give another folder"
        )


def _check_apart_from_inputs(path: Path, inputs: Sequence[tuple[str, ResolvedInput]]) -> None:
    target = path.resolve()
    for role, inp in inputs:
        if inp.kind in ("folder", "hub"):
            root = inp.root.resolve()
            if target == root:
                raise InputError(f"OUT {path} is the {role} folder; choose another OUT (inputs are never overwritten)")
            if root in target.parents:
                raise InputError(f"OUT {path} is inside the {role} folder {inp.root}; choose another OUT")
        for f in inp.files:
            real = f.resolve()
            if real == target or f.absolute() == path.absolute():
                raise InputError(
                    f"OUT {path} is the {role} file {f}; choose another OUT (inputs are never overwritten)"
                )
            if target in real.parents:
                raise InputError(f"OUT {path} contains the {role} file {f}; choose another OUT")


def _is_checkpoint_file(p: Path) -> bool:
    return p.is_file() and (p.suffix == SAFETENSORS_SUFFIX or any(p.match(pat) for pat in CONFIG_PATTERNS))
