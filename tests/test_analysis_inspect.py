"""extsub-inspect: the statistics a merge reports, without merging; report.json, report.md and report.png."""

import builtins
import json
import re
import struct

import pytest
import torch

from extsub_kernels import IA3Adapter, merge
from extsub_kernels.analysis import inspect
from extsub_kernels.analysis.plot import DPI, HEIGHT_IN, WIDTH_IN
from extsub_kernels.cli import EXIT_BAD_INPUT
from extsub_kernels.cli.inspect import main

from checkpoints import SHAPES, hashes, leftovers, random_delta, save
from helpers import assert_one_line_error


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    return (
        folder,
        save(folder / "e.safetensors", random_delta(SHAPES)),
        save(folder / "a.safetensors", random_delta(SHAPES)),
    )


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "a PNG file"
    return struct.unpack(">II", data[16:24])


def test_inspect_writes_the_three_reports_and_nothing_else(tmp_path, inputs, capsys):
    folder, e, a = inputs
    before = hashes(folder)
    code = main([str(e), str(a), "-o", str(tmp_path / "insp"), "--lam", "0.5,1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "insp").iterdir()) == ["report.json", "report.md", "report.png"]
    assert _png_size(tmp_path / "insp" / "report.png") == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
    record = json.loads((tmp_path / "insp" / "report.json").read_text())
    assert record["mode"] == "inspect" and record["outputs"] == [] and len(record["items"]) == len(SHAPES)
    markdown = (tmp_path / "insp" / "report.md").read_text()
    assert "## By module type" in markdown and "## By layer and module type (ANTI)" in markdown
    assert "| 0 | self_attn.q_proj | 40 |" in markdown and "change at λ=0.5" in markdown
    assert hashes(folder) == before and not leftovers(tmp_path)
    assert "extsub-inspect: inspected 6 tensors" in err


def test_inspect_reports_what_a_merge_reports(tmp_path, inputs, llama):
    _, e, a = inputs
    merged = merge(e, a, tmp_path / "out.safetensors", lam=0.7, stats=True)
    assert inspect(e, a, lam=0.7).stats == merged.stats
    _, paths = llama
    adapters = merge(paths["expert"], paths["anti"], tmp_path / "adapter", lam=0.7, stats=True)
    seen = inspect(paths["expert"], paths["anti"], lam=0.7)
    assert seen.stats == adapters.stats and seen.stats[0].kind == "module" and len(seen.stats) == adapters.merged // 2


def test_without_a_folder_the_tables_go_to_stdout(tmp_path, inputs, capsys):
    _, e, a = inputs
    assert main([str(e), str(a), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# Ext-Sub geometry") and captured.err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_without_matplotlib_the_json_and_markdown_are_still_written(tmp_path, inputs, capsys, monkeypatch):
    _, e, a = inputs
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code = main([str(e), str(a), "-o", str(tmp_path / "insp")])
    err = capsys.readouterr().err
    assert (
        code == 0
        and "extsub-inspect: warning: matplotlib is not installed" in err
        and 'pip install -e ".[plot]" (in the extsub source checkout)' in err
    )
    assert sorted(p.name for p in (tmp_path / "insp").iterdir()) == ["report.json", "report.md"] and not leftovers(
        tmp_path
    )


def test_existing_reports_are_kept_without_force(tmp_path, inputs, capsys):
    _, e, a = inputs
    (tmp_path / "insp").mkdir()
    (tmp_path / "insp" / "report.md").write_text("mine")
    code = main([str(e), str(a), "-o", str(tmp_path / "insp")])
    assert_one_line_error(
        code, capsys.readouterr().err, EXIT_BAD_INPUT, ["insp already holds report.md", "--force"], "extsub-inspect"
    )
    assert [p.name for p in (tmp_path / "insp").iterdir()] == ["report.md"]
    assert main([str(e), str(a), "-o", str(tmp_path / "insp"), "--force", "-q"]) == 0
    assert (tmp_path / "insp" / "report.md").read_text() != "mine"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("in", "-o .*in contains the EXPERT file .*e.safetensors; choose another path"),
        ("in/e.safetensors", "-o .*e.safetensors is the EXPERT file"),
        ("file", "-o .*file exists and is not a folder"),
    ],
)
def test_a_report_folder_that_is_an_input_or_a_file_is_refused_before_any_work(
    tmp_path, inputs, capsys, where, expected
):
    _, e, a = inputs
    (tmp_path / "file").write_text("mine")
    before = {p: p.read_bytes() for p in (e, a, tmp_path / "file")}
    code = main([str(e), str(a), "-o", str(tmp_path / where)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1, err
    assert re.search(expected, err), err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.safetensors", "e.safetensors"]


def test_adapters_given_as_objects_of_any_type_are_inspected():
    def ia3(seed: int) -> IA3Adapter:
        generator = torch.Generator().manual_seed(seed)
        vectors = {
            f"model.layers.{i}.self_attn.k_proj": 1 + 0.3 * torch.randn(8, 1, generator=generator) for i in range(2)
        }
        return IA3Adapter(vectors, source=f"ia3-{seed}")

    report = inspect(ia3(1), [ia3(2)], lam="0.5,1")
    assert report.mode == "inspect" and [s.name for s in report.stats] == list(ia3(1).vectors)
    assert all(s.pairs[0].rows == 1 and len(s.relative_change) == 2 for s in report.stats)
    assert report.summary().startswith("inspected 2 vectors | read 0 B")


def test_prefix_rows_are_drawn_by_layer_and_head(tmp_path):
    """A prefix's rows are per token, layer, key/value and head: report.md and report.png group them by layer ×
    head, not all under no layer (which drew empty axes)."""
    from extsub_kernels import PrefixAdapter
    from extsub_kernels.analysis import write_inspection
    from extsub_kernels.analysis.plot import drawn_cells
    from extsub_kernels.engine.tables import by_layer_and_type

    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(3, 2 * 2 * 16, generator=g, dtype=torch.float64) for _ in range(2)]
    adapters = [PrefixAdapter(t, 3, 2, 16, 4) for t in tensors]  # 3 tokens, 2 layers, token_dim 16, 4 heads
    report = inspect(*adapters)
    cells = by_layer_and_type(report.stats, "ANTI")
    assert set(cells) == {(layer, f"head{h}") for layer in range(2) for h in range(4)}
    assert all(group.rows == 3 * 2 for group in cells.values()), "each cell: the key and value rows of every token"
    assert sum(group.rows for group in cells.values()) == 3 * 2 * 2 * 4
    drawn, left_out = drawn_cells(report, "ANTI")
    assert len(drawn) == 8 and not left_out
    write_inspection(report, tmp_path / "insp")
    assert "| – |" not in (tmp_path / "insp" / "report.md").read_text()


def test_what_the_heatmap_leaves_out_is_said(tmp_path, inputs):
    """Tensors outside the layers (lm_head, embeddings, the final norm) have no cell: report.md names them."""
    from extsub_kernels.analysis import write_inspection
    from extsub_kernels.analysis.plot import drawn_cells

    _, e, a = inputs
    report = inspect(e, a)
    drawn, left_out = drawn_cells(report, "ANTI")
    assert sorted(left_out) == ["conv", "lm_head"] and drawn
    write_inspection(report, tmp_path / "insp")
    (line,) = [x for x in (tmp_path / "insp" / "report.md").read_text().splitlines() if "Left out of report.png" in x]
    assert "(no layer)" in line and "lm_head" in line and "conv" in line
