"""Prefix-tuning adapters: Ext-Sub on the virtual tokens' keys and values, a row per head (docs/design.md §6).

PEFT saves `prompt_embeddings`, (num_virtual_tokens, num_layers·2·token_dim) (after any prefix_projection). A prefix
starts from nothing, so Ext-Sub applies to θ itself, a row per token, layer, key/value and head (token_dim and
num_attention_heads from the config: the key/value ones on grouped-query models). It changes no weight: no base=.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import extsub_kernels.adapters.family as family
from extsub_kernels._tensors import is_float
from extsub_kernels.adapters.family import MergeStep, OutputFormat, PeftAdapter
from extsub_kernels.adapters.report import AdapterReport
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.writing import LazyOutput
from extsub_kernels.errors import AdapterError, InputError
from extsub_kernels.io import TensorEntry
from extsub_kernels.io.format import DTYPE_CODES

PROMPT_KEY = "prompt_embeddings"
GEOMETRY = ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")


def prefix_output(
    adapter: "PrefixAdapter", *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> LazyOutput:
    """The prefix as a PEFT folder, `prompt_embeddings` in `dtype` (None: the adapter's or its own); `device` unused."""
    prompt = adapter.prompt_embeddings
    out = dtype or adapter.dtype or prompt.dtype
    makers = [(TensorEntry(PROMPT_KEY, out, tuple(prompt.shape)), lambda: prompt.to(out).contiguous())]
    config = {**adapter.config, "peft_type": "PREFIX_TUNING", **adapter.geometry, "inference_mode": True}
    config.update(task_type=adapter.task_type, base_model_name_or_path=adapter.base_model_name_or_path)
    return family.adapter_folder(makers, adapter, config)


@dataclass(repr=False)
class PrefixAdapter(PeftAdapter):
    """A prefix-tuning adapter: the saved key/value prefix and its geometry (from the adapter_config).

    Attributes:
        prompt_embeddings: (num_virtual_tokens, num_layers·2·token_dim).
        num_virtual_tokens, num_layers, token_dim, num_attention_heads: the geometry the tensor is viewed in.
        dtype: the dtype a merged prefix is written in (it is held in float64); None: the tensor's own.
        report: what the merge did (merged adapters only).
    """

    peft_type, label, tag = "PREFIX_TUNING", "prefix-tuning", "prefix-tuning"
    unit, delta = "prompt embedding", "θ⁻"
    formats = (
        OutputFormat("prefix-tuning", prefix_output, lambda _unit: (PROMPT_KEY,), "a PEFT prefix-tuning adapter"),
    )
    scan_installer = "extsub_kernels.lambda_scan.installers.prefix:PrefixInstaller"
    no_rank = "a prefix has"
    config_needed = "the prefix geometry (num_layers, token_dim, num_attention_heads)"
    base_refusal = (
        "a prefix adds virtual key/value tokens to every attention layer; it changes no weight, so it cannot be "
        "folded into the base model. Drop base= and load OUT with PeftModel.from_pretrained(base_model, OUT)"
    )

    prompt_embeddings: torch.Tensor
    num_virtual_tokens: int
    num_layers: int
    token_dim: int
    num_attention_heads: int
    dtype: torch.dtype | None = None
    report: AdapterReport | None = None

    def __post_init__(self) -> None:
        problem = _geometry_problem(self.geometry) or self._tensor_problem()
        if problem is not None:
            raise ValueError(f"prefix-tuning adapter {self.source}: {problem}")

    @property
    def geometry(self) -> dict[str, int]:
        """num_virtual_tokens, num_layers, token_dim and num_attention_heads, by name."""
        return {name: getattr(self, name) for name in GEOMETRY}

    @property
    def head_dim(self) -> int:
        """The length of one row: token_dim / num_attention_heads."""
        return self.token_dim // self.num_attention_heads

    @property
    def shape(self) -> tuple[int, int]:
        """The shape `prompt_embeddings` has for this geometry."""
        return self.num_virtual_tokens, self.num_layers * 2 * self.token_dim

    def rows(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """`tensor` (default: the prompt embeddings) as rows: one per token, layer, key or value, and head."""
        return (self.prompt_embeddings if tensor is None else tensor).reshape(-1, self.head_dim)

    def _tensor_problem(self) -> str | None:
        t = self.prompt_embeddings
        if not isinstance(t, torch.Tensor) or not is_float(t.dtype):
            return f"{PROMPT_KEY} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
        if tuple(t.shape) != self.shape:
            return (
                f"{PROMPT_KEY} has shape {list(t.shape)} but the geometry ({_geometry_text(self.geometry)}) gives "
                f"{list(self.shape)} (num_virtual_tokens, num_layers·2·token_dim)"
            )
        return None

    @classmethod
    def from_peft(cls, weights: Path, tensors: Mapping[str, torch.Tensor], config: dict, where: str) -> "PrefixAdapter":
        """`prompt_embeddings` in the geometry the config gives; AdapterError for anything else."""
        geometry = {name: config.get(name) for name in GEOMETRY}
        problem = _geometry_problem(geometry)
        if problem is not None:
            raise AdapterError(f"{where}: {problem}; it is what PEFT saves with a prefix-tuning adapter")
        extra = {k: t for k, t in tensors.items() if k != PROMPT_KEY}
        if PROMPT_KEY not in tensors:
            found = ", ".join(list(tensors)[:3]) or "nothing"
            raise AdapterError(f"{weights}: no {PROMPT_KEY} tensor (found {found}), but {where} says PREFIX_TUNING")
        prompt = tensors[PROMPT_KEY]
        if not is_float(prompt.dtype):
            raise AdapterError(f"{weights}: {PROMPT_KEY} has dtype {prompt.dtype}; it must be floating point")
        expected = (geometry["num_virtual_tokens"], geometry["num_layers"] * 2 * geometry["token_dim"])
        if tuple(prompt.shape) != expected:
            raise AdapterError(
                f"{weights}: {PROMPT_KEY} has shape {list(prompt.shape)} but {where} ({_geometry_text(geometry)}) "
                f"gives {list(expected)} (num_virtual_tokens, num_layers·2·token_dim); "
                "the config does not describe these weights"
            )
        return cls(prompt, **geometry, **family.peft_fields(weights, config, extra))

    @classmethod
    def owns_key(cls, key: str) -> bool:
        return key == PROMPT_KEY

    def describe(self) -> str:
        projection = self.config.get("prefix_projection")
        saved = " (saved after its projection)" if projection else ""
        return (
            f"{PROMPT_KEY} {list(self.prompt_embeddings.shape)}{saved} = {self.num_virtual_tokens} virtual tokens × "
            f"{self.num_layers} layers × 2 (key, value) × {self.num_attention_heads} heads × {self.head_dim}, "
            f"{family.describe_dtypes([self.prompt_embeddings], self.dtype)}"
        )

    def stat_units(self) -> Mapping[str, object]:
        return {PROMPT_KEY: self.rows().to(torch.float64)}

    def stat_parts(self, name: str) -> list[tuple[str, object]]:
        """One part per layer and head (`prompt_embeddings.layers.3.head0`), for the layer × head heatmap."""
        shape = (self.num_virtual_tokens, self.num_layers, 2, self.num_attention_heads, self.head_dim)

        def select(rows: torch.Tensor, layer: int, head: int) -> torch.Tensor:
            return rows.reshape(shape)[:, layer, :, head, :].reshape(-1, self.head_dim)

        return [
            (f"{name}.layers.{layer}.head{head}", lambda rows, layer=layer, head=head: select(rows, layer, head))
            for layer in range(self.num_layers)
            for head in range(self.num_attention_heads)
        ]

    def unit_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        t = self.prompt_embeddings
        return {PROMPT_KEY: (tuple(t.shape), DTYPE_CODES[self.dtype or t.dtype])}

    def check_antis(self, antis: Sequence[PeftAdapter]) -> None:
        """Raise an InputError unless every anti-expert has the expert's geometry."""
        for anti in antis:
            for name in GEOMETRY:
                if getattr(anti, name) != getattr(self, name):
                    raise InputError(
                        f"{anti.source} has {name} = {getattr(anti, name)} but the expert {self.source} has "
                        f"{name} = {getattr(self, name)}; Ext-Sub pairs the per-head key/value rows of prefixes of "
                        f"one geometry ({', '.join(GEOMETRY)})"
                    )

    def merge_units(self, step: MergeStep) -> dict:
        """The method on θ itself, a row per token, layer, key/value and head, in float64 (`dtype`: the expert's)."""
        antis, lams, spec, report = step.antis, step.lams, step.spec, step.report
        report.merged.append(PROMPT_KEY)
        work = self.rows(self.prompt_embeddings.to(torch.float64, copy=True))
        zero_rows = 0
        for anti, step_lam in zip(antis, lams, strict=True):
            if spec.pairs_rows:
                zero_rows = max(zero_rows, int((~work.any(dim=1)).sum()))  # |p| = 0: the row is kept
            apply_method(work, [anti.rows()], [step_lam], method=spec, inplace=True)  # m: any float dtype
        if zero_rows:
            report.zero_rows[PROMPT_KEY] = zero_rows
        return {"prompt_embeddings": work.reshape(self.shape), "dtype": self.dtype or self.prompt_embeddings.dtype}


def _geometry_problem(geometry: Mapping[str, object]) -> str | None:
    """What is wrong with a prefix geometry (missing, not positive integers, heads not dividing token_dim), or None."""
    for name in GEOMETRY:
        value = geometry.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"{name} must be a positive integer, got {value!r}"
    if geometry["token_dim"] % geometry["num_attention_heads"]:
        return (
            f"token_dim {geometry['token_dim']} is not a multiple of num_attention_heads "
            f"{geometry['num_attention_heads']}: the prefix cannot be split into heads"
        )
    return None


def _geometry_text(geometry: Mapping[str, object]) -> str:
    return ", ".join(f"{name} {geometry[name]}" for name in GEOMETRY)
