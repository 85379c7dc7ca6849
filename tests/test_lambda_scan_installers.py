"""Installers on their own: a point's LoRA install never forms ΔW (d×k), at any method or λ, with one or two
anti-experts; what it installs is the family merge (B'·A' equal to merge_adapters' ΔW')."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from extsub_kernels.adapters import LoraAdapter, LoraModule, merge_adapters
from extsub_kernels.lambda_scan.installers import LoraInstaller

from helpers import lazy_module

peft = lazy_module("peft")
transformers = lazy_module("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

# Wide enough that ΔW (out × in) dwarfs every factor ((out + in) × r): 448 × 320 against (448 + 320) × 12.
HIDDEN, INTERMEDIATE, RANKS = 320, 448, (4, 3, 5)
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op returns inside the block (views and copies included)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


def _model():
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _adapters(model) -> list[LoraAdapter]:
    """An expert and two anti-experts of different ranks on TARGETS, random A and B (different seeds)."""
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if name.endswith(TARGETS) and isinstance(module, torch.nn.Linear)
    }
    adapters = []
    for seed, rank in enumerate(RANKS):
        gen = torch.Generator().manual_seed(seed)
        modules = {
            name: LoraModule(torch.randn(rank, k, generator=gen), torch.randn(d, rank, generator=gen) * 0.1, 2.0)
            for name, (d, k) in shapes.items()
        }
        adapters.append(LoraAdapter(modules, source=f"random-{seed}", base_model_name_or_path="tiny-llama"))
    return adapters


@pytest.mark.parametrize("antis", [1, 2])
def test_a_lora_install_never_forms_delta_w(antis):
    model = _model()
    adapters = _adapters(model)[: 1 + antis]
    installer = LoraInstaller(adapters, ["ext-sub", "sub"])
    installer.attach(model, "tiny-llama")
    rank = sum(RANKS[: 1 + antis])
    bound = max(HIDDEN, INTERMEDIATE) * rank  # the largest factor B' (out × R) or A' (R × in)
    for method, lam in (("ext-sub", 0.0), ("ext-sub", 0.7), ("sub", 1.3), ("ext-sub", 2.0)):
        with LargestTensor() as probe:
            installer.install(method, lam)
        assert probe.numel <= bound, (method, lam, probe.shape)
        merged = merge_adapters(adapters[0], adapters[1:], lam, method)
        for name, (a, b) in installer.slots.items():
            expected = merged.modules[name].delta(torch.float64)  # the oracle may form ΔW; the install must not
            assert torch.allclose(b.double() @ a.double(), expected, rtol=1e-5, atol=1e-6), (method, lam, name)


def test_a_value_the_slots_dtype_cannot_hold_is_an_error():
    """`put` copies a merged tensor into a parameter and refuses one that overflows the parameter's dtype."""
    from extsub_kernels.errors import MergeError
    from extsub_kernels.lambda_scan.installers.base import put

    slot = torch.zeros(3, dtype=torch.float16)
    put(slot, torch.tensor([1.0, 2.0, 6e4], dtype=torch.float64), "vector v", "sub", 1.0)
    assert slot.tolist() == [1.0, 2.0, 60000.0]
    with pytest.raises(
        MergeError,
        match=r"vector v: the merge at sub λ=2 does not fit the model's float16 \(values up to 1\.2e\+05 beyond",
    ):
        put(slot, torch.tensor([1.0, 2.0, 1.2e5], dtype=torch.float64), "vector v", "sub", 2.0)
