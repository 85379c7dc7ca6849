"""The safetensors format's fixed parts (an 8-byte little-endian length N, N bytes of JSON padded to 8, then the data
at `data_offsets` after it): dtype codes and the order `safetensors` writes tensors in."""

import functools
import json

import torch

HEADER_LENGTH_BYTES = 8
# The reference implementation refuses headers above 100 MB; a larger one is not a safetensors file.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

# Each header code and the torch dtype it names (codes this torch lacks are left out).
_TORCH_NAMES = (
    *(("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16")),
    *(("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8")),
    *(("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8")),
    *(("BOOL", "bool"), ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")),
    *(("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu")),
)
DTYPES: dict[str, torch.dtype] = {code: getattr(torch, name) for code, name in _TORCH_NAMES if hasattr(torch, name)}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


@functools.cache
def readable_dtypes() -> dict[str, torch.dtype]:
    """Codes of `DTYPES` the installed `safetensors` loads back into torch (probed once): inputs are held to them."""
    from safetensors.torch import load

    readable = {}
    for code, dtype in DTYPES.items():
        header = json.dumps({"t": {"dtype": code, "shape": [1], "data_offsets": [0, dtype.itemsize]}}).encode()
        data = len(header).to_bytes(HEADER_LENGTH_BYTES, "little") + header + bytes(dtype.itemsize)
        try:
            if load(data)["t"].dtype == dtype:
                readable[code] = dtype
        except Exception:
            continue
    return readable


# `safetensors` sorts tensors by dtype (this rank, largest alignment first), then name: following it keeps every
# tensor aligned and our files byte-identical to `safetensors.torch.save`.
_WRITE_RANK = [
    *("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16"),
    *("F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8", "BOOL"),
]


def dtype_code(dtype: torch.dtype) -> str:
    """The header code of a torch dtype ("BF16" for torch.bfloat16)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in a safetensors file") from None


def write_rank(dtype: torch.dtype) -> int:
    """Where `safetensors` puts tensors of this dtype in a file (then by name): a sort key."""
    code = dtype_code(dtype)
    return _WRITE_RANK.index(code) if code in _WRITE_RANK else len(_WRITE_RANK)
