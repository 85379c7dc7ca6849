"""merge() made visible: row statistics of dense merges, the JSON record (--report), --dry-run, provenance."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from extsub_kernels import merge
from extsub_kernels._tensors import as_rows
from extsub_kernels.engine.stats import pair_stats
from extsub_kernels.errors import InputError
from extsub_kernels.io.format import HEADER_LENGTH_BYTES
from extsub_kernels.ops import op_backend

from checkpoints import SHAPES, hashes, leftovers, make_hub_cache, random_delta, save, save_shards

SMALL_BLOCKS = 512
# Row sums are float32 reductions over ≤ 40 columns here: cos is good to a few 1e-7; 1e-5 leaves margin. Random rows
# are far from parallel, so the shares (√((1 − cos)/2)) are as good.
COS_ATOL = 1e-5


def _with_degenerate_rows(expert: dict, anti: dict, name: str) -> None:
    """Rows 0 (zero in the expert), 1 (zero in the anti-expert), 2 (exactly antiparallel) of tensor `name`."""
    expert[name][0] = 0
    anti[name][1] = 0
    anti[name][2] = -2.0 * expert[name][2]


def _float64_pair(p: torch.Tensor, m: torch.Tensor, role: str = "ANTI"):
    p, m = as_rows(p.double()), as_rows(m.double())
    return pair_stats(torch.stack([(p * p).sum(1), (m * m).sum(1), (p * m).sum(1)], dim=1), role)


def _assert_pair(actual, expected, what: str) -> None:
    assert (actual.rows, actual.degenerate_rows, actual.antiparallel_rows) == (
        expected.rows,
        expected.degenerate_rows,
        expected.antiparallel_rows,
    ), what
    for field in ("mean", "min", "q1", "median", "q3", "max"):
        assert getattr(actual.cos, field) == pytest.approx(getattr(expected.cos, field), abs=COS_ATOL), (
            f"{what} {field}"
        )
    assert actual.deficiency_share == pytest.approx(expected.deficiency_share, abs=COS_ATOL), what


@pytest.fixture
def pair(tmp_path):
    shapes = {"a.weight": (20, 33), "b.weight": (40, 40), "norm.weight": (40,)}
    expert, anti = random_delta(shapes), random_delta(shapes)
    _with_degenerate_rows(expert, anti, "a.weight")
    return expert, anti, save(tmp_path / "in" / "e.safetensors", expert), save(tmp_path / "in" / "a.safetensors", anti)


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCKS, 32 << 20], ids=["row blocks", "whole tensors"])
def test_dense_statistics_equal_a_float64_computation(tmp_path, pair, block_bytes):
    expert, anti, e, a = pair
    out = tmp_path / "out.safetensors"
    report = merge(e, a, out, lam=[0.5, 2.0], stats=True, block_bytes=block_bytes)
    by_name = {s.name: s for s in report.stats}
    assert sorted(by_name) == ["a.weight", "b.weight", "norm.weight"]
    for name in by_name:
        _assert_pair(by_name[name].pairs[0], _float64_pair(expert[name], anti[name]), name)
        for s, lam in enumerate((0.5, 2.0)):
            merged = load_file(report.outputs[s])[name].double()
            change = float((merged - expert[name].double()).norm() / expert[name].double().norm())
            assert by_name[name].relative_change[s] == pytest.approx(change, rel=1e-5), f"{name} λ={lam}"
    assert by_name["a.weight"].pairs[0].zero_expert_rows == 1 and by_name["a.weight"].pairs[0].antiparallel_rows == 1


def test_several_anti_experts_are_each_compared_with_the_expert_and_the_change_is_measured(tmp_path):
    expert, anti1, anti2 = (random_delta(SHAPES) for _ in range(3))
    paths = [save(tmp_path / f"{i}.safetensors", t) for i, t in enumerate((expert, anti1, anti2))]
    report = merge(paths[0], paths[1:], tmp_path / "out.safetensors", lam="1:0.5", stats=True)
    stats = {s.name: s for s in report.stats}["lm_head.weight"]
    assert [p.anti for p in stats.pairs] == ["ANTI #1", "ANTI #2"]
    _assert_pair(stats.pairs[1], _float64_pair(expert["lm_head.weight"], anti2["lm_head.weight"], "ANTI #2"), "2nd")
    out = load_file(tmp_path / "out.safetensors")["lm_head.weight"].double()
    p = expert["lm_head.weight"].double()
    assert stats.relative_change[0] == pytest.approx(float((out - p).norm() / p.norm()), rel=1e-5)


def test_with_a_base_the_statistics_are_those_of_the_task_vectors(tmp_path):
    base, d_plus, d_minus = random_delta(SHAPES), random_delta(SHAPES), random_delta(SHAPES)
    full = [{k: base[k] + d[k] for k in base} for d in (d_plus, d_minus)]
    e, a = save(tmp_path / "e.safetensors", full[0]), save(tmp_path / "a.safetensors", full[1])
    report = merge(e, a, tmp_path / "o.safetensors", base=save(tmp_path / "b.safetensors", base), stats=True)
    stats = {s.name: s for s in report.stats}["model.layers.0.self_attn.q_proj.weight"]
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = _float64_pair(full[0][name].double() - base[name].double(), full[1][name].double() - base[name].double())
    _assert_pair(stats.pairs[0], expected, name)


def _header_sha256(path) -> str:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:HEADER_LENGTH_BYTES], "little")
    return hashlib.sha256(raw[: HEADER_LENGTH_BYTES + n]).hexdigest()


def test_the_report_file_records_inputs_options_outputs_and_statistics(tmp_path, pair):
    _, _, e, a = pair
    record_path = tmp_path / "report.json"
    report = merge(e, a, tmp_path / "out", lam=[0.5, 1.0], max_shard_size="2kB", report=record_path)
    record = json.loads(record_path.read_text())
    assert record["extsub_report"] == 1 and record["mode"] == "merge" and record["command"].startswith("extsub-merge ")
    expert_record = record["inputs"][0]
    assert expert_record["role"] == "EXPERT" and expert_record["spec"] == str(e) and expert_record["kind"] == "file"
    assert expert_record["files"] == [
        {"name": "e.safetensors", "bytes": e.stat().st_size, "header_sha256": _header_sha256(e)}
    ]
    assert record["options"]["lam"] == [[0.5], [1.0]] and record["options"]["max_shard_size"] == "2kB"
    assert record["options"]["report"] == str(record_path) and record["options"]["device"] == "cpu"
    assert record["kernel"] == op_backend("cpu"), "what ran the op: the C++ kernel, or the eager path and why"
    for output, path in zip(record["outputs"], report.outputs, strict=True):
        on_disk = {f.name: f.stat().st_size for f in path.iterdir()}
        assert {f["name"]: f["bytes"] for f in output["files"]} == on_disk and len(on_disk) > 3, "shards and index"
    totals = record["totals"]
    assert totals["bytes_written"] == report.bytes_written and totals["peak_rss_bytes"] > 0
    item = next(i for i in record["items"] if i["name"] == "a.weight")
    assert item["action"] == "merged" and item["shape"] == [20, 33] and item["dtype"] == "F32"
    assert item["stats"]["pairs"][0]["degenerate_rows"] == 3 and len(item["stats"]["relative_change"]) == 2
    assert {row["module_type"] for row in record["summary"]} == {"a", "b", "norm"}


def test_the_report_goes_to_stdout_with_a_dash(tmp_path, pair, capsys):
    _, _, e, a = pair
    merge(e, a, tmp_path / "out.safetensors", report="-")
    record = json.loads(capsys.readouterr().out)
    assert record["items"][0]["stats"] is not None, "--report gathers the statistics"


def test_a_hub_input_is_recorded_with_its_resolved_commit_and_pinned_in_the_recipe(tmp_path, offline_cache, pair):
    _, _, e, a = pair
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_hub_cache(offline_cache, "org/expert", {"model.safetensors": e.read_bytes()}, commit)
    report = merge("org/expert", a, tmp_path / "out", report=tmp_path / "r.json")
    record = json.loads((tmp_path / "r.json").read_text())["inputs"][0]
    assert (record["repo"], record["revision"], record["commit"]) == ("org/expert", None, commit)
    assert "expert: org/expert@" + commit in (report.outputs[0] / "extsub_recipe.yaml").read_text()
    meta = safe_open(str(report.outputs[0] / "model.safetensors"), "pt").metadata()
    noted = json.loads(meta["extsub.inputs"])[0]
    assert noted["commit"] == commit and noted["files"][0]["header_sha256"] == _header_sha256(e)


def test_dry_run_writes_nothing_and_plans_the_files_a_real_run_writes(tmp_path, pair):
    _, _, e, a = pair
    before = hashes(tmp_path)
    planned = merge(e, a, tmp_path / "out", lam=[0.5, 1], max_shard_size="2kB", dry_run=True)
    assert hashes(tmp_path) == before and not leftovers(tmp_path) and not (tmp_path / "out-lam0.5").exists()
    assert planned.mode == "dry-run" and planned.bytes_written == 0 and "nothing was written" in planned.summary()
    real = merge(e, a, tmp_path / "out", lam=[0.5, 1], max_shard_size="2kB")
    for planned_files, path in zip(planned.files, real.outputs, strict=True):
        sizes = dict(planned_files)
        for f in path.iterdir():
            if f.suffix in (".safetensors", ".json"):
                assert sizes[f.name] == f.stat().st_size, f.name
            else:
                assert f.name in sizes and sizes[f.name] is None, f"{f.name} is written after the tensors"
    assert planned.bytes_read == real.bytes_read and [i.name for i in planned.items] == [i.name for i in real.items]


def test_dry_run_fails_as_the_real_run_would(tmp_path, pair):
    _, _, e, a = pair
    (tmp_path / "out.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="already exists; pass force=True"):
        merge(e, a, tmp_path / "out.safetensors", dry_run=True)


def test_a_shard_folder_and_a_report_beside_it(tmp_path):
    tensors = random_delta(SHAPES)
    folder = save_shards(tmp_path / "exp", tensors, 2)
    report = merge(
        folder, save(tmp_path / "a.safetensors", random_delta(SHAPES)), tmp_path / "o", report=tmp_path / "r"
    )
    record = json.loads((tmp_path / "r").read_text())
    assert [f["name"] for f in record["inputs"][0]["files"]] == [p.name for p in sorted(folder.glob("*.safetensors"))]
    assert report.outputs == (tmp_path / "o",)


@pytest.mark.parametrize(
    "where, message",
    [
        (lambda tmp, out: out / "r.json", "is inside OUT"),
        (lambda tmp, out: tmp / "in" / "e.safetensors", "is the EXPERT file"),
        (lambda tmp, out: tmp, "is a folder"),
        (lambda tmp, out: (tmp / "old.json").write_text("{}") and tmp / "old.json", "already exists; pass force=True"),
    ],
    ids=["inside OUT", "an input", "a folder", "exists"],
)
def test_a_report_path_that_would_harm_something_is_refused_before_any_work(tmp_path, pair, where, message):
    _, _, e, a = pair
    out = tmp_path / "out"
    target = where(tmp_path, out)
    before = hashes(tmp_path)
    with pytest.raises(InputError, match=message):
        merge(e, a, out, report=target)
    assert hashes(tmp_path) == before and not out.exists()


def test_dry_run_of_adapters_plans_the_adapter_folder(tmp_path, llama):
    _, paths = llama
    planned = merge(paths["expert"], paths["anti"], tmp_path / "ad", dry_run=True)
    assert not (tmp_path / "ad").exists() and planned.mode == "dry-run"
    real = merge(paths["expert"], paths["anti"], tmp_path / "ad")
    sizes = dict(planned.files[0])
    assert sizes["adapter_model.safetensors"] == (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    assert set(sizes) == {p.name for p in (tmp_path / "ad").iterdir()}
    assert [(i.name, i.action) for i in planned.items] == [(i.name, i.action) for i in real.items]
    assert {i.action for i in real.items} == {"merged", "copied", "dropped"}
