"""Tiny models and PEFT adapters made by PEFT itself, and the oracle the LoRA tests compare against.

Models are built from configs with random weights (`transformers`), adapters with
`peft.get_peft_model(..., init_lora_weights=False)` so B ≠ 0. The expected ΔW of each input
comes from PEFT's own `get_delta_weight`, never from our reader, and the expected result from
the dense op applied to it in float64 (`expected_deltas`).
"""

import copy
import warnings

import torch

from extsub_kernels import ext_sub_reference, subtract_

from helpers import assert_close_explained, lazy_module

peft = lazy_module("peft")
transformers = lazy_module("transformers")

SEED = 1234  # the tiny models and adapters are fixed; the merge math is fuzzed in test_lora.py
TOKENS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 0, 11, 73, 28, 90]])
EPS32 = torch.finfo(torch.float32).eps


def tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


# Expert and anti-experts differ in r, alpha and target modules; one uses rsLoRA, one a
# rank_pattern and an alpha_pattern.
LLAMA_ADAPTERS = {
    "expert": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 6},
        alpha_pattern={"k_proj": 2},
    ),
    "anti": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]),
    "anti2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
}
GPT2_ADAPTERS = {
    "expert": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_rslora=True),
    "anti": dict(
        r=6, lora_alpha=3, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, rank_pattern={"c_proj": 2}
    ),
}


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
ADAPTERS = {"llama": LLAMA_ADAPTERS, "gpt2": GPT2_ADAPTERS}


def make_adapters(model, specs, folder, train=None) -> dict[str, str]:
    """PEFT adapters of `model`, one per spec (LoraConfig fields), saved in `folder`.

    `train(peft_model)` edits each before it is saved."""
    paths = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(SEED + 1 + i)
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **spec))
        if train is not None:
            train(peft_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def peft_model(base, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def peft_deltas(base, adapter_dir) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT computes it, as (out, in) in float64 (Conv1D's transpose undone)."""
    model = peft_model(base, adapter_dir)
    deltas = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer) and "default" in layer.lora_A:
            delta = layer.get_delta_weight("default").double()
            deltas[name] = delta.T if layer.fan_in_fan_out else delta
    return deltas


def expected_deltas(base, expert_dir, anti_dirs, lams, method) -> dict[str, torch.Tensor]:
    """ΔW' by the dense op on PEFT's own ΔW, anti-expert after anti-expert (float64 oracle)."""
    result = peft_deltas(base, expert_dir)
    for anti_dir, lam in zip(anti_dirs, lams, strict=False):
        for name, m in peft_deltas(base, anti_dir).items():
            if name not in result:
                if method == "ext-sub":
                    continue  # |p| = 0 ⇒ Ext = 0: nothing to apply
                result[name] = torch.zeros_like(m)
            if method == "ext-sub":
                result[name] = ext_sub_reference(result[name], m, lam)
            else:
                result[name] = subtract_(result[name].clone(), m, lam if method == "sub" else -lam)
    return result


def with_deltas(base, deltas: dict[str, torch.Tensor], transposed: bool):
    """A copy of the base model with W += ΔW' ((out, in) deltas; Conv1D weights are (in, out))."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = modules[name].weight
            weight += (delta.T if transposed else delta).to(weight.dtype)
    return model


def logit_tolerance(reference: torch.Tensor) -> float:
    """atol/scale for float32 logits of the same model evaluated two ways.

    PEFT computes x·Wᵀ + s·(x·Aᵀ)·Bᵀ in float32, the reference x·(W + ΔW')ᵀ: each matmul
    rounds over ≤ 128 terms (≤ 128·eps32 relative to |x|·|W|), and two layers of attention,
    MLP and RMSNorm/LayerNorm carry that to the logits with a gain of a few units. 2⁻¹⁴ of
    max|logits| (≈ 512 eps32) bounds it with margin (observed: ≤ 2e-6). Real errors are far
    above it: the deltas here are as large as the weights, and a 1 % error in a single
    module's ΔW' moves the logits by ≥ 1.5e-3 of max|logits|.
    """
    return 2.0**-14


def check_logits(actual_model, expected_model, what):
    expected = logits(expected_model)
    assert_close_explained(logits(actual_model), expected, 0.0, logit_tolerance(expected), what)
