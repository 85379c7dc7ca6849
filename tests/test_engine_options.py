"""The option vocabulary: the λ grammars (merge settings, scan grids), methods, sizes, output names, devices, dtypes,
block sizes."""

import pytest
import torch

from extsub_kernels.engine.options import (
    CPU_BLOCK_BYTES,
    CUDA_BLOCK_BYTES,
    RunOptions,
    eval_dtype,
    lam_items,
    lam_label,
    lam_labels,
    lam_text,
    out_dtype,
    parse_lam_grid,
    parse_lams,
    parse_methods,
    parse_size,
)
from extsub_kernels.errors import InputError
from extsub_kernels.io import output_paths


@pytest.mark.parametrize(
    "text, value",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("4096", 4096), (" 1.5kb ", 1500), (77, 77)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["five", "5XB", "-1", "0", ""])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(InputError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    "lam, n_anti, settings",
    [
        (1.0, 1, [(1.0,)]),
        ("0.5,1,2", 1, [(0.5,), (1.0,), (2.0,)]),
        ("1", 2, [(1.0, 1.0)]),
        ("1:0.5", 2, [(1.0, 0.5)]),
        ("1:0.5,2:1", 2, [(1.0, 0.5), (2.0, 1.0)]),
        ([0.5, [1, 2]], 2, [(0.5, 0.5), (1.0, 2.0)]),
        ("-1", 1, [(-1.0,)]),
    ],
)
def test_parse_lams(lam, n_anti, settings):
    assert parse_lams(lam, n_anti) == settings


@pytest.mark.parametrize(
    "lam, n_anti, message",
    [
        ("1:2", 1, "gives 2 values for 1 anti-expert"),
        ("a", 1, "λ must be a number"),
        ("nan", 1, "finite"),
        ("1,1.0", 1, "λ 1 is given twice"),
        ([], 1, "lam must be"),
        ("1:2:3", 2, "gives 3 values for 2"),
    ],
)
def test_parse_lams_refuses_nonsense(lam, n_anti, message):
    with pytest.raises(InputError, match=message):
        parse_lams(lam, n_anti)


def test_output_paths_suffix_rule(tmp_path):
    def paths(out, settings):
        return output_paths(out, [lam_label(s) for s in settings])

    assert paths(tmp_path / "o.safetensors", [(1.0,)]) == [tmp_path / "o.safetensors"]
    two = [tmp_path / "o-lam0.5.safetensors", tmp_path / "o-lam1e-05.safetensors"]
    assert paths(tmp_path / "o.safetensors", [(0.5,), (1e-5,)]) == two
    # One format per run: once a setting gives the anti-experts different λ, every suffix lists one λ each.
    mixed = [(1.0, 0.5), (2.0, 2.0)]
    assert output_paths(tmp_path / "dir", lam_labels(mixed)) == [tmp_path / "dir-lam1_0.5", tmp_path / "dir-lam2_2"]
    assert lam_labels([(0.5, 0.5), (1.0, 1.0)]) == ["0.5", "1"]


def test_block_size_is_small_on_cpu_large_on_cuda_unless_asked():
    assert RunOptions(settings=((1.0,),)).block_size == CPU_BLOCK_BYTES == 2 << 20
    assert RunOptions(settings=((1.0,),), device=torch.device("cuda", 0)).block_size == CUDA_BLOCK_BYTES
    assert RunOptions(settings=((1.0,),), block_bytes=4096).block_size == 4096
    with pytest.raises(
        InputError, match="block_bytes must be a positive int \\(or None for the device's default\\), got 0"
    ):
        RunOptions(settings=((1.0,),), block_bytes=0)


@pytest.mark.parametrize("text", ["inf", "1e400GB", "nan", "-inf"])
def test_parse_size_refuses_sizes_that_are_not_finite(text):
    with pytest.raises(InputError, match=f"size '{text}' is not a finite number of bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    "lam, grid",
    [
        ("0:2:0.2", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]),  # 0.2·3 is 0.6, not 0.6000000000000001
        ("0,0.5,1,2", [0.0, 0.5, 1.0, 2.0]),
        ("0.5:1:0.25, 2", [0.0, 0.5, 0.75, 1.0, 2.0]),  # λ = 0 added, mixed items
        ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),  # stop included only when a step lands on it
        ("2,1,1", [0.0, 1.0, 2.0]),  # sorted, repeats once
        (1.5, [0.0, 1.5]),
        ([1, -0.0, 0.5], [0.0, 0.5, 1.0]),
    ],
)
def test_parse_lam_grid(lam, grid):
    assert parse_lam_grid(lam) == grid


@pytest.mark.parametrize(
    "lam, message",
    [
        ("1:2", r"λ item '1:2': write a number or a range start:stop:step"),
        ("0:2:0", r"λ range '0:2:0': the step must be positive, got 0"),
        ("2:1:0.5", r"λ range '2:1:0.5': it ends \(1\) before it starts \(2\)"),
        ("0,one", r"λ must be a number, got 'one'"),
        ("0:1000:0.5", r"λ range '0:1000:0.5' has 2001 values; a scan takes at most 1000"),
        ([], r"lam must be a number, a list of numbers or a string"),
    ],
)
def test_parse_lam_grid_refuses_nonsense(lam, message):
    with pytest.raises(InputError, match=message):
        parse_lam_grid(lam)


def test_parse_methods():
    assert parse_methods("ext-sub, sub") == ("ext-sub", "sub")
    assert parse_methods(["sub"]) == ("sub",)
    with pytest.raises(InputError, match="unknown method 'extsub'; choose one of ext-sub, sub, add"):
        parse_methods("extsub,sub")
    with pytest.raises(InputError, match="method list sub, sub names a method twice"):
        parse_methods("sub,sub")


def test_eval_dtype():
    assert eval_dtype("auto") is None and eval_dtype("float64") is torch.float64
    assert eval_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype 'fp8'; choose one of auto, float32, float64"):
        eval_dtype("fp8")


def test_output_and_evaluation_dtypes_follow_one_rule():
    """A name or the torch dtype itself, each checked against its own list (the first name forces none)."""
    assert out_dtype("keep") is None and out_dtype(torch.float16) is torch.float16
    with pytest.raises(InputError, match="dtype torch.float64 cannot be an output dtype; choose one of float16, bf"):
        out_dtype(torch.float64)
    with pytest.raises(InputError, match="dtype torch.int8 cannot be an evaluation dtype; choose one of float32, f"):
        eval_dtype(torch.int8)


def test_one_lam_grammar_reads_merges_scans_and_recipes_alike():
    assert lam_items("0.5, 1:2") == [("0.5", 0.5), ("1:2", [1.0, 2.0])]
    assert lam_items([1, [2, 0.5]]) == [("1", 1.0), ("2:0.5", [2.0, 0.5])]
    assert parse_lams("0.5, 1:2", 2) == [(0.5, 0.5), (1.0, 2.0)]
    assert parse_lam_grid([1, [2, 3, 0.5]]) == [0.0, 1.0, 2.0, 2.5, 3.0]  # three numbers in a scan: a range
    with pytest.raises(InputError, match="λ must be a number, got 'x'"):
        lam_items("1:x")


def test_one_lam_formatter_exact_or_short():
    assert lam_text([1.0, 0.5], ":") == "1:0.5" and lam_text([2.0]) == "2"
    assert lam_text([0.1 + 0.2]) == "0.30000000000000004" and lam_text([0.1 + 0.2], short=True) == "0.3"
    assert lam_text([1.0, 0.25], ", ", short=True) == "1, 0.25"
