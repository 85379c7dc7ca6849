"""Where each input came from, enough to tell whether a rerun reads the same bytes: spec, folder, hub commit, and
per weights file its size and header sha256 (microseconds, where hashing tensor data costs a full read)."""

import hashlib
import os
from pathlib import Path

from extsub_kernels.errors import InputError
from extsub_kernels.io.format import HEADER_LENGTH_BYTES, MAX_HEADER_BYTES
from extsub_kernels.io.resolve import ResolvedInput


def header_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a safetensors file's header: its 8-byte length field and the JSON after it.

    Example:
        >>> header_sha256("model.safetensors")  # doctest: +SKIP
        '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
    """
    try:
        with open(path, "rb") as f:
            prefix = f.read(HEADER_LENGTH_BYTES)
            n = int.from_bytes(prefix, "little") if len(prefix) == HEADER_LENGTH_BYTES else 0
            body = f.read(min(n, MAX_HEADER_BYTES))
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    return hashlib.sha256(prefix + body).hexdigest()


def _hub_repo(spec: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of a hub spec `org/name[@revision]`."""
    repo, at, revision = spec.partition("@")
    return repo, (revision if at else None)


def pinned_spec(inp: ResolvedInput) -> str:
    """A spec that names exactly these bytes again: a hub id pinned to its commit, a local path made absolute.

    Example:
        >>> pinned_spec(resolve_input("org/model"))  # doctest: +SKIP
        'org/model@0123456789abcdef0123456789abcdef01234567'
    """
    if inp.kind == "hub":
        repo, revision = _hub_repo(inp.spec)
        return f"{repo}@{inp.commit or revision}" if (inp.commit or revision) else repo
    if inp.kind == "memory":
        return inp.spec
    return str(Path(inp.spec).expanduser().absolute())


def display_path(inp: ResolvedInput, path: Path) -> str:
    """A file of an input named the way the user named the input: the spec, joined with the file's place in it.

    Example:
        >>> display_path(resolve_input("models/expert/"), Path("models/expert/model.safetensors"))  # doctest: +SKIP
        'models/expert/model.safetensors'
    """
    if inp.kind in ("file", "memory"):
        return inp.spec
    inside = os.path.relpath(path, inp.root)
    return f"{inp.spec}: {inside}" if inp.kind == "hub" else os.path.join(inp.spec, inside)


def fingerprint(role: str, inp: ResolvedInput) -> dict:
    """What the report and the outputs' metadata record about one input.

    Returns:
        {"role", "spec", "kind", "path", "repo", "revision", "commit", "files": [{"name", "bytes",
        "header_sha256"}]}; hub and path keys only where they apply.
    """
    record: dict = {"role": role, "spec": inp.spec, "kind": inp.kind}
    if inp.kind == "memory":
        return record
    record["path"] = str(inp.files[0].absolute() if inp.kind == "file" else inp.root.absolute())
    if inp.kind == "hub":
        repo, revision = _hub_repo(inp.spec)
        record.update(repo=repo, revision=revision, commit=inp.commit)
    record["files"] = files = []
    for f in inp.files:
        name = f.name if inp.kind == "file" else os.path.relpath(f, inp.root)
        files.append({"name": name, "bytes": f.stat().st_size, "header_sha256": header_sha256(f)})
    return record
