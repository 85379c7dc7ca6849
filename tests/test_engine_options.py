"""The option vocabulary: the λ grammar, sizes, output names, devices, block sizes."""

import pytest
import torch

from extsub_kernels.engine.options import (
    CPU_BLOCK_BYTES,
    CUDA_BLOCK_BYTES,
    RunOptions,
    lam_label,
    parse_lams,
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
    assert paths(tmp_path / "dir", [(1.0, 0.5), (2.0, 2.0)]) == [tmp_path / "dir-lam1_0.5", tmp_path / "dir-lam2"]


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
