"""Input specs → files: single files, shard folders, adapters, pickles, and hub ids from a real cache layout."""

import json
import os
import time

import pytest
import torch

from extsub_kernels.adapters import owns_adapter_key
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, resolve_input

from checkpoints import make_hub_cache, save, save_shards

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_file(tmp_path):
    path = save(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    inp = resolve_input(str(path))
    assert inp.kind == "file" and inp.files == (path,) and not inp.adapter and inp.name == "w.safetensors"


def test_a_folder_with_an_index_lists_its_shards_in_order(tmp_path):
    folder = save_shards(tmp_path / "m", {f"t{i}": torch.zeros(1) for i in range(6)}, 3)
    (folder / "config.json").write_text("{}")
    inp = resolve_input(folder)
    assert [p.name for p in inp.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [p.name for p in inp.config_files] == ["config.json"] and inp.config() == {}


def test_a_folder_without_an_index_takes_every_safetensors_file(tmp_path):
    folder = save_shards(tmp_path / "m", {f"t{i}": torch.zeros(1) for i in range(4)}, 2, index=False)
    assert len(resolve_input(folder).files) == 2


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = save_shards(tmp_path / "m", {f"t{i}": torch.zeros(1) for i in range(4)}, 2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="lists shard 'model-00002-of-00002.safetensors', which is not a file"):
        resolve_input(folder)


def test_an_index_that_maps_a_tensor_to_the_wrong_shard_is_refused(tmp_path):
    folder = save_shards(tmp_path / "m", {f"t{i}": torch.zeros(1) for i in range(4)}, 2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["t0"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        InputError, match="maps tensor 't0' to model-00002-of-00002.safetensors but it is in model-00001"
    ):
        resolve_input(folder)


def test_peft_adapters_are_flagged_with_their_config(tmp_path):
    folder = tmp_path / "adapter"
    save(folder / "adapter_model.safetensors", {"base_model.model.q.lora_A.weight": torch.zeros(2, 4)})
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    inp = resolve_input(folder)
    assert inp.adapter and inp.files == (folder / "adapter_model.safetensors",)
    assert inp.config("adapter_config.json") == {"r": 2, "lora_alpha": 4}
    bare = folder / "adapter_model.safetensors"
    assert resolve_input(bare, adapter_key=owns_adapter_key).adapter, "a bare file with lora_A / lora_B keys"
    assert not resolve_input(bare).adapter, "the keys' rule is the adapter family's, passed in"
    dense = save(tmp_path / "dense.safetensors", {"q.weight": torch.zeros(1)})
    assert not resolve_input(dense, adapter_key=owns_adapter_key).adapter


@pytest.mark.parametrize(
    "key", ["base_model.model.q.lora_B.weight", "base_model.model.mlp.down_proj.ia3_l", "prompt_embeddings"]
)
def test_bare_weights_of_every_adapter_type_are_adapters_never_dense_checkpoints(tmp_path, key):
    bare = save(tmp_path / "bare" / "weights.safetensors", {key: torch.ones(1, 4)})
    found = [resolve_input(p, adapter_key=owns_adapter_key).adapter for p in (bare, bare.parent)]
    assert found == [True, True], key


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_pickle_files_are_refused_with_a_conversion_hint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x02pickle")
    with pytest.raises(InputError, match=r"pickle checkpoints can run code.*save_file\(torch.load") as info:
        resolve_input(path, role="EXPERT")
    assert str(path) in str(info.value) and "EXPERT" in str(info.value)


def test_a_folder_of_pickles_is_refused_with_a_conversion_hint(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(InputError, match="only pickle weights .pytorch_model.bin.*save_pretrained"):
        resolve_input(tmp_path / "m")


def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="no .safetensors files"):
        resolve_input(tmp_path)


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(InputError, match="ANTI .*nope.safetensors.: no such file or folder"):
        resolve_input(tmp_path / "nope.safetensors", role="ANTI")


def test_hub_ids_resolve_from_the_cache_offline(tmp_path, offline_cache):
    weights = save(tmp_path / "src" / "model.safetensors", {"w": torch.randn(3, 3)})
    snapshot = make_hub_cache(
        offline_cache,
        "org/name",
        {"model.safetensors": weights.read_bytes(), "config.json": b'{"model_type": "llama"}'},
        COMMIT,
    )
    for spec in ("org/name", f"org/name@{COMMIT}", "org/name@main"):
        inp = resolve_input(spec, role="EXPERT", quiet=True)
        assert inp.kind == "hub" and inp.name == spec and inp.root == snapshot
        assert [p.name for p in inp.files] == ["model.safetensors"] and inp.files[
            0
        ].read_bytes() == weights.read_bytes()
        assert inp.config() == {"model_type": "llama"}
        assert inp.commit == COMMIT, "the commit read is reported, whatever revision named it"
    assert resolve_input(weights).commit is None


def test_a_hub_id_neither_local_nor_cached_offline_is_a_clear_error(offline_cache):
    with pytest.raises(
        InputError,
        match=r"EXPERT 'org/absent': no such file or folder, and as a Hugging Face repo id it is offline "
        r".*not in the cache",
    ):
        resolve_input("org/absent", role="EXPERT", quiet=True)
    with pytest.raises(InputError, match="not in the cache"):
        resolve_input(f"org/absent@{COMMIT}", role="EXPERT", quiet=True)


def _outside_the_cache(tmp_path, cache, repo="org/name"):
    """A snapshot-like folder outside the cache, and the revision that walks huggingface_hub there:
    refs/<revision> resolves to a file holding a path from snapshots/ to the folder."""
    outside = tmp_path / "outside"
    save(outside / "snap" / "model.safetensors", {"w": torch.zeros(2)})
    storage = cache / f"models--{repo.replace('/', '--')}"
    (outside / "ref").write_text(os.path.relpath(outside / "snap", storage / "snapshots"))
    return os.path.relpath(outside / "ref", storage / "refs"), outside


@pytest.mark.parametrize(
    "revision",
    [
        "TRAVERSAL",
        "../main",
        "/etc",
        "a//b",
        "a\\b",
        "..",
        ".hidden",
        "a/../b",
        "a..b",
        "main/",
        "",
        "ü",
        "a b",
        "x" * 300,
    ],
)
def test_hub_revisions_are_branch_tag_or_commit_names(tmp_path, offline_cache, revision):
    make_hub_cache(
        offline_cache,
        "org/name",
        {"model.safetensors": save(tmp_path / "w.safetensors", {"w": torch.zeros(1)}).read_bytes()},
        COMMIT,
    )
    traversal, _ = _outside_the_cache(tmp_path, offline_cache)
    revision = traversal if revision == "TRAVERSAL" else revision
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(
        InputError,
        match=r"not a Hugging Face repo id\[@revision\] either: revision .* is not a branch, tag or commit hash",
    ):
        resolve_input(f"org/name@{revision}", role="EXPERT", quiet=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, (
        "nothing written in the cache or beside it"
    )


def test_a_damaged_ref_cannot_point_outside_the_cache(tmp_path, offline_cache):
    make_hub_cache(
        offline_cache,
        "org/name",
        {"model.safetensors": save(tmp_path / "w.safetensors", {"w": torch.zeros(1)}).read_bytes()},
        COMMIT,
    )
    _, outside = _outside_the_cache(tmp_path, offline_cache)
    (offline_cache / "models--org--name" / "refs" / "main").write_text((outside / "ref").read_text())
    with pytest.raises(
        InputError, match="the hub cache maps revision 'main' to .*outside.*which is not a snapshot folder of org/name"
    ):
        resolve_input("org/name", role="EXPERT", quiet=True)


@pytest.mark.parametrize("repo", ["org/na..me", "org--x/name", "org/name.git"])
def test_repo_ids_huggingface_hub_refuses_are_refused(offline_cache, repo):
    with pytest.raises(
        InputError, match=f"EXPERT '{repo}': no such file or folder, and it is not a Hugging Face repo id"
    ):
        resolve_input(repo, role="EXPERT", quiet=True)


def _no_network(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked")

    for method in ("repo_info", "model_info", "list_repo_tree", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, refuse, raising=False)


def test_a_cached_commit_is_used_without_the_network(tmp_path, offline_cache, monkeypatch):
    weights = save(tmp_path / "w.safetensors", {"w": torch.zeros(3)})
    snapshot = make_hub_cache(offline_cache, "org/name", {"model.safetensors": weights.read_bytes()}, COMMIT)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _no_network(monkeypatch)
    start = time.perf_counter()
    inp = resolve_input(f"org/name@{COMMIT}", role="EXPERT", quiet=True)
    assert inp.root == snapshot and inp.commit == COMMIT and time.perf_counter() - start < 5


def test_another_commit_than_the_one_asked_is_never_used(tmp_path, offline_cache, monkeypatch):
    import huggingface_hub

    other = "f" * 40
    snapshot = make_hub_cache(
        offline_cache,
        "org/name",
        {"model.safetensors": save(tmp_path / "w.safetensors", {"w": torch.zeros(1)}).read_bytes()},
        other,
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(snapshot))
    with pytest.raises(InputError, match=f"asked for commit {COMMIT} but the hub served {other}; nothing was read"):
        resolve_input(f"org/name@{COMMIT}", role="EXPERT", quiet=True)


def test_an_input_resolved_then_read_has_its_headers_parsed_once(tmp_path):
    folder = save_shards(tmp_path / "m", {f"t{i}": torch.zeros(1) for i in range(4)}, 2)
    inp = resolve_input(folder)
    reader = CheckpointReader(inp.files)
    assert len(inp.headers) == 2 and all(a is b for a, b in zip(reader.headers, inp.headers, strict=True))


HOSTILE_INDEXES = {
    "nested 100000 deep": (
        '{"weight_map":' + "[" * 100_000 + "]" * 100_000 + "}",
        "unreadable shard index .JSON nested too deeply",
    ),
    "a 5000-digit integer": (
        '{"metadata":{"total_size":' + "9" * 5000 + '},"weight_map":{}}',
        "unreadable shard index .Exceeds the limit",
    ),
    "a shard name with a lone surrogate": (
        '{"weight_map":{"t0":"\\ud800.safetensors"}}',
        r"lists shard '\\ud800.safetensors', which is not a file",
    ),
    "a shard outside the folder": (
        '{"weight_map":{"t0":"../w.safetensors"}}',
        r"lists shard '../w.safetensors', which is not a file",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_INDEXES)
def test_hostile_shard_indexes_are_input_errors(tmp_path, case):
    text, message = HOSTILE_INDEXES[case]
    folder = save_shards(tmp_path / "m", {f"t{i}": torch.zeros(1) for i in range(2)}, 2)
    save(tmp_path / "w.safetensors", {"t0": torch.zeros(1)})
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(InputError, match=message) as info:
        resolve_input(folder)
    assert "model.safetensors.index.json" in str(info.value) and "\n" not in str(info.value)
