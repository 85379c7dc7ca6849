"""How weights are laid out: a merge pairs rows of ΔW (output features), dim 0 of nn.Linear's (out, in) but the
columns of GPT-2's Conv1D (in, out). Decided by `transposed=`, else a config.json, else GPT-2 names and shapes."""

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from extsub_kernels.constants import MODEL_CONFIG
from extsub_kernels.io import ResolvedInput, read_json_object

# Models whose linear layers are GPT-2's Conv1D, storing weights as (in, out) instead of (out, in).
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_CONV1D_ARCHITECTURE_PREFIXES = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer")
_CONV1D_WEIGHT = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")
# Conv1D weights whose shape tells the layout: (name pattern, ratio out/in of the layer).
_TELLING = ((re.compile(r"(^|\.)c_attn\.weight$"), 3), (re.compile(r"(^|\.)c_fc\.weight$"), 4))
_MLP_PROJ = re.compile(r"(^|\.)mlp\.c_proj\.weight$")

TransposedRule = Callable[[str, tuple[int, ...]], bool]


def never_transposed(name: str, shape: tuple[int, ...]) -> bool:
    """The rule for models without Conv1D layers: every weight is stored (out, in)."""
    return False


def conv1d_transposed(name: str, shape: tuple[int, ...]) -> bool:
    """The rule for GPT-2-family models: 2-D weights named like Conv1D layers are stored (in, out)."""
    return len(shape) == 2 and _CONV1D_WEIGHT.search(name) is not None


def _uses_conv1d(config: Mapping | None) -> bool | None:
    if not isinstance(config, Mapping):
        return None
    architectures = config.get("architectures")
    architectures = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    model_type = config.get("model_type")
    if not isinstance(model_type, str) and not architectures:
        return None
    return model_type in _CONV1D_MODEL_TYPES or any(a.startswith(_CONV1D_ARCHITECTURE_PREFIXES) for a in architectures)


def transposed_weights(config: dict | None) -> TransposedRule:
    """A predicate (name, shape) → whether that weight is stored transposed (GPT-2 Conv1D), from config.json."""
    return conv1d_transposed if _uses_conv1d(config) else never_transposed


def input_config(inp: ResolvedInput) -> dict | None:
    """An input's config.json: in its folder or hub snapshot, or beside a bare .safetensors file; None if absent."""
    if inp.kind == "file":
        beside = inp.files[0].parent / MODEL_CONFIG
        return read_json_object(beside) if beside.is_file() else None
    if inp.kind == "memory":
        return None
    return inp.config(MODEL_CONFIG)


@dataclass(frozen=True)
class WeightLayout:
    """How a run pairs rows: `rule` (name, shape) → paired along its columns; `conv1d`: Conv1D-named weights taken as
    stored (in, out); `reason`: what decided it, a line for the report and --verbose."""

    rule: TransposedRule
    conv1d: bool
    reason: str


def weight_layout(
    configs: Sequence[tuple[str, dict | None]],
    shapes: Mapping[str, tuple[int, ...] | None],
    *,
    explicit: bool | None = None,
    role: str = "EXPERT",
) -> WeightLayout:
    """Decide the layout: `explicit`, else the first of `configs` ((role, config or None), most trusted first) that
    names a model, else the names and `shapes` of input `role` (None: name only); warn where they cannot tell."""

    def layout(conv1d: bool, reason: str) -> WeightLayout:
        return WeightLayout(conv1d_transposed if conv1d else never_transposed, conv1d, reason)

    if explicit is not None:
        return layout(bool(explicit), f"{'--transposed' if explicit else '--no-transposed'} given")
    for who, config in configs:
        verdict = _uses_conv1d(config)
        if verdict is not None:
            kind = config.get("model_type") or ", ".join(config.get("architectures") or [])
            what = "GPT-2 Conv1D weights stored (in, out)" if verdict else "weights stored (out, in)"
            return layout(verdict, f"config.json of {who} ({kind}): {what}")
    conv1d_names = [name for name, shape in shapes.items() if conv1d_transposed(name, shape or (0, 0))]
    if not conv1d_names:
        return layout(False, "no config.json and no Conv1D weight names: rows are dim 0")
    votes = [v for name in conv1d_names if (v := _shape_vote(name, shapes[name])) is not None]
    if votes and all(votes):
        example = next(n for n in conv1d_names if _shape_vote(n, shapes[n]))
        shown = f"{example} is {list(shapes[example])}, as Conv1D stores it"
        return layout(True, f"GPT-2 key names and shapes in {role} ({shown})")
    if votes and not any(votes):
        return layout(False, f"Conv1D key names in {role} but nn.Linear shapes: rows are dim 0")
    warnings.warn(
        f"{role} has GPT-2 Conv1D weight names (e.g. {conv1d_names[0]}) but no config.json, and their shapes do not "
        "tell whether they are stored (in, out) as Conv1D stores them; pairing them as Conv1D (columns of the stored "
        "tensor). Pass --transposed to confirm, or --no-transposed if they are stored (out, in)",
        stacklevel=2,
    )
    return layout(True, f"ambiguous Conv1D key names in {role}: taken as Conv1D (in, out)")


def _shape_vote(name: str, shape: tuple[int, ...] | None) -> bool | None:
    if shape is None:
        return None
    rows, cols = shape
    for pattern, ratio in _TELLING:
        if pattern.search(name):
            return True if cols == ratio * rows else False if rows == ratio * cols else None
    if _MLP_PROJ.search(name):  # the MLP's output projection maps 4d → d
        return True if rows == 4 * cols else False if cols == 4 * rows else None
    return None


def full_model_hint(inputs: Sequence[tuple[str, ResolvedInput]], *, inspecting: bool = False) -> str | None:
    """A warning for full models merged (or inspected) without a base: which input has a model's config.json."""
    for role, inp in inputs:
        config = input_config(inp)
        if _uses_conv1d(config) is not None:
            kind = config.get("model_type") or ", ".join(config.get("architectures") or [])
            if inspecting:
                so, verb = "the row statistics describe its weights θ themselves", "inspect"
            else:
                so, verb = "its weights are merged as task vectors ΔW", "merge"
            return (
                f"{role} {inp.spec!r} looks like a full model (config.json: {kind}) but no --base was given, so {so}, "
                f"not θ − θ₀; to {verb} fine-tuned models, give --base BASE (the model they were fine-tuned from)"
            )
    return None
