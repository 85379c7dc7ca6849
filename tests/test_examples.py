"""The bundled example: its files are what make_example.py writes, and the README's first command merges them."""

import importlib.util
import re
import shlex
from pathlib import Path

import torch
from safetensors.torch import load_file

from extsub_kernels import ext_sub
from extsub_kernels.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_example_is_what_the_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_example", ROOT / "examples" / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("expert.safetensors", "anti.safetensors"):
        assert (tmp_path / name).read_bytes() == (ROOT / "examples" / name).read_bytes(), name
        assert (ROOT / "examples" / name).stat().st_size < 250_000, "the example stays small"


def test_the_readme_opens_with_the_merge_of_the_example(tmp_path, capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[0]
    command = next(part for part in first_block.split("&&") if "extsub-merge" in part)
    argv = shlex.split(command)[1:]
    out_at = argv.index("-o") + 1
    assert argv[out_at].startswith("/tmp/"), "the example writes outside the repository"
    argv[out_at] = str(tmp_path / "merged.safetensors")
    monkeypatch.chdir(ROOT)
    assert main(argv) == 0, capsys.readouterr().err
    out = load_file(tmp_path / "merged.safetensors")
    expert, anti = (
        load_file(ROOT / "examples" / "expert.safetensors"),
        load_file(ROOT / "examples" / "anti.safetensors"),
    )
    lam = float(argv[argv.index("--lam") + 1])
    assert out.keys() == expert.keys()
    assert all(torch.equal(out[k], ext_sub(expert[k], anti[k], lam)) for k in expert)
