"""Tiny checkpoints for the merge tests: files, shard folders, a hub cache, and before/after snapshots."""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from extsub_kernels.constants import TEMP_TAG


def random_delta(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random float tensors of the given shapes (task vectors: small, centred)."""
    return {name: (0.02 * torch.randn(shape)).to(dtype) for name, shape in shapes.items()}


SHAPES = {
    "model.layers.0.mlp.down_proj.weight": (24, 40),
    "model.layers.0.self_attn.q_proj.weight": (40, 40),
    "model.layers.0.input_layernorm.weight": (40,),
    "model.layers.1.mlp.down_proj.weight": (24, 40),
    "lm_head.weight": (97, 40),
    "conv.weight": (8, 3, 2, 2),
}


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def save_shards(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int, *, index: bool = True) -> Path:
    """`tensors` split over `n_shards` files in `folder`, with a Hugging Face index when `index`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n_shards]}
        save(folder / shard, part, {"format": "pt"})
        weight_map.update({k: shard for k in part})
    if index:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    return folder


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (symlinks followed), by relative path."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary outputs left anywhere under `root`."""
    return [str(p) for p in root.rglob("*") if TEMP_TAG in p.name]


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """A `huggingface_hub` cache entry for `repo_id` at `commit` (refs/main → commit), as the library lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
