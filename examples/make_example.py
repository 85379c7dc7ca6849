"""Generate the bundled example: a tiny pair of dense task vectors (ΔW) shaped like a 2-layer LLaMA.

The expert and the anti-expert share a "general" component and each adds its own, the
situation Ext-Sub is made for (paper §3). Deterministic; run from anywhere:

    python examples/make_example.py    # writes examples/expert.safetensors and examples/anti.safetensors
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 64, 128, 128, 2


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"model.layers.{i}.self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        out[f"model.layers.{i}.mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        out[f"model.layers.{i}.mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        out[f"model.layers.{i}.mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        out[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def main(out_dir: Path = HERE) -> None:
    g = torch.Generator().manual_seed(2024)
    expert, anti = {}, {}
    for name, shape in shapes().items():
        general = 0.01 * torch.randn(shape, generator=g)  # shared by both: capability to keep
        expert[name] = (general + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        anti[name] = (general + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    meta = {"format": "pt"}  # one key: safetensors writes metadata in hash order, and these files should not change
    save_file(expert, out_dir / "expert.safetensors", metadata=meta)
    save_file(anti, out_dir / "anti.safetensors", metadata=meta)
    print(f"wrote {out_dir / 'expert.safetensors'} and {out_dir / 'anti.safetensors'}")


if __name__ == "__main__":
    main()
