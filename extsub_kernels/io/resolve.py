"""Turn an input spec (a file, a folder of shards, a hub repo id) into the safetensors files to read (pickles refused
with the command that converts them), adapters recognised, config files exposed beside the weights."""

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from extsub_kernels.constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ENV_HF_CACHE,
    ENV_HF_HOME,
    ENV_HF_OFFLINE,
    ENV_XDG_CACHE,
    INDEX_SUFFIX,
)
from extsub_kernels.errors import InputError
from extsub_kernels.io.files import read_bounded_text
from extsub_kernels.io.reader import Header, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A shard index of a million tensors takes ~130 MB; no config or index comes near this.
MAX_JSON_BYTES = 256_000_000
# Files beside the weights that describe the model: configs and tokenizers (never weights).
CONFIG_PATTERNS = ("*.json", "*.jinja", "tokenizer.model", "spiece.model", "merges.txt", "vocab.txt", "*.tiktoken")
# What is fetched from the hub: the weights and the files above, never pickle weights.
HUB_PATTERNS = ["*.safetensors", *CONFIG_PATTERNS]
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)
# A revision (branch, tag, commit) becomes a path in the hub cache (refs/<revision>): a plain git ref name only.
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*", re.ASCII)
_MAX_REVISION = 255
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_CONVERT_HINT = (
    "pickle checkpoints can run code when loaded and are not read. Convert it once to safetensors, e.g. "
    '`python -c "import torch; from safetensors.torch import save_file; '
    "save_file(torch.load('{path}', weights_only=True), '{stem}.safetensors')\"`, "
    "or for a transformers model folder: "
    "`AutoModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`"
)


@dataclass(frozen=True)
class ResolvedInput:
    """An input, resolved to local files.

    Attributes:
        spec: the spec as given (path or `org/name[@revision]`); name: a short display name.
        kind: "file", "folder", "hub", or "memory" (an adapter given as a Python object: no files).
        root: the folder holding the files (a file's own folder for kind "file").
        files: the safetensors weight files, in shard order; config_files: config and tokenizer files beside them.
        adapter: a PEFT adapter folder (adapter_config.json), or weights whose keys are an adapter's.
        commit: for a hub repo, the commit of the snapshot read (the revision resolved); None for local inputs.
        headers: the headers of `files` read while resolving (so reading the input parses them once).
    """

    spec: str
    name: str
    kind: str
    root: Path
    files: tuple[Path, ...]
    config_files: tuple[Path, ...] = field(default=())
    adapter: bool = False
    commit: str | None = None
    headers: tuple[Header, ...] = field(default=(), repr=False, compare=False)

    def config_file(self, filename: str) -> Path | None:
        """The config file called `filename` (e.g. "config.json"), if the input has one."""
        return next((p for p in self.config_files if p.name == filename), None)

    def config(self, filename: str = "config.json") -> dict | None:
        """A JSON config file parsed, or None when absent."""
        path = self.config_file(filename)
        return None if path is None else read_json_object(path)


def read_json_object(path: Path, what: str = "JSON config", *, error: type[InputError] = InputError) -> dict:
    """A JSON file holding one object, parsed; else an `error` naming the file and `what` it is."""
    text = read_bounded_text(path, what, MAX_JSON_BYTES, error=error)
    try:
        loaded = json.loads(text)
    except RecursionError:
        raise error(f"{path}: unreadable {what} (JSON nested too deeply)") from None
    except ValueError as e:  # bad JSON, an integer of thousands of digits
        raise error(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(loaded, dict):
        raise error(f"{path}: expected a JSON object ({what}), found {type(loaded).__name__}")
    return loaded


def resolve_input(
    spec: str | os.PathLike,
    *,
    role: str = "input",
    quiet: bool = False,
    adapter_key: Callable[[str], bool] | None = None,
) -> ResolvedInput:
    """Resolve `spec` to local safetensors files.

    Args:
        spec: a `.safetensors` file; a folder with `*.safetensors.index.json` or `*.safetensors` files, or a PEFT
            adapter folder; or a hub repo id `org/name[@revision]` (from the cache when `HF_HUB_OFFLINE=1`).
        role: what the input is (EXPERT, ANTI, BASE), for error messages.
        quiet: no download progress bars.
        adapter_key: whether a tensor name is an adapter's (`adapters.owns_adapter_key`): such weights are an adapter.

    Raises:
        InputError: the spec is missing, a pickle file, has no safetensors weights, or an unreachable repo id.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    keys = adapter_key or (lambda _key: False)
    if path.is_file():
        return _resolve_file(text, path, role, keys)
    if path.is_dir():
        return _resolve_folder(text, path, role, keys, kind="folder", name=path.resolve().name)
    repo, at, revision = text.partition("@")
    if _HUB_REPO.fullmatch(repo) and not text.endswith(".safetensors"):
        return _resolve_hub(text, repo, revision if at else None, role, quiet, keys)
    raise InputError(f"{role} {text!r}: no such file or folder")


def hub_repo_id(name: str | None) -> str | None:
    """The hub repo id `name` is by `resolve_input`'s rule (org/name[@revision], not a local path), or None."""
    if not isinstance(name, str) or not name or Path(name).expanduser().exists():
        return None
    repo = name.partition("@")[0]
    return repo if _HUB_REPO.fullmatch(repo) and not name.endswith(".safetensors") else None


def _resolve_file(spec: str, path: Path, role: str, adapter_key: Callable[[str], bool]) -> ResolvedInput:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"{role} {path}: " + _CONVERT_HINT.format(path=path, stem=path.with_suffix("")))
    header = read_header(path)
    adapter = any(map(adapter_key, header.tensors))
    return ResolvedInput(spec, path.name, "file", path.resolve().parent, (path,), adapter=adapter, headers=(header,))


def _resolve_folder(
    spec: str, folder: Path, role: str, adapter_key: Callable[[str], bool], *, kind: str, name: str
) -> ResolvedInput:
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    configs = tuple(
        p for p in entries if any(p.match(pat) for pat in CONFIG_PATTERNS) and not p.name.endswith(INDEX_SUFFIX)
    )
    if (folder / ADAPTER_CONFIG).is_file():
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            _refuse_pickles(folder, entries, role, what=f"a PEFT adapter without {ADAPTER_WEIGHTS}")
        return ResolvedInput(spec, name, kind, folder, (weights,), configs, adapter=True)
    indexes = [p for p in entries if p.name.endswith(INDEX_SUFFIX)]
    if indexes:
        headers = _headers_from_index(folder, indexes, role)
        return ResolvedInput(spec, name, kind, folder, tuple(h.path for h in headers), configs, headers=headers)
    shards = tuple(p for p in entries if p.suffix == ".safetensors")
    if not shards:
        _refuse_pickles(folder, entries, role, what="no .safetensors files")
    headers = tuple(read_header(p) for p in shards)
    # Adapter weights without their config are still an adapter (asked for its config), never a dense checkpoint.
    adapter = any(adapter_key(k) for h in headers for k in h.tensors)
    return ResolvedInput(spec, name, kind, folder, shards, configs, adapter=adapter, headers=headers)


def _refuse_pickles(folder: Path, entries: list[Path], role: str, *, what: str) -> None:
    pickles = [p for p in entries if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise InputError(
            f"{role} {folder}: {what}, only pickle weights ({pickles[0].name}); "
            + _CONVERT_HINT.format(path=pickles[0], stem=pickles[0].with_suffix(""))
        )
    raise InputError(f"{role} {folder}: {what}; expected model.safetensors, shards with an index, or an adapter")


def _headers_from_index(folder: Path, indexes: list[Path], role: str) -> tuple[Header, ...]:
    """The headers of the shards an index lists, in name order, checked against its weight_map."""
    index = next((p for p in indexes if p.name == "model" + INDEX_SUFFIX), None)
    if index is None:
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise InputError(f"{role} {folder}: several shard indexes ({names}); pass the shards of one model")
        index = indexes[0]
    weight_map = read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: not a shard index (expected JSON with a weight_map of tensor name → file name)")
    files = []
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if not _is_plain_name(name) or not shard.is_file():
            raise InputError(f"{index}: lists shard {name!r}, which is not a file in {folder}")
        files.append(shard)
    listed = {k: folder / v for k, v in weight_map.items()}
    headers = tuple(read_header(shard) for shard in files)
    for header in headers:
        for key in header.tensors:
            if listed.get(key, header.path) != header.path:
                raise InputError(f"{index}: maps tensor {key!r} to {listed[key].name} but it is in {header.path.name}")
    return headers


def _is_plain_name(name: str) -> bool:
    """A file name with no folder part that the file system can take (no lone surrogate)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return name not in ("", ".", "..") and Path(name).name == name and "\0" not in name


def _hub_cache_dir() -> str:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    cache = next((os.environ[name] for name in ENV_HF_CACHE if os.environ.get(name)), None)
    if cache:
        return os.path.expanduser(cache)
    home = os.environ.get(ENV_HF_HOME) or os.path.join(os.environ.get(ENV_XDG_CACHE, "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _hub_offline() -> bool:
    flag = next((os.environ[name] for name in ENV_HF_OFFLINE if os.environ.get(name)), "")
    return flag.upper() in ("1", "ON", "YES", "TRUE")


def _check_revision(revision: str) -> None:
    """Raise ValueError unless `revision` is a plain branch, tag or commit name (see `_REVISION`)."""
    if len(revision) > _MAX_REVISION or not _REVISION.fullmatch(revision) or ".." in revision:
        raise ValueError(
            f"revision {revision!r} is not a branch, tag or commit hash (ASCII letters, digits and _ . + - in "
            "/-separated parts, none empty or starting with '.', no '..')"
        )


def _resolve_hub(
    spec: str, repo: str, revision: str | None, role: str, quiet: bool, adapter_key: Callable[[str], bool]
) -> ResolvedInput:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
        validate_repo_id,
    )

    not_local = f"{role} {spec!r}: no such file or folder, and"
    try:
        validate_repo_id(repo)
        if revision is not None:
            _check_revision(revision)
    except ValueError as e:  # HFValidationError is a ValueError
        raise InputError(f"{not_local} it is not a Hugging Face repo id[@revision] either: {e}") from None
    offline = _hub_offline()
    cache = _hub_cache_dir()
    was_disabled = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        folder = None
        if revision is not None and COMMIT_HASH.fullmatch(revision) and not offline:
            # A commit never moves: a cached snapshot is used without the network (no ~25 s of retries).
            try:
                folder = snapshot_download(
                    repo, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=HUB_PATTERNS
                )
            except Exception:
                folder = None
        if folder is None:
            folder = snapshot_download(
                repo, revision=revision, cache_dir=cache, local_files_only=offline, allow_patterns=HUB_PATTERNS
            )
    except Exception as e:
        where = "offline (HF_HUB_OFFLINE=1), and not in the cache" if offline else "not in the cache and not reachable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(
            f"{not_local} as a Hugging Face repo id it is {where} ({type(e).__name__}: {reason})"
        ) from None
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()
    snapshot = Path(folder)
    commit = _snapshot_commit(spec, role, repo, revision, snapshot, cache)
    resolved = _resolve_folder(spec, snapshot, role, adapter_key, kind="hub", name=spec)
    return dataclasses.replace(resolved, commit=commit)


def _snapshot_commit(spec: str, role: str, repo: str, revision: str | None, snapshot: Path, cache: str) -> str:
    """The commit of `snapshot`, after checking it is that repo's snapshot folder in the cache."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(cache).expanduser().resolve() / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots"
    real = snapshot.resolve()
    if real.parent != snapshots or not COMMIT_HASH.fullmatch(real.name):
        raise InputError(
            f"{role} {spec!r}: the hub cache maps revision {revision or 'main'!r} to {str(snapshot)!r}, which is not "
            f"a snapshot folder of {repo} in the cache; the cache is damaged: delete {snapshots.parent} and download "
            "again"
        )
    if revision is not None and COMMIT_HASH.fullmatch(revision) and real.name != revision:
        raise InputError(
            f"{role} {spec!r}: asked for commit {revision} but the hub served {real.name}; nothing was read"
        )
    return real.name
