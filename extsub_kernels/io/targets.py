"""Where an output may go: never onto, into or around an input; over an existing output only when forced.

Checked before any work, for every kind of output (dense checkpoints, adapters, full models).
"""

import os
from collections.abc import Sequence
from pathlib import Path

from extsub_kernels.errors import InputError
from extsub_kernels.io.resolve import CONFIG_PATTERNS, ResolvedInput


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
        target = path.resolve()
        for role, inp in inputs:
            if inp.kind != "file":
                root = inp.root.resolve()
                if target == root:
                    raise InputError(f"OUT {path} is the {role} folder; choose another OUT (inputs are never overwritten)")
                if root in target.parents:
                    raise InputError(f"OUT {path} is inside the {role} folder {inp.root}; choose another OUT")
            for f in inp.files:
                real = f.resolve()
                if real == target or f.absolute() == path.absolute():
                    raise InputError(f"OUT {path} is the {role} file {f}; choose another OUT (inputs are never overwritten)")
                if target in real.parents:
                    raise InputError(f"OUT {path} contains the {role} file {f}; choose another OUT")
        if not os.path.lexists(path):
            continue
        if not force:
            raise InputError(f"OUT {path} already exists; pass --force (force=True) to replace it")
        wants_folder = path.suffix != ".safetensors"
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


def _is_checkpoint_file(p: Path) -> bool:
    return p.is_file() and (p.suffix == ".safetensors" or any(p.match(pat) for pat in CONFIG_PATTERNS))
