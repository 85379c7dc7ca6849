"""Seeded fuzzing of the safetensors reader, and of `extsub-merge`, with crafted and corrupted files (issue 13).

Each case is a valid checkpoint (written by `safetensors` itself) spoiled by one mutation of
a family: truncation, a changed length field, flipped bytes, a wrong type in a field, deep
nesting, huge integers, lone surrogates, repeated keys, bad metadata, unknown dtypes,
overflowing shapes, broken offsets, NaN in the data, a broken envelope. The contract:

- reader: `CheckpointReader` reads the file, and then `safetensors` loads the same tensors
  (both `safetensors.torch.load` and `safe_open`); or it raises InputError in one line that
  starts with the file's path. Never another exception, within a time budget, the file unchanged.
- CLI (the first case of each family, its main() in this process): exit 0 with the right output, or exit 2
  with one line `extsub-merge: error: ...` naming the file; nothing left in OUT's folder, no
  temporaries; the input byte-identical.

Cases follow from the run's seed (conftest.py, EXTSUB_TEST_SEED) and their index, so every run
tries new ones; a failure names the case, its mutation and the seed, and is replayed by running
its test id (`...[case-<i>]`) with `EXTSUB_TEST_SEED=<seed>`.
"""

import json
import math
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from extsub_kernels import ext_sub
from extsub_kernels._tensors import is_float
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, read_header
from extsub_kernels.io.format import DTYPES, readable_dtypes

from checkpoints import hashes, leftovers
from helpers import SEED, TOLERANCES, assert_close_explained, assert_one_line_error

CASES_PER_FAMILY = 20
READ_BUDGET_S = 5.0  # one crafted file (at most a few hundred kB) through the reader; typically ~10 ms
CLI_BUDGET_S = 60.0  # one extsub-merge run on a tiny file


class Raw:
    """JSON text written into a header verbatim: what json.dumps never writes (lone surrogate
    escapes, NaN, repeated keys, numbers of any length). Compared by identity, so two Raw keys
    with the same text make a key repeated in one object."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) < 60 else f"{self.text[:40]}...({len(self.text)} chars)"


def dumps(value: object) -> str:
    """JSON of `value`, with Raw parts verbatim (as values and as keys)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(f"{dumps(k) if isinstance(k, Raw) else _string(k)}:{dumps(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _string(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def assemble(header: object, data: bytes, *, pad: bytes = b" ") -> bytes:
    """A safetensors file: the length field, the header's JSON padded to a multiple of 8, the data."""
    raw = (header if isinstance(header, str) else dumps(header)).encode()
    raw += pad * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# ---------------------------------------------------------------- the valid checkpoint each case starts from


@dataclass
class Base:
    header: dict  # parsed, in file order: __metadata__ (if any), then tensors by offset
    data: bytes
    blob: bytes

    @property
    def n(self) -> int:
        return len(self.blob) - len(self.data) - 8

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]


_NAMES = [
    "model.embed.weight",
    "lm_head.weight",
    "layers.0.mlp.up.weight",
    "layers.0.norm.bias",
    "ω.scale",
    'q"k\\v',
    "naïve",
]
_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
if "F8_E4M3" in readable_dtypes():
    _DTYPES.append(torch.float8_e4m3fn)


def _random_tensor(rng: random.Random, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def base_checkpoint(rng: random.Random) -> Base:
    tensors = {}
    for name in rng.sample(_NAMES, rng.randint(1, 4)):
        shape = tuple(rng.randint(0 if rng.random() < 0.1 else 1, 5) for _ in range(rng.randint(0, 3)))
        tensors[name] = _random_tensor(rng, rng.choice(_DTYPES), shape)
    blob = save(tensors, metadata={"format": "pt"} if rng.random() < 0.5 else None)
    (n,) = struct.unpack("<Q", blob[:8])
    return Base(json.loads(blob[8 : 8 + n]), blob[8 + n :], blob)


def _entry(dtype: object, shape: object, offsets: object) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


# ---------------------------------------------------------------- mutation families: (rng, base) -> (what, file)


def truncated(rng: random.Random, b: Base) -> tuple[str, bytes]:
    cut = rng.choice([rng.randrange(0, 8), rng.randrange(8, 8 + b.n), rng.randrange(8 + b.n, len(b.blob) + 1)])
    return f"truncated to {cut} of {len(b.blob)} bytes", b.blob[:cut]


def length_field(rng: random.Random, b: Base) -> tuple[str, bytes]:
    value = rng.choice(
        [0, 1, 2, b.n - 1, b.n + 1, b.n - 8, b.n + 8, len(b.blob), 2**63, 2**64 - 1, 100_000_001, rng.randrange(2**32)]
    )
    return f"length field {b.n} -> {value}", struct.pack("<Q", value) + b.blob[8:]


def _flip(rng: random.Random, blob: bytes, start: int, stop: int, k: int) -> tuple[list[int], bytes]:
    data = bytearray(blob)
    where = sorted(rng.sample(range(start, stop), min(k, stop - start)))
    for i in where:
        data[i] ^= rng.randrange(1, 256)
    return where, bytes(data)


def header_bytes(rng: random.Random, b: Base) -> tuple[str, bytes]:
    where, blob = _flip(rng, b.blob, 8, 8 + b.n, rng.randint(1, 4))
    return f"header bytes flipped at {where}", blob


def data_bytes(rng: random.Random, b: Base) -> tuple[str, bytes]:
    blob = b.blob if b.data else _one_more_tensor(b, "x", "F32", [2], bytes(8))
    (n,) = struct.unpack("<Q", blob[:8])
    where, blob = _flip(rng, blob, 8 + n, len(blob), rng.randint(1, 4))
    return f"data bytes flipped at {where} (the data is opaque to the reader; NaN may appear)", blob


HOSTILE_VALUES = [
    ["F32"],
    {"a": 1},
    7,
    Raw("1.5"),
    None,
    True,
    -1,
    "4",
    [],
    [[1]],
    Raw("9" * 25),
    Raw("-0"),
    Raw("NaN"),
    Raw("-Infinity"),
    Raw("1e3"),
    {"dtype": "F32"},
    [0, 1],
    "",
    Raw('"\\ud800"'),
]


def field_types(rng: random.Random, b: Base) -> tuple[str, bytes]:
    name = rng.choice(b.names())
    field = rng.choice(["dtype", "shape", "data_offsets"])
    value = rng.choice(HOSTILE_VALUES)
    if isinstance(b.header[name][field], list) and b.header[name][field] and rng.random() < 0.5:
        b.header[name][field][rng.randrange(len(b.header[name][field]))] = value
        what = f"an element of {field} of {name!r} -> {value!r}"
    else:
        b.header[name][field] = value
        what = f"{field} of {name!r} -> {value!r}"
    return what, assemble(b.header, b.data)


EDGE_DIMS = [0, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64]
SPECIAL_SHAPES = [
    [-1],
    [2**64, 0],
    [2**63, 0],
    [0, 2**40],
    [0, 2**62, 4],
    [0, 2**62, 2],
    [2**32, 2**32, 0],
    [2**32, 2**32 - 1, 0],
    [2**62, 2, 0],
    [1] * 64,
    [1] * 65,
    [1] * 1000,
    [0] * 64,
    [],
]


def _one_more_tensor(b: Base, name: str, code: str, shape: list, data: bytes) -> bytes:
    """The base with one more tensor at the end of its data."""
    end = len(b.data)
    b.header[name] = _entry(code, shape, [end, end + len(data)])
    return assemble(b.header, b.data + data)


def shapes(rng: random.Random, b: Base) -> tuple[str, bytes]:
    if rng.random() < 0.4:
        shape = rng.choice(SPECIAL_SHAPES)
    else:
        shape = [rng.choice(EDGE_DIMS) for _ in range(rng.randint(1, 4))]
        if 0 not in shape and any(d > 8 for d in shape):
            shape[rng.randrange(len(shape))] = 0
    code = rng.choice(["BOOL", "BF16", "F32", "F64", "I64"])
    numel = math.prod(shape)
    data = bytes(max(numel, 0) * DTYPES[code].itemsize if numel <= 64 else 0)  # no data for what cannot exist
    return f"tensor 'x' of {code} with shape {shape}", _one_more_tensor(b, "x", code, shape, data)


def zero_size(rng: random.Random, b: Base) -> tuple[str, bytes]:
    big = [2 ** rng.randint(20, 64) - rng.choice([0, 1]) for _ in range(3)]
    shape = rng.choice([[0, big[0]], [big[0], 0], [big[0], big[1], 0], [0, big[0], big[1]], [big[0], 0, big[1]], [0]])
    code = rng.choice(list(readable_dtypes()))
    return f"tensor 'x' of {code} with shape {shape} and no data", _one_more_tensor(b, "x", code, shape, b"")


def offsets(rng: random.Random, b: Base) -> tuple[str, bytes]:
    name = rng.choice(b.names())
    begin, end = b.header[name]["data_offsets"]
    k = rng.randint(1, 9)
    value = rng.choice(
        [
            [end, begin],
            [begin - k, end - k],
            [begin + k, end + k],
            [begin, end + k],
            [begin],
            [begin, end, end],
            [],
            [str(begin), end],
            [-1, end],
            [begin, 2**64 - 1],
            [begin, Raw("9" * 21)],
            [Raw(f"{begin}.0"), end],
            [end, end],
        ]
    )
    b.header[name]["data_offsets"] = value
    return f"data_offsets of {name!r} [{begin}, {end}] -> {value!r}", assemble(b.header, b.data)


def deep_nesting(rng: random.Random, b: Base) -> tuple[str, bytes]:
    depth = rng.choice([2, 10, 100, 127, 128, 129, 500, 999, 1000, 1001, 5000, 50_000, 300_000])
    nest = Raw("[" * depth + "]" * depth) if rng.random() < 0.6 else Raw('{"a":' * depth + "1" + "}" * depth)
    name = rng.choice(b.names())
    where = rng.choice(["metadata value", "dtype", "shape element", "extra field", "the header", "a tensor entry"])
    if where == "metadata value":
        b.header["__metadata__"] = {"k": nest}
    elif where == "dtype":
        b.header[name]["dtype"] = nest
    elif where == "shape element":
        b.header[name]["shape"] = [nest]
    elif where == "extra field":
        b.header[name]["x"] = nest
    elif where == "a tensor entry":
        b.header["deep"] = nest
    return f"JSON nested {depth} deep as {where}", assemble(nest if where == "the header" else b.header, b.data)


def huge_digits(rng: random.Random, b: Base) -> tuple[str, bytes]:
    digits = rng.choice([19, 20, 21, 22, 100, 4300, 4301, 5000, 20_000, 100_000])
    number = Raw(rng.choice(["", "-"]) + str(rng.randint(1, 9)) + "".join(rng.choices("0123456789", k=digits - 1)))
    name = rng.choice(b.names())
    where = rng.choice(["shape", "data_offsets", "metadata value", "a tensor entry"])
    if where in ("shape", "data_offsets"):
        values = b.header[name][where] or [0]
        values[rng.randrange(len(values))] = number
        b.header[name][where] = values
    elif where == "metadata value":
        b.header["__metadata__"] = {"k": number}
    else:
        b.header["big"] = number
    return f"a {digits}-digit integer in {where}", assemble(b.header, b.data)


# Lone high and low surrogates, a reversed pair, one before a letter; the last is a valid pair (one character).
SURROGATES = ["\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ude00\\ud83d", "\\ud800\\u0041", "\\ud83d\\ude00"]


def surrogates(rng: random.Random, b: Base) -> tuple[str, bytes]:
    escape = rng.choice(SURROGATES)
    name = rng.choice(b.names())
    where = rng.choice(["tensor name", "metadata key", "metadata value", "dtype"])
    if where == "tensor name":
        b.header = {(Raw(_string(name)[:-1] + escape + '"') if k == name else k): v for k, v in b.header.items()}
    elif where == "metadata key":
        b.header["__metadata__"] = {Raw(f'"k{escape}"'): "v"}
    elif where == "metadata value":
        b.header["__metadata__"] = {"k": Raw(f'"v{escape}"')}
    else:
        b.header[name]["dtype"] = Raw(f'"F32{escape}"')
    return f"the escape {escape} in a {where}", assemble(b.header, b.data)


def duplicates(rng: random.Random, b: Base) -> tuple[str, bytes]:
    name = rng.choice(b.names())
    where = rng.choice(["tensor", "tensor with other offsets", "field", "metadata key", "__metadata__"])
    if where.startswith("tensor"):
        entry = dict(b.header[name])
        if where.endswith("offsets"):
            entry["data_offsets"] = [0, entry["data_offsets"][1] - entry["data_offsets"][0]]
        b.header[Raw(_string(name))] = entry
    elif where == "field":
        field = rng.choice(["dtype", "shape", "data_offsets"])
        b.header[name] = {**b.header[name], Raw(_string(field)): b.header[name][field]}
    elif where == "metadata key":
        b.header["__metadata__"] = {"k": "v", Raw('"k"'): "w"}
    else:
        b.header = {
            "__metadata__": {"a": "1"},
            Raw('"__metadata__"'): {"b": "2"},
            **{k: v for k, v in b.header.items() if k != "__metadata__"},
        }
    return f"a repeated key: {where} ({name!r})", assemble(b.header, b.data)


def metadata(rng: random.Random, b: Base) -> tuple[str, bytes]:
    value = rng.choice(
        [
            [],
            "x",
            1,
            None,
            True,
            {"k": 1},
            {"k": None},
            {"k": []},
            {"k": {}},
            {"k": Raw("1.5")},
            {"k": True},
            {"k": "v" * 100_000},
            {"": ""},
            {"format": "pt", "k": Raw("NaN")},
        ]
    )
    b.header = {"__metadata__": value, **{k: v for k, v in b.header.items() if k != "__metadata__"}}
    return f"__metadata__ -> {value!r:.80}", assemble(b.header, b.data)


def dtypes(rng: random.Random, b: Base) -> tuple[str, bytes]:
    odd = ["F8_E8M0", "C128", "F4", "F6_E2M3", "F6_E3M2", "I4", "Q8_0", "f32", "F32 ", "", "F128", "F8_E4M3FN"]
    code = rng.choice([*odd, *DTYPES])
    if rng.random() < 0.5:  # another dtype for an existing tensor: its byte size may or may not still fit
        name = rng.choice(b.names())
        b.header[name]["dtype"] = code
        return f"dtype of {name!r} -> {code!r}", assemble(b.header, b.data)
    size = DTYPES[code].itemsize if code in DTYPES else 1
    return f"tensor 'x' of dtype {code!r}", _one_more_tensor(b, "x", code, [3], bytes(range(3 * size)))


def nan_data(rng: random.Random, b: Base) -> tuple[str, bytes]:
    tensors = load(b.blob)
    floats = [
        k
        for k, t in tensors.items()
        if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and t.numel()
    ]
    name = rng.choice(floats) if floats else "nan.w"
    t = tensors.get(name, torch.zeros(2, 3)).clone()
    t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    tensors[name] = t
    return f"NaN or Inf in {name!r}", save(tensors, metadata=b.header.get("__metadata__"))


def envelope(rng: random.Random, b: Base) -> tuple[str, bytes]:
    text = dumps(b.header)
    kind = rng.choice(
        [
            "list",
            "string",
            "number",
            "null",
            "trailing garbage",
            "NUL padding",
            "BOM",
            "whitespace",
            "empty header",
            "empty text",
            "extra field",
            "missing field",
            "newline padding",
        ]
    )
    if kind == "NUL padding":
        return kind, assemble(text, b.data, pad=b"\0") if len(text) % 8 else assemble(text + " ", b.data, pad=b"\0")
    if kind == "newline padding":
        return kind, assemble(text, b.data, pad=b"\n")
    if kind in ("extra field", "missing field"):
        name = rng.choice(b.names())
        if kind == "extra field":
            b.header[name]["extra"] = rng.choice([1, "x", None])
        else:
            del b.header[name][rng.choice(["dtype", "shape", "data_offsets"])]
        return f"{kind} in {name!r}", assemble(b.header, b.data)
    replaced = {
        "list": "[" + text + "]",
        "string": _string(text),
        "number": "1",
        "null": "null",
        "trailing garbage": text + "}",
        "BOM": "\ufeff" + text,
        "whitespace": "\t\n " + text + "\r\n",
        "empty header": "{}",
        "empty text": "",
    }[kind]
    return kind, assemble(replaced, b.data)


FAMILIES: dict[str, Callable[[random.Random, Base], tuple[str, bytes]]] = {
    f.__name__: f
    for f in (
        truncated,
        length_field,
        header_bytes,
        data_bytes,
        field_types,
        shapes,
        zero_size,
        offsets,
        deep_nesting,
        huge_digits,
        surrogates,
        duplicates,
        metadata,
        dtypes,
        nan_data,
        envelope,
    )
}


@dataclass(frozen=True)
class Case:
    index: int
    family: str
    what: str
    blob: bytes

    def __str__(self) -> str:
        return f"case {self.index} ({self.family}: {self.what}; EXTSUB_TEST_SEED={SEED})"


def make_case(index: int) -> Case:
    rng = random.Random(f"{SEED}-{index}")
    family = list(FAMILIES)[index % len(FAMILIES)]
    what, blob = FAMILIES[family](rng, base_checkpoint(rng))
    return Case(index, family, what, blob)


# ---------------------------------------------------------------- the contract


def read_or_refuse(case: Case, path: Path) -> dict[str, torch.Tensor] | None:
    """The reader's contract on `path`: its tensors when read (and then safetensors agrees), None when refused."""
    start = time.perf_counter()
    try:
        with CheckpointReader([path]) as reader:
            tensors = {name: reader.read(name) for name in reader}
            metadata = reader.metadata
    except InputError as e:
        message = str(e)
        assert message.startswith(f"{path}: "), f"{case}: the message does not start with the file: {message!r}"
        assert "\n" not in message and len(message) < 2000, f"{case}: not one short line: {message!r}"
        message.encode("utf-8")  # no lone surrogate reaches a message
        tensors = None
    assert time.perf_counter() - start < READ_BUDGET_S, f"{case}: the reader took {time.perf_counter() - start:.1f} s"
    if tensors is None:
        return None
    reference = load(path.read_bytes())  # raises if safetensors refuses what the reader read
    with safe_open(path, "pt") as f:
        assert metadata == (f.metadata() or {}), f"{case}: metadata {metadata} != safetensors' {f.metadata()}"
        assert sorted(f.keys()) == sorted(tensors) == sorted(reference), f"{case}: the tensors differ from safetensors'"
        for name, t in tensors.items():
            for theirs in (reference[name], f.get_tensor(name)):
                assert t.dtype == theirs.dtype and t.shape == theirs.shape, (
                    f"{case}: {name!r} {t.dtype}{tuple(t.shape)}"
                )
                assert torch.equal(_bytes(t), _bytes(theirs)), (
                    f"{case}: {name!r} holds other bytes than safetensors reads"
                )
    return tensors


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


INDICES = range(CASES_PER_FAMILY * len(FAMILIES))


@pytest.mark.parametrize("index", INDICES, ids=[f"case-{i}" for i in INDICES])
def test_the_reader_reads_what_safetensors_reads_and_refuses_the_rest_in_one_line(tmp_path, index):
    case = make_case(index)
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(case.blob)
    read_or_refuse(case, path)
    assert path.read_bytes() == case.blob, f"{case}: the input changed"


def test_the_generator_makes_both_outcomes(tmp_path):
    """Neither side of the contract is vacuous: flipped data and NaN are always read (the data is
    opaque to the reader), and every other family yields refused files."""
    read, refused = set(), set()
    for index in INDICES:
        case = make_case(index)
        path = tmp_path / f"{index}.safetensors"
        path.write_bytes(case.blob)
        try:
            read_header(path)
        except InputError:
            refused.add(case.family)
        else:
            read.add(case.family)
    assert {"data_bytes", "nan_data"} <= read and "data_bytes" not in refused and "nan_data" not in refused
    assert refused == set(FAMILIES) - {"data_bytes", "nan_data"}, (
        f"families with no refused case: {set(FAMILIES) - refused}"
    )


def _expected_output(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EXPERT = ANTI = the fuzzed file: float tensors are merged with themselves (λ = 1), the others copied."""
    return {k: ext_sub(t, t, 1.0) if is_float(t.dtype) and t.numel() else t for k, t in tensors.items()}


CLI_INDICES = range(len(FAMILIES))  # the first case of each family


@pytest.mark.parametrize("index", CLI_INDICES, ids=[f"case-{i}" for i in CLI_INDICES])
def test_the_cli_merges_or_exits_2_naming_the_file_and_leaves_nothing(tmp_path, index, monkeypatch, capsys):
    """extsub-merge's main() in this process (the commands' own start-up is tested in test_cli*.py): exit 0 with the
    right output, or exit 2 with one line naming the file and nothing left."""
    from extsub_kernels.cli import main

    case = make_case(index)
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out_dir.mkdir()
    path = inputs / "expert.safetensors"
    path.write_bytes(case.blob)
    before = hashes(inputs)
    monkeypatch.chdir(inputs)  # the file is named as a user in its folder would name it
    start = time.perf_counter()
    code = main([path.name, path.name, "-o", str(out_dir / "merged.safetensors"), "-q", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert time.perf_counter() - start < CLI_BUDGET_S
    assert hashes(inputs) == before, f"{case}: the input changed"
    assert not leftovers(tmp_path), f"{case}: temporaries left: {leftovers(tmp_path)}"
    tensors = read_or_refuse(case, path)
    if code == 0:
        assert tensors is not None, f"{case}: the CLI merged a file the reader refuses"
        assert sorted(p.name for p in out_dir.iterdir()) == ["merged.safetensors"], f"{case}: {list(out_dir.iterdir())}"
        out = load((out_dir / "merged.safetensors").read_bytes())
        expected = _expected_output(tensors)
        assert sorted(out) == sorted(expected), f"{case}: output tensors {sorted(out)}"
        for name, t in expected.items():
            assert out[name].dtype == t.dtype and out[name].shape == t.shape, f"{case}: {name!r}"
            if is_float(t.dtype) and t.numel():
                assert_close_explained(out[name], t, *TOLERANCES[t.dtype], what=f"{case}: {name!r}")
            elif t.numel():
                assert torch.equal(_bytes(out[name]), _bytes(t)), f"{case}: {name!r} not copied"
    else:
        # Known gap outside io: the engine's message for a result that overflows although the inputs are
        # finite (huge values, e.g. from flipped exponent bits) names the tensor and λ but not the files.
        overflow = "although the inputs are finite" in stderr
        assert_one_line_error(code, stderr, 2, ["overflows"] if overflow else [path.name])
        assert list(out_dir.iterdir()) == [], f"{case}: left in OUT's folder: {list(out_dir.iterdir())}"
