"""merge(): the output equals the op applied tensor by tensor, for every input and output layout."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from extsub_kernels import AdapterOptions, ext_sub, merge
from extsub_kernels.errors import InputError
from extsub_kernels.io import read_header
from extsub_kernels.ops import subtract_

from checkpoints import SHAPES, hashes, leftovers, make_hub_cache, random_delta, save, save_shards
from helpers import TOLERANCES, assert_close_explained

SMALL_BLOCKS = 512  # bytes: forces every 2-D tensor to stream in several blocks of rows


def _expected(expert: dict, antis: list[dict], lams: list[float], method: str = "ext-sub") -> dict:
    """The op applied tensor by tensor (float tensors; others copied), anti-experts in order."""
    out = {}
    for name, p in expert.items():
        result = p.clone()
        if p.is_floating_point():
            for anti, lam in zip(antis, lams, strict=False):
                if name in anti:
                    if method == "ext-sub":
                        result = (
                            ext_sub(result, anti[name], lam)
                            if len(antis) == 1
                            else ext_sub(result.float(), anti[name], lam)
                        )
                    else:
                        result = subtract_(
                            result.clone() if len(antis) == 1 else result.float(),
                            anti[name],
                            lam if method == "sub" else -lam,
                        )
        out[name] = result.to(p.dtype)
    return out


def _assert_outputs(actual: dict, expected: dict) -> None:
    assert list(sorted(actual)) == list(sorted(expected))
    for name, e in expected.items():
        a = actual[name]
        assert a.dtype == e.dtype and a.shape == e.shape, name
        if e.is_floating_point():
            assert_close_explained(a, e, *TOLERANCES[e.dtype], what=name)
        else:
            assert torch.equal(a, e), name


@pytest.fixture
def pair(tmp_path):
    expert = random_delta(SHAPES, torch.bfloat16) | {"position_ids": torch.arange(7)}
    anti = random_delta(SHAPES, torch.bfloat16) | {"position_ids": torch.arange(7)}
    return expert, anti, save(tmp_path / "expert.safetensors", expert), save(tmp_path / "anti.safetensors", anti)


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCKS, 32 << 20], ids=["row blocks", "whole tensors"])
def test_single_files_equal_the_op_tensor_by_tensor(tmp_path, pair, block_bytes):
    expert, anti, e_path, a_path = pair
    report = merge(e_path, a_path, tmp_path / "out.safetensors", lam=0.7, block_bytes=block_bytes)
    out = load_file(tmp_path / "out.safetensors")
    # one step in bf16: the op itself, bit for bit
    for name in expert:
        expected = ext_sub(expert[name], anti[name], 0.7) if expert[name].is_floating_point() else expert[name]
        assert torch.equal(out[name], expected), name
    assert report.outputs == (tmp_path / "out.safetensors",)
    assert (report.tensors, report.merged, report.copied, report.skipped) == (7, 6, 1, 0)
    in_bytes = sum(t.numel() * t.element_size() for d in (expert, anti) for t in d.values() if t.is_floating_point())
    in_bytes += expert["position_ids"].numel() * 8  # copied tensors are read from the expert only
    assert report.bytes_read == in_bytes and report.bytes_written == (tmp_path / "out.safetensors").stat().st_size
    assert report.seconds > 0 and report.peak_rss_bytes > 0 and report.peak_gpu_bytes is None and report.device == "cpu"
    summary = report.summary()
    assert "7 tensors (6 merged, 1 copied) | read 30.20 kB, wrote" in summary, summary
    assert re.search(r" \| [\d.]+ m?s, [\d.]+ (kB|MB)/s \| ", summary), "units that fit a small job"


@pytest.mark.gpu
def test_on_cuda_the_output_equals_the_op_on_the_gpu(tmp_path, pair):
    expert, anti, e_path, a_path = pair
    report = merge(
        e_path, a_path, tmp_path / "out.safetensors", lam=[0.7, 2.0], device="cuda", block_bytes=SMALL_BLOCKS
    )
    assert report.peak_gpu_bytes and report.peak_gpu_bytes > 0 and report.device.startswith("cuda")
    for path, lam in zip(report.outputs, (0.7, 2.0), strict=False):
        out = load_file(path)
        for name in expert:
            if expert[name].is_floating_point():
                expected = ext_sub(expert[name].cuda(), anti[name].cuda(), lam).cpu()
                assert_close_explained(out[name], expected, *TOLERANCES[torch.bfloat16], what=name)
            else:
                assert torch.equal(out[name], expert[name])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tmp_path, pair):
    _, _, e_path, a_path = pair
    with pytest.raises(InputError, match="'cuda' was asked for but CUDA is not available here; use device=cpu"):
        merge(e_path, a_path, tmp_path / "out.safetensors", device="cuda")


def test_output_metadata_records_the_merge(tmp_path, pair):
    _, _, e_path, a_path = pair
    merge(e_path, a_path, tmp_path / "out.safetensors", lam=0.5, method="sub")
    meta = read_header(tmp_path / "out.safetensors").metadata
    assert meta["format"] == "pt" and meta["extsub.method"] == "sub" and json.loads(meta["extsub.lam"]) == [0.5]
    assert meta["extsub.expert"] == "expert.safetensors" and json.loads(meta["extsub.anti"]) == ["anti.safetensors"]
    assert meta["extsub.version"]


@pytest.mark.parametrize("method", ["ext-sub", "sub", "add"])
def test_each_method(tmp_path, pair, method):
    expert, anti, e_path, a_path = pair
    merge(e_path, a_path, tmp_path / "out.safetensors", lam=1.5, method=method, block_bytes=SMALL_BLOCKS)
    _assert_outputs(load_file(tmp_path / "out.safetensors"), _expected(expert, [anti], [1.5], method))
    if method == "add":
        name = "lm_head.weight"
        manual = (expert[name].float() + 1.5 * anti[name].float()).bfloat16()
        assert torch.equal(load_file(tmp_path / "out.safetensors")[name], manual)


def test_sharded_input_and_sharded_output(tmp_path):
    expert, anti = random_delta(SHAPES), random_delta(SHAPES)
    e_dir = save_shards(tmp_path / "expert", expert, 3)
    a_dir = save_shards(tmp_path / "anti", anti, 2, index=False)
    report = merge(e_dir, a_dir, tmp_path / "out", lam=1.0, max_shard_size=5000, block_bytes=SMALL_BLOCKS)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in files and len(files) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expert)
    out = {}
    for shard in set(index["weight_map"].values()):
        tensors = load_file(tmp_path / "out" / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 5000 or len(tensors) == 1, f"{shard}: {size} bytes in {len(tensors)} tensors"
        out |= tensors
    _assert_outputs(out, _expected(expert, [anti], [1.0]))
    assert report.outputs == (tmp_path / "out",)


def test_a_folder_output_under_the_shard_limit_is_one_model_safetensors(tmp_path, pair):
    _, _, e_path, a_path = pair
    merge(e_path, a_path, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "extsub_recipe.yaml",
        "model.safetensors",
    ]


def test_a_lam_list_writes_one_output_per_lam_from_one_read(tmp_path, pair):
    expert, anti, e_path, a_path = pair
    report = merge(e_path, a_path, tmp_path / "out.safetensors", lam=[0.5, 1, 2], block_bytes=SMALL_BLOCKS)
    names = ["out-lam0.5.safetensors", "out-lam1.safetensors", "out-lam2.safetensors"]
    assert [p.name for p in report.outputs] == names
    in_bytes = sum(t.numel() * t.element_size() for d in (expert, anti) for t in d.values()) - 7 * 8
    assert report.bytes_read == in_bytes, "the inputs are read once for all outputs"
    for name, lam in zip(names, (0.5, 1.0, 2.0), strict=False):
        out = load_file(tmp_path / name)
        for key in expert:
            expected = ext_sub(expert[key], anti[key], lam) if expert[key].is_floating_point() else expert[key]
            assert torch.equal(out[key], expected), (name, key)
        assert json.loads(read_header(tmp_path / name).metadata["extsub.lam"]) == [lam]


def test_two_anti_experts_apply_in_order(tmp_path):
    expert, anti1, anti2 = random_delta(SHAPES), random_delta(SHAPES), random_delta(SHAPES)
    paths = [save(tmp_path / f"{n}.safetensors", t) for n, t in (("e", expert), ("a1", anti1), ("a2", anti2))]
    merge(paths[0], paths[1:], tmp_path / "out.safetensors", lam="1:0.5", block_bytes=SMALL_BLOCKS)
    out = load_file(tmp_path / "out.safetensors")
    for name in expert:  # [θ⁺ ⊖ Ext(θ₁⁻)] ⊖ Ext(θ₂⁻), paper Table 4
        expected = ext_sub(ext_sub(expert[name], anti1[name], 1.0), anti2[name], 0.5)
        assert_close_explained(out[name], expected, *TOLERANCES[torch.float32], what=name)
    swapped = ext_sub(ext_sub(expert["lm_head.weight"], anti2["lm_head.weight"], 0.5), anti1["lm_head.weight"], 1.0)
    assert not torch.allclose(out["lm_head.weight"], swapped), "the order of anti-experts matters"


def test_lam_lists_with_two_anti_experts(tmp_path):
    expert, anti1, anti2 = random_delta(SHAPES), random_delta(SHAPES), random_delta(SHAPES)
    paths = [save(tmp_path / f"{n}.safetensors", t) for n, t in (("e", expert), ("a1", anti1), ("a2", anti2))]
    report = merge(paths[0], paths[1:], tmp_path / "out", lam="1,2:0.5")
    assert [p.name for p in report.outputs] == ["out-lam1_1", "out-lam2_0.5"]  # one suffix format per run
    out = load_file(tmp_path / "out-lam2_0.5" / "model.safetensors")
    expected = ext_sub(ext_sub(expert["lm_head.weight"], anti1["lm_head.weight"], 2.0), anti2["lm_head.weight"], 0.5)
    assert_close_explained(out["lm_head.weight"], expected, *TOLERANCES[torch.float32])


def test_output_dtype(tmp_path, pair):
    expert, anti, e_path, a_path = pair
    merge(e_path, a_path, tmp_path / "out.safetensors", dtype="float32")
    out = load_file(tmp_path / "out.safetensors")
    assert out["lm_head.weight"].dtype == torch.float32 and out["position_ids"].dtype == torch.int64
    expected = ext_sub(expert["lm_head.weight"].float(), anti["lm_head.weight"], 1.0)
    assert_close_explained(out["lm_head.weight"], expected, *TOLERANCES[torch.float32])


def test_a_result_that_overflows_the_output_dtype_is_refused(tmp_path):
    e = save(tmp_path / "e.safetensors", {"w": torch.full((4, 4), 6e4)})
    a = save(tmp_path / "a.safetensors", {"w": torch.full((4, 4), -6e4)})
    with pytest.raises(
        InputError, match=r"tensor 'w': the result at λ=1 overflows torch.float16 although the inputs are finite"
    ):
        merge(e, a, tmp_path / "out.safetensors", method="sub", dtype="float16")
    assert not (tmp_path / "out.safetensors").exists() and not leftovers(tmp_path)


def test_expert_only_keys_are_copied_and_anti_only_keys_follow_on_missing(tmp_path):
    expert = random_delta(SHAPES) | {"only.expert": torch.randn(3)}
    anti = random_delta(SHAPES) | {"only.anti": torch.randn(5)}
    e, a = save(tmp_path / "e.safetensors", expert), save(tmp_path / "a.safetensors", anti)
    with pytest.raises(
        InputError, match=r"1 tensor\(s\) of the anti-expert\(s\) are not in EXPERT: 'only.anti' \(ANTI\)"
    ):
        merge(e, a, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    report = merge(e, a, tmp_path / "skip.safetensors", on_missing="skip")
    out = load_file(tmp_path / "skip.safetensors")
    assert "only.anti" not in out and torch.equal(out["only.expert"], expert["only.expert"]) and report.skipped == 1
    merge(e, a, tmp_path / "copy.safetensors", on_missing="copy")
    assert torch.equal(load_file(tmp_path / "copy.safetensors")["only.anti"], anti["only.anti"])


def test_inputs_that_share_no_key_are_refused(tmp_path):
    e = save(tmp_path / "e.safetensors", {"model.w": torch.randn(2, 2)})
    a = save(tmp_path / "a.safetensors", {"w": torch.randn(2, 2)})
    with pytest.raises(InputError, match="share no tensor name .*'model.w'.*'w'"):
        merge(e, a, tmp_path / "out.safetensors", on_missing="skip")


def _gpt2_folder(path, tensors):
    save(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return path


def test_gpt2_conv1d_weights_pair_columns(tmp_path):
    shapes = {
        "h.0.attn.c_attn.weight": (16, 48),
        "h.0.mlp.c_fc.weight": (16, 64),
        "h.0.mlp.c_proj.weight": (64, 16),
        "wte.weight": (50, 16),
    }
    expert, anti = random_delta(shapes), random_delta(shapes)
    with pytest.warns(UserWarning, match="looks like a full model .config.json: gpt2. but no --base"):
        merge(
            _gpt2_folder(tmp_path / "e", expert),
            _gpt2_folder(tmp_path / "a", anti),
            tmp_path / "out.safetensors",
            block_bytes=SMALL_BLOCKS,
        )
    out = load_file(tmp_path / "out.safetensors")
    for name in shapes:
        if name == "wte.weight":  # an embedding: rows are tokens, as usual
            expected = ext_sub(expert[name], anti[name], 1.0)
        else:  # Conv1D stores (in, out): the op's rows are output features, the columns here
            expected = ext_sub(expert[name].t(), anti[name].t(), 1.0).t()
            assert not torch.allclose(expected, ext_sub(expert[name], anti[name], 1.0)), "the axis matters"
        assert_close_explained(out[name], expected, *TOLERANCES[torch.float32], what=name)


def test_base_round_trip_on_tensors(tmp_path):
    base = random_delta(SHAPES)
    expert = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    anti = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    paths = [save(tmp_path / f"{n}.safetensors", t) for n, t in (("e", expert), ("a", anti), ("b", base))]
    merge(paths[0], paths[1], tmp_path / "out.safetensors", base=paths[2], lam=0.8, block_bytes=SMALL_BLOCKS)
    out = load_file(tmp_path / "out.safetensors")
    for name in base:
        expected = base[name] + ext_sub(expert[name] - base[name], anti[name] - base[name], 0.8)
        assert_close_explained(out[name], expected, *TOLERANCES[torch.float32], what=name)


def test_base_full_model_round_trip_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    base_model = transformers.LlamaForCausalLM(config)
    theta0 = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    folders = {}
    for role in ("base", "expert", "anti"):
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict({k: v + (0.02 * torch.randn_like(v) if role != "base" else 0) for k, v in theta0.items()})
        model.save_pretrained(tmp_path / role, safe_serialization=True)
        folders[role] = tmp_path / role
    (folders["expert"] / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    (folders["expert"] / "tokenizer.model").write_bytes(b"sentencepiece stand-in")
    thetas = {role: load_file(folders[role] / "model.safetensors") for role in folders}

    merge(folders["expert"], folders["anti"], tmp_path / "merged", base=folders["base"], lam=1.2, block_bytes=4096)

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    state = merged.state_dict()
    for name, t0 in thetas["base"].items():
        expected = t0 + ext_sub(thetas["expert"][name] - t0, thetas["anti"][name] - t0, 1.2)
        assert_close_explained(state[name], expected, *TOLERANCES[torch.float32], what=name)
    copied = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "model.safetensors",
    } <= set(copied)
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == b"sentencepiece stand-in"


def test_hub_ids_merge_from_an_offline_cache(tmp_path, monkeypatch, pair):
    expert, anti, e_path, a_path = pair
    cache = tmp_path / "hub"
    make_hub_cache(cache, "org/expert", {"model.safetensors": e_path.read_bytes()}, "a" * 40)
    make_hub_cache(cache, "org/anti", {"model.safetensors": a_path.read_bytes()}, "b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = hashes(cache)
    merge("org/expert", f"org/anti@{'b' * 40}", tmp_path / "out.safetensors", lam=0.3)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["lm_head.weight"], ext_sub(expert["lm_head.weight"], anti["lm_head.weight"], 0.3))
    assert json.loads(read_header(tmp_path / "out.safetensors").metadata["extsub.anti"]) == [f"org/anti@{'b' * 40}"]
    assert hashes(cache) == before and not leftovers(tmp_path)


def test_an_adapter_with_a_dense_checkpoint_is_refused(tmp_path, pair):
    _, _, e_path, _ = pair
    adapter = save(tmp_path / "adapter.safetensors", {"base_model.model.q.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(
        InputError, match=r"ANTI .*adapter.safetensors' is a PEFT adapter but EXPERT .*expert.safetensors' is a dense"
    ):
        merge(e_path, adapter, tmp_path / "out.safetensors")
    with pytest.raises(
        InputError, match=r"--format \(output_format\) applies to adapter inputs; EXPERT .* is a dense checkpoint"
    ):
        merge(e_path, e_path, tmp_path / "out.safetensors", adapter=AdapterOptions(output_format="delta"))
    assert not (tmp_path / "out.safetensors").exists()


def test_merge_and_inspect_take_their_defaults_from_one_place():
    """The defaults of a run are spelled once (`_names`); merge(), inspect() and the commands read them."""
    import inspect as python_inspect

    from extsub_kernels import _names
    from extsub_kernels.analysis import inspect

    for function in (merge, inspect):
        parameters = python_inspect.signature(function).parameters
        assert parameters["lam"].default == _names.DEFAULT_LAM and parameters["device"].default == _names.DEFAULT_DEVICE
    assert python_inspect.signature(merge).parameters["dtype"].default == _names.DEFAULT_DTYPE
    assert python_inspect.signature(merge).parameters["on_missing"].default == _names.DEFAULT_ON_MISSING
