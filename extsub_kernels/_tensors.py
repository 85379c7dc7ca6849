"""Rules about tensors that every layer shares, each once: which dtypes merge, the compute precision, row views,
finiteness."""

import math

import torch

# Float dtypes the Ext-Sub op works on; float8 and complex tensors are copied, never merged.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_float(dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` go through the op (float16, bfloat16, float32, float64)."""
    return dtype in FLOAT_DTYPES


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The precision arithmetic runs in: float64 when any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View (or copy, if no view exists) `t` as (rows, cols): rows are dim 0; 0-D and 1-D are one row."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b live in one storage (writing a may change b)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def check_pair(w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float) -> None:
    """Raise a helpful TypeError/ValueError unless (w_plus, w_minus, lam) is a valid Ext-Sub problem."""
    for name, t in (("w_plus", w_plus), ("w_minus", w_minus)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not is_float(t.dtype):
            raise TypeError(
                f"{name} has dtype {t.dtype}; Ext-Sub needs floating-point weights "
                "(float16, bfloat16, float32 or float64)"
            )
    if w_plus.shape != w_minus.shape:
        raise ValueError(
            f"shape mismatch: w_plus has shape {tuple(w_plus.shape)} but w_minus has shape "
            f"{tuple(w_minus.shape)}; Ext-Sub pairs rows of tensors of the same shape"
        )
    if w_plus.device != w_minus.device:
        raise ValueError(
            f"device mismatch: w_plus is on {w_plus.device} but w_minus is on {w_minus.device}; "
            "move both to one device first"
        )
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a real number, got {type(lam).__name__}")
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf: min and max propagate NaN, so one fast reduction tells."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def cast_overflow(source: torch.Tensor, cast: torch.Tensor) -> str | None:
    """None when the cast kept every finite value of `source` finite, else what overflowed, in words."""
    if not cast.is_floating_point() or all_finite(cast):
        return None
    grew = torch.isinf(cast.reshape(-1)) & torch.isfinite(source.reshape(-1))
    count = int(grew.sum())
    if not count:
        return None
    largest = float(source.reshape(-1)[grew].double().abs().max())
    return (
        f"values up to {largest:.3g} beyond the {str(cast.dtype).removeprefix('torch.')} range "
        f"(±{torch.finfo(cast.dtype).max:.3g}, {count} value{'s' if count > 1 else ''} became ±inf)"
    )


def nonfinite_summary(t: torch.Tensor, first_row: int = 0) -> str | None:
    """None for a finite tensor, else "NaN or Inf (N values, first in row R)", rows counted from `first_row`."""
    if all_finite(t):
        return None
    bad = ~torch.isfinite(as_rows(t))
    row = int(bad.any(dim=1).nonzero()[0, 0])
    count = int(bad.sum())
    return f"NaN or Inf ({count} value{'s' if count > 1 else ''}, first in row {first_row + row})"
