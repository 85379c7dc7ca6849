"""What adapter merges say about their modules: the summary line, and what a merge with nothing in common says."""

import pytest
import torch

from extsub_kernels import LoraAdapter, LoraModule, merge
from extsub_kernels.adapters.report import AdapterReport, summarize_modules
from extsub_kernels.errors import InputError

from checkpoints import hashes


def _module(out: int, r: int, inp: int) -> LoraModule:
    return LoraModule(torch.randn(r, inp), torch.randn(out, r), 2.0)


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
