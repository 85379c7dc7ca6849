"""Input specs → files: single files, shard folders, adapters, pickles, and hub ids from a real cache layout."""

import json

import pytest
import torch

from checkpoints import make_hub_cache, save, save_shards
from extsub_kernels.errors import InputError
from extsub_kernels.io import resolve_input

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
    with pytest.raises(InputError, match="maps tensor 't0' to model-00002-of-00002.safetensors but it is in model-00001"):
        resolve_input(folder)


def test_peft_adapters_are_flagged_with_their_config(tmp_path):
    folder = tmp_path / "adapter"
    save(folder / "adapter_model.safetensors", {"base_model.model.q.lora_A.weight": torch.zeros(2, 4)})
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    inp = resolve_input(folder)
    assert inp.adapter and inp.files == (folder / "adapter_model.safetensors",)
    assert inp.config("adapter_config.json") == {"r": 2, "lora_alpha": 4}
    assert resolve_input(folder / "adapter_model.safetensors").adapter, "a bare file with lora_A / lora_B keys"
    assert not resolve_input(save(tmp_path / "dense.safetensors", {"q.weight": torch.zeros(1)})).adapter


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
        offline_cache, "org/name", {"model.safetensors": weights.read_bytes(), "config.json": b'{"model_type": "llama"}'}, COMMIT
    )
    for spec in ("org/name", f"org/name@{COMMIT}", "org/name@main"):
        inp = resolve_input(spec, role="EXPERT", quiet=True)
        assert inp.kind == "hub" and inp.name == spec and inp.root == snapshot
        assert [p.name for p in inp.files] == ["model.safetensors"] and inp.files[0].read_bytes() == weights.read_bytes()
        assert inp.config() == {"model_type": "llama"}


def test_a_hub_id_neither_local_nor_cached_offline_is_a_clear_error(offline_cache):
    with pytest.raises(InputError, match=r"EXPERT 'org/absent': no such file or folder, and as a Hugging Face repo id it is offline .*not in the cache"):
        resolve_input("org/absent", role="EXPERT", quiet=True)
    with pytest.raises(InputError, match="not in the cache"):
        resolve_input(f"org/absent@{COMMIT}", role="EXPERT", quiet=True)
