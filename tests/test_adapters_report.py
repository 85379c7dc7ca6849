"""What adapter merges say about their modules: the summary, the items, and adapters that print as shapes."""

import pytest
import torch

from extsub_kernels import LoraAdapter, LoraModule, merge, merge_adapters
from extsub_kernels.adapters.report import AdapterReport, summarize_modules
from extsub_kernels.errors import InputError

from checkpoints import hashes


def _module(out: int, r: int, inp: int) -> LoraModule:
    return LoraModule(torch.randn(r, inp), torch.randn(out, r), 2.0)


def test_an_adapter_prints_its_shapes_and_counts_never_its_tensors():
    adapter = LoraAdapter(
        {"layers.0.q": _module(64, 4, 32), "layers.0.v": _module(64, 8, 32)},
        source="expert/",
        base_model_name_or_path="org/base",
        extra={"lm_head.weight": torch.zeros(10, 32)},
    )
    text = repr(adapter)
    assert text == (
        "LoraAdapter('expert/', 2 LoRA modules (r 4–8, 1,152 parameters), 1 non-LoRA tensor (lm_head.weight), "
        "base_model='org/base')"
    )
    assert repr(adapter.modules["layers.0.q"]) == "LoraModule(out=64, in=32, r=4, scaling=2, float32)"
    merged = merge_adapters(adapter, LoraAdapter({"layers.0.q": _module(64, 2, 32)}), 1.0)
    assert repr(merged).startswith("MergedAdapter('ext-sub of expert/ and <memory>', 2 LoRA modules (r 6–8,")
    assert "tensor(" not in repr(merged) + repr(adapter)


def test_nothing_truncated_is_said_so_not_as_max_zero():
    report = AdapterReport("ext-sub", (1.0,), merged=["q"], truncation_error={"q": 0.0})
    assert summarize_modules([report]).endswith("no module above --max-rank, nothing truncated")
    report.truncation_error["q"] = 0.25
    assert "relative truncation error (Frobenius) max 0.25 (q), mean 0.25" in summarize_modules([report])


def test_adapters_with_no_common_module_are_refused_naming_them(tmp_path):
    expert = LoraAdapter({"model.layers.0.self_attn.q_proj": _module(8, 2, 8)}, source="e")
    anti = LoraAdapter({"model.layers.0.mlp.up_proj": _module(8, 2, 8)}, source="a")
    with pytest.raises(InputError, match=r"no LoRA module is in both EXPERT \(e\) and the anti-expert\(s\)") as error:
        merge(expert, anti, tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj" in str(error.value) and "model.layers.0.mlp.up_proj" in str(error.value)
    assert hashes(tmp_path) == {}
