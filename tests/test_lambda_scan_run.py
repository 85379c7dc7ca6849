"""scan(): every row against an independent computation (the merge written by extsub-merge, loaded by PEFT or
transformers, scored by mean_nll), λ = 0 against the expert itself, the files, the recommendation, --save-best
against extsub-merge byte for byte, and the errors bad inputs give before anything is written."""

import json
import math
import os
import shlex
import shutil
import warnings

import pytest

from extsub_kernels import merge, scan
from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan.metrics import (
    distinct_n,
    generate_greedy,
    load_examples,
    load_prompts,
    mean_nll,
    mean_rep_n,
)
from extsub_kernels.lambda_scan.plot import png_size
from extsub_kernels.lambda_scan.report import SCAN_FILES
from extsub_kernels.lambda_scan.results import Guards

from helpers import DEVICES, lazy_module

peft = lazy_module("peft")
transformers = lazy_module("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

# The scan's model and the one loaded from the written merge hold the same numbers in float32; they differ only in
# how PEFT sums them (padded ranks, the scaling folded into B): a few ulps of the logits, ≲ 1e-6 relative on a mean
# NLL. 2⁻¹⁶ leaves a wide margin and still catches a wrong λ (a step of 0.5 moves these NLLs by > 1 %).
RTOL32 = 2.0**-16
LOOSE = Guards(max_rep_increase=1, max_distinct_drop=1, max_length_change=1e9, max_end_drop=1)  # every λ passes


def _sets(trained) -> dict:
    return {"keep": trained.eval_set("keep.jsonl"), "forget": trained.eval_set("forget.jsonl")}


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _direct(trained, model: str, kind: str, method: str, lam: float, tmp_path) -> tuple[float, float]:
    """(KEEP, FORGET) NLL of the merge at (method, λ) as extsub-merge writes it, loaded and scored independently."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained.base(model))
    out = tmp_path / f"direct-{kind}-{method}-{lam}"
    if kind == "full":
        experts = [trained.adapter(model, kind, role) for role in ("expert", "anti")]
        _quiet(lambda: merge(*experts, out, lam=lam, method=method, base=trained.base(model)))
        net = _quiet(lambda: transformers.AutoModelForCausalLM.from_pretrained(out))
    else:
        adapters = [trained.adapter(model, kind, role) for role in ("expert", "anti")]
        _quiet(lambda: merge(*adapters, out, lam=lam, method=method))
        net = _quiet(lambda: peft.PeftModel.from_pretrained(trained.load_base(model), out))
    sets = _sets(trained)
    return tuple(mean_nll(net.eval(), load_examples(sets[name], tokenizer)) for name in ("keep", "forget"))


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("llama", "lora"),
        ("gpt2", "lora"),
        ("llama", "ia3"),
        ("gpt2", "ia3"),
        ("llama_gqa", "prefix"),
        ("gpt2", "prefix_projection"),
        ("llama", "full"),
        ("gpt2", "full"),
    ],
)
def test_rows_equal_the_merge_written_and_loaded(trained, tmp_path, model, kind):
    """Each row measures what extsub-merge writes at that λ, loaded by PEFT or transformers: LoRA factors, (IA)³
    vectors (feedforward ones too) and prefixes (grouped-query geometry, saved after a projection) in PEFT layers,
    full models by the op into the loaded base; GPT-2's Conv1D layout in each."""
    result = scan(
        trained.adapter(model, kind, "expert"),
        trained.adapter(model, kind, "anti"),
        base=trained.base(model),
        **_sets(trained),
        lam="0,1.5",
        method="ext-sub,sub",
    )
    assert [(r.method, r.lam) for r in result] == [("expert", 0.0), ("ext-sub", 1.5), ("sub", 1.5)]
    assert result.complete and result.points == 3 and result.files == []
    for row in result:
        keep, forget = _direct(
            trained, model, kind, "ext-sub" if row.method == "expert" else row.method, row.lam, tmp_path
        )
        assert row.keep_nll == pytest.approx(keep, rel=RTOL32), row
        assert row.forget_nll == pytest.approx(forget, rel=RTOL32), row
        assert row.rep_4 is None and row.generate_seconds is None
        assert row.merge_seconds > 0 and row.keep_seconds > 0 and row.forget_seconds > 0
    # Different λ, different models: the rows are not all one number.
    assert len({round(r.keep_nll, 6) for r in result}) == 3


@pytest.mark.parametrize("kind", ["lora", "ia3", "prefix", "full"])
def test_lambda_zero_is_the_expert_itself(trained, kind):
    """The λ = 0 row against the expert loaded on its own: PeftModel(base, expert), or the fine-tuned model."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained.base("llama"))
    expert = trained.adapter("llama", kind, "expert")
    if kind == "full":
        net = _quiet(lambda: transformers.AutoModelForCausalLM.from_pretrained(expert))
    else:
        net = _quiet(lambda: peft.PeftModel.from_pretrained(trained.load_base("llama"), expert))
    result = scan(expert, trained.adapter("llama", kind, "anti"), base=trained.base("llama"), **_sets(trained), lam=0)
    assert [(r.method, r.lam) for r in result] == [("expert", 0.0)]
    for name, value in (("keep", result[0].keep_nll), ("forget", result[0].forget_nll)):
        expected = mean_nll(net.eval(), load_examples(_sets(trained)[name], tokenizer))
        assert value == pytest.approx(expected, rel=RTOL32), name


@pytest.mark.parametrize(("model", "kind"), [("llama", "lora"), ("llama_gqa", "prefix")])
def test_generation_metrics_equal_the_merge_written_and_loaded(trained, tmp_path, model, kind):
    """rep-4 and distinct-n of greedy continuations, against generate_greedy on the merge written and loaded (a
    prefix-tuned model decodes by plain forward passes, so the installed prefix must be the one used)."""
    prompts = trained.eval_set("prompts.txt")
    experts = [trained.adapter(model, kind, role) for role in ("expert", "anti")]
    kwargs = dict(lam=1, method="sub", prompts=prompts, max_new_tokens=8)
    result = scan(*experts, base=trained.base(model), **_sets(trained), **kwargs)
    _quiet(lambda: merge(*experts, tmp_path / "direct", lam=1, method="sub"))
    net = _quiet(lambda: peft.PeftModel.from_pretrained(trained.load_base(model), tmp_path / "direct")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained.base(model))
    tokens = [g.token_ids for g in generate_greedy(net, tokenizer, load_prompts(prompts, tokenizer), 8)]
    row = result.row("sub", 1.0)
    expected = (mean_rep_n(tokens, 4), distinct_n(tokens, 1), distinct_n(tokens, 2))
    measured = (row.rep_4, row.distinct_1, row.distinct_2)
    assert [None if math.isnan(v) else v for v in measured] == [None if math.isnan(v) else v for v in expected]
    assert row.generate_seconds > 0


def test_files_recommendation_and_generation_metrics(trained, tmp_path):
    out = tmp_path / "scan"
    result = scan(
        trained.adapter("llama", "full", "expert"),
        trained.adapter("llama", "full", "anti"),
        base=trained.base("llama"),
        **_sets(trained),
        prompts=trained.eval_set("prompts.txt"),
        truth=trained.eval_set("truth.jsonl"),
        max_new_tokens=8,
        out=out,
        lam="0:2:1",
        max_keep_increase=2.0,
        guards=LOOSE,
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(SCAN_FILES)
    assert result.files == [out / name for name in SCAN_FILES]
    data = json.loads((out / "scan.json").read_text())
    assert data["status"] == "complete" and data["points"] == data["measured"] == 5
    assert data["pem"] == "full models" and data["options"]["lam"] == [0.0, 1.0, 2.0]
    assert data["sets"]["keep"]["examples"] == 24 and data["sets"]["prompts"]["prompts"] == 12
    expert = result[0]
    for row, saved in zip(result, data["rows"], strict=True):
        assert saved["method"] == row.method and saved["keep_nll"] == row.keep_nll and saved["rep_4"] == row.rep_4
        assert saved["keep_increase"] == pytest.approx((row.keep_nll - expert.keep_nll) / expert.keep_nll)
        parts = (row.keep_seconds, row.forget_seconds, row.truth_seconds, row.generate_seconds)
        assert saved["eval_seconds"] == pytest.approx(sum(parts))
        assert saved["truth_margin"] == pytest.approx(row.forget_nll - row.truth_nll)
        assert 0 <= row.rep_4 < 1 and 0 < row.distinct_1 <= 1 and 0 < row.distinct_2 <= 1
        assert 0 <= row.end_rate <= 1 and 0 <= row.mean_length <= 8
    # The recommendation, by its definition, from the rows themselves (guards loose enough to pass every λ).
    for method in ("ext-sub", "sub"):
        allowed = [r for r in result if r.method in (method, "expert") and r.keep_nll <= expert.keep_nll * 3.0]
        best = max(allowed, key=lambda r: (r.truth_margin, -r.lam))
        assert result.recommendations[method].lam == best.lam
        assert data["recommended"][method]["lam"] == best.lam
    # Timing: both sides of the merge budget are in scan.json.
    timing = data["timing"]
    smallest = timing["smallest_evaluation"]
    assert smallest in ("keep", "forget", "truth", "generate")
    assert timing["merge_share_of_smallest_evaluation"] == pytest.approx(
        timing["merge_seconds_median"] / timing[f"{smallest}_seconds_median"]
    )
    lines = (out / "scan.csv").read_text().splitlines()
    assert lines[0].startswith("method,lam,keep_nll,keep_increase,forget_nll") and len(lines) == 6
    assert "| expert" in (out / "scan.md").read_text() and "★" in (out / "scan.md").read_text()
    png = (out / "scan.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == png_size(7)
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 5 * 12 and json.loads(samples[0])["method"] == "expert"


@pytest.mark.parametrize(("kind", "save_format"), [("lora", None), ("lora", "model"), ("full", None)])
def test_save_best_writes_what_extsub_merge_writes(trained, tmp_path, kind, save_format):
    """--save-best records the extsub-merge command it equals; that command, run by extsub-merge into the same OUT,
    writes the same files byte for byte (weights, metadata, model card, recipe)."""
    from extsub_kernels.cli.merge import main as extsub_merge

    expert, anti = (trained.adapter("llama", kind, role) for role in ("expert", "anti"))
    best = tmp_path / "best"
    result = scan(
        expert,
        anti,
        base=trained.base("llama"),
        **_sets(trained),
        lam="0,1",
        truth=trained.eval_set("truth.jsonl"),
        method="sub",
        max_keep_increase=100.0,  # any λ qualifies: the best is λ = 1 unless the FORGET − TRUTH margin fell
        save_best=best,
        save_format=save_format,
    )
    lam = result.recommendations["sub"].lam
    assert lam == (1.0 if result.row("sub", 1.0).truth_margin > result[0].truth_margin else 0.0)
    if lam == 0:  # the expert itself: nothing is saved (test_save_best_writes_nothing_when_the_expert_is_recommended)
        assert result.saved is None and not best.exists()
        return
    assert result.saved.outputs == (best,)
    full = kind == "full" or save_format == "model"
    command = shlex.split(result.saved.context.command)
    assert command[:3] == ["extsub-merge", str(expert), str(anti)] and command[command.index("-o") + 1] == str(best)
    assert command[command.index("--lam") + 1] == f"{lam:g}" and command[command.index("--method") + 1] == "sub"
    assert (command[command.index("--base") + 1] == str(trained.base("llama"))) if full else "--base" not in command
    scanned = best.rename(tmp_path / "scanned")
    assert _quiet(lambda: extsub_merge(command[1:])) == 0
    written = sorted(p.name for p in scanned.iterdir())
    assert written == sorted(p.name for p in best.iterdir())
    assert ("model.safetensors" if full else "adapter_model.safetensors") in written
    for name in written:
        if name == "README.md":  # the scan's card says how λ was chosen; the rest is the command's card
            card = (scanned / name).read_text()
            start = card.index("## How λ was chosen\n")
            end = card.find("\n## ", start + 1)
            assert card[:start] + (card[end + 1 :] if end != -1 else "") == (best / name).read_text()
            continue
        assert (scanned / name).read_bytes() == (best / name).read_bytes(), name


@pytest.mark.parametrize("stop", ["interrupt", "failure"])
def test_a_stop_keeps_the_rows(trained, tmp_path, monkeypatch, stop):
    """A Ctrl-C (or an error) during the third point: the two rows before it are returned (ScanInterrupted) and
    written, with the status saying why the scan stopped; nothing is saved."""
    from extsub_kernels.errors import ScanInterrupted
    from extsub_kernels.lambda_scan import evaluate

    calls = []
    measure = evaluate.Evaluator.measure

    def stopped(self, model):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt if stop == "interrupt" else RuntimeError("out of memory")
        return measure(self, model)

    monkeypatch.setattr(evaluate.Evaluator, "measure", stopped)
    error, match = (ScanInterrupted, "interrupted after 2 of 5 points") if stop == "interrupt" else (RuntimeError, "")
    with pytest.raises(error, match=match) as info:
        scan(
            trained.adapter("llama", "lora", "expert"),
            trained.adapter("llama", "lora", "anti"),
            base=trained.base("llama"),
            **_sets(trained),
            truth=trained.eval_set("truth.jsonl"),
            lam="0,1,2",
            out=tmp_path / "scan",
            save_best=tmp_path / "best",
        )
    status = "interrupted" if stop == "interrupt" else "failed: RuntimeError: out of memory"
    if stop == "interrupt":
        partial = info.value.result
        assert not info.value.terminated and partial.status == status and len(partial) == 2
    data = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert data["status"] == status and data["measured"] == 2 and data["points"] == 5
    assert [r["lam"] for r in data["rows"]] == [0.0, 1.0]
    assert (tmp_path / "scan" / "scan.png").is_file() and not (tmp_path / "best").exists()


def _tokenizerless_base(trained, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained.base("llama") / name, folder / name)
    return folder


def test_pretokenised_sets_for_a_model_without_tokenizer(trained, tmp_path):
    base = _tokenizerless_base(trained, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained.base("llama"))
    for name in ("keep", "forget"):
        examples = load_examples(_sets(trained)[name], tokenizer)
        rows = [
            {"prompt_ids": e.input_ids[: e.n_context], "completion_ids": e.input_ids[e.n_context :]} for e in examples
        ]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt_ids": [2, 5, 9, 6]}) + "\n")
    experts = [trained.adapter("llama", "full", role) for role in ("expert", "anti")]
    kwargs = dict(lam="0,1", method="sub", prompts=tmp_path / "prompts.jsonl", max_new_tokens=6)
    by_ids = scan(*experts, base=base, keep=tmp_path / "keep.jsonl", forget=tmp_path / "forget.jsonl", **kwargs)
    by_text = scan(*experts, base=trained.base("llama"), **_sets(trained), **kwargs)
    assert [(r.keep_nll, r.forget_nll, r.rep_4) for r in by_ids] == [
        (r.keep_nll, r.forget_nll, r.rep_4) for r in by_text
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(keep="missing.txt"), r"missing\.txt: no such file"),
        (dict(forget="empty.txt"), r"empty\.txt: no examples"),
        (dict(lam="0:2:0"), r"the step must be positive"),
        (dict(method="ext-sub,extsub"), r"unknown method 'extsub'"),
        (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (dict(max_keep_increase=-0.1), r"max_keep_increase must be ≥ 0"),
        (dict(dtype="fp8"), r"unknown dtype 'fp8'"),
        (dict(save_format="lora"), r"save_format= says how save_best= writes the best merge; give save_best= too"),
        (dict(anti="gpt2-lora"), r"was trained on base model .* but the expert .* on"),
        (
            dict(anti="llama-full"),
            r"is a PEFT adapter but ANTI .* is a dense checkpoint; Ext-Sub combines adapters with adapters",
        ),
        (
            dict(anti="llama-ia3"),
            r"is a \(IA\)³ adapter but the expert .* is a LoRA adapter; Ext-Sub combines adapters of",
        ),
        (dict(base="llama-lora"), r"BASE .* is a PEFT adapter; base= takes the full base model"),
        (
            dict(base="gpt2"),
            r"does not fit BASE base-gpt2: BASE has no module model\.layers\.0\..* \(and 13 more of its 14\)",
        ),
        (dict(base="no-tokenizer"), r"keep\.jsonl line 1: prompt \+ completion is text, but there is no tokenizer"),
        (dict(save_best="expert"), r"the best merge .* is the EXPERT folder"),
        (dict(out="expert"), r"is the EXPERT folder"),
    ],
)
def test_bad_inputs_write_nothing(trained, tmp_path, change, message):
    named = {
        "gpt2-lora": trained.adapter("gpt2", "lora", "anti"),
        "llama-full": trained.adapter("llama", "full", "anti"),
        "llama-lora": trained.adapter("llama", "lora", "anti"),
        "llama-ia3": trained.adapter("llama", "ia3", "anti"),
        "gpt2": trained.base("gpt2"),
        "expert": trained.adapter("llama", "lora", "expert"),
    }
    (tmp_path / "empty.txt").write_text("\n")
    if change.get("base") == "no-tokenizer":
        change = dict(base=_tokenizerless_base(trained, tmp_path))
    kwargs = dict(
        base=trained.base("llama"), **_sets(trained), out=tmp_path / "scan", lam="0,1", save_best=None, anti=None
    )
    for key, value in change.items():
        if isinstance(value, str) and value in named:
            value = named[value]
        elif key in ("keep", "forget"):
            value = tmp_path / value
        kwargs[key] = value
    anti = kwargs.pop("anti") or trained.adapter("llama", "lora", "anti")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match=message):
        scan(trained.adapter("llama", "lora", "expert"), anti, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no scan folder, no --save-best output


def test_an_existing_scan_needs_force(trained, tmp_path):
    out = tmp_path / "scan"
    out.mkdir()
    (out / "scan.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    kwargs = dict(base=trained.base("llama"), **_sets(trained), out=out, lam=0)
    experts = [trained.adapter("llama", "full", role) for role in ("expert", "anti")]
    with pytest.raises(InputError, match=r"scan already holds scan\.json \(an earlier run\?\); pass force=True"):
        scan(*experts, **kwargs)
    scan(*experts, **kwargs, force=True)
    assert json.loads((out / "scan.json").read_text())["measured"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # other files are left alone


def test_missing_dependencies_are_named(trained, monkeypatch):
    from extsub_kernels.lambda_scan.model import require

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(
        InputError, match=r'needs matplotlib, which is not installed; install with: pip install -e "\.\[scan\]"'
    ):
        require("transformers", "matplotlib")
    experts = [trained.adapter("llama", "lora", role) for role in ("expert", "anti")]
    with pytest.raises(InputError, match="needs matplotlib"):
        scan(*experts, base=trained.base("llama"), **_sets(trained), out=trained.root / "never-written")
    assert not (trained.root / "never-written").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype(trained, device):
    """On the device asked for, in the dtype asked for: float64 rows against float32 ones (the same merges)."""
    experts = [trained.adapter("llama", "lora", role) for role in ("expert", "anti")]
    kwargs = dict(base=trained.base("llama"), **_sets(trained), lam="0,1", method="ext-sub")
    wide = scan(*experts, **kwargs, device=device, dtype="float64")
    assert wide.setup["options"]["device"].startswith(device) and wide.setup["options"]["dtype"] == "float64"
    narrow = scan(*experts, **kwargs, device="cpu", dtype="float32")
    for a, b in zip(wide, narrow, strict=True):  # float64 logits: close to the float32 ones, not equal to them
        assert a.keep_nll == pytest.approx(b.keep_nll, rel=2.0**-12) and a.keep_nll != b.keep_nll


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_cuda_runs_in_the_models_dtype(trained, kind):
    """--dtype auto on CUDA: the checkpoint's dtype (float32 here), the merge on the GPU (LoRA factors, the op);
    the rows match the CPU's to float32 noise."""
    experts = [trained.adapter("llama", kind, role) for role in ("expert", "anti")]
    kwargs = dict(base=trained.base("llama"), **_sets(trained), lam="0,1")
    gpu = scan(*experts, **kwargs, device="cuda")
    cpu = scan(*experts, **kwargs, device="cpu")
    assert gpu.setup["options"]["dtype"] == "float32" and gpu.setup["options"]["device"].startswith("cuda")
    for a, b in zip(gpu, cpu, strict=True):
        assert a.keep_nll == pytest.approx(b.keep_nll, rel=2.0**-12)
        assert a.forget_nll == pytest.approx(b.forget_nll, rel=2.0**-12)


def test_a_negative_lambda_is_allowed_with_the_merges_warning():
    """The grid takes what merge() takes; a negative λ warns as extsub-merge does, once per method (before any
    other check, so a bad batch size here stops the scan right after)."""
    with (
        pytest.warns(UserWarning, match=r"λ = -0\.5 is negative: ext-sub then adds the deficiency") as caught,
        pytest.raises(InputError, match="batch_size must be a positive integer"),
    ):
        scan("e", "a", base="b", keep="k", forget="f", lam="-0.5,1", method="ext-sub,sub", batch_size=0)
    assert [str(w.message).split(":")[1].strip().split()[0] for w in caught] == ["ext-sub", "sub"]


def test_an_input_changed_before_save_best_saves_nothing(trained, tmp_path, monkeypatch):
    """--save-best merges the inputs again: if one changed since the scan read it, nothing is saved and the error
    names the scan files, which hold every row, and say why the run failed."""
    from extsub_kernels.errors import MergeError
    from extsub_kernels.lambda_scan import report

    expert = tmp_path / "expert"
    shutil.copytree(trained.adapter("llama", "lora", "expert"), expert)
    final = report.ScanFiles.final

    def final_then_touch(self, result):
        written = final(self, result)
        os.utime(expert / "adapter_model.safetensors", ns=(1, 1))  # after the last point, before --save-best
        return written

    monkeypatch.setattr(report.ScanFiles, "final", final_then_touch)
    out = tmp_path / "scan"
    with pytest.raises(MergeError, match=r"EXPERT .*adapter_model\.safetensors changed while the scan read it") as info:
        scan(
            expert,
            trained.adapter("llama", "lora", "anti"),
            base=trained.base("llama"),
            **_sets(trained),
            truth=trained.eval_set("truth.jsonl"),
            lam="0,1",
            out=out,
            save_best=tmp_path / "best",
        )
    assert info.value.published == tuple(out / name for name in SCAN_FILES if name != "samples.jsonl")
    data = json.loads((out / "scan.json").read_text())
    assert data["status"].startswith("failed: MergeError: EXPERT") and data["measured"] == 3, "as the exit code says"
    assert not (tmp_path / "best").exists()


def test_full_weights_the_models_dtype_cannot_hold_stop_the_scan(trained, tmp_path):
    """λ so large that merged weights overflow float16: a MergeError naming the tensor and what to do, the rows
    before it kept (scan.json says why the scan stopped)."""
    from extsub_kernels.errors import MergeError

    experts = [trained.adapter("llama", "full", role) for role in ("expert", "anti")]
    out = tmp_path / "scan"
    with pytest.raises(
        MergeError, match=r"tensor .*: the merge at sub λ=1e\+30 does not fit the model's float16; scan"
    ):
        scan(
            *experts, base=trained.base("llama"), **_sets(trained), lam="0,1e30", method="sub", dtype="float16", out=out
        )
    data = json.loads((out / "scan.json").read_text())
    assert data["status"].startswith("failed: MergeError: tensor ") and data["measured"] == 1
    assert data["rows"][0]["method"] == "expert" and math.isfinite(data["rows"][0]["keep_nll"])


def test_a_diverged_adapter_point_is_measured_and_never_recommended(trained, tmp_path):
    """PEFT keeps adapter weights in float32 on a float16 model, so a huge λ installs fine and the float16 forward
    overflows: the row is kept as measured (null NLLs in scan.json), the scan goes on, the expert is recommended."""
    experts = [trained.adapter("llama", "lora", role) for role in ("expert", "anti")]
    out = tmp_path / "scan"
    truth = trained.eval_set("truth.jsonl")
    result = scan(
        *experts,
        base=trained.base("llama"),
        **_sets(trained),
        truth=truth,
        lam="0,1e4",
        method="sub",
        dtype="float16",
        out=out,
    )
    assert result.complete and math.isnan(result.row("sub", 1e4).keep_nll)
    assert result.recommendations["sub"].lam == 0.0 and "non-finite NLL" in result.recommendations["sub"].note
    data = json.loads((out / "scan.json").read_text())
    assert data["rows"][1]["keep_nll"] is None and data["rows"][1]["keep_increase"] is None


# --- small inputs of our own (a tiny LLaMA with no tokenizer, pre-tokenised sets) -----------


@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory):
    """A tiny LLaMA base (random weights, no tokenizer), LoRA and prefix-tuning adapter pairs, token-id sets."""
    import torch

    from peft_fixtures import LLAMA_ADAPTERS, make_adapters, tiny_llama

    folder = tmp_path_factory.mktemp("tiny_scan")
    torch.manual_seed(1234)
    base = tiny_llama()
    _quiet(lambda: base.save_pretrained(folder / "base"))
    lora = make_adapters(base, {k: LLAMA_ADAPTERS[k] for k in ("expert", "anti")}, folder / "lora")
    prefix = {}
    for i, role in enumerate(("expert", "anti")):
        torch.manual_seed(1235 + i)
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        model = _quiet(lambda c=config: peft.get_peft_model(tiny_llama(), c))
        _quiet(lambda m=model, r=role: m.save_pretrained(folder / "prefix" / r))
        prefix[role] = str(folder / "prefix" / role)
    ids = "\n".join(json.dumps({"input_ids": [3 + i, 17, 42 + i, 99, 5]}) for i in range(4)) + "\n"
    (folder / "set.jsonl").write_text(ids)
    pairs = "\n".join(json.dumps({"prompt_ids": [3 + i, 17], "completion_ids": [42 + i, 99]}) for i in range(4))
    (folder / "pairs.jsonl").write_text(pairs + "\n")  # TRUTH for itself: the FORGET − TRUTH margin is 0 at every λ
    return {
        "base": folder / "base",
        "lora": lora,
        "prefix": prefix,
        "set": folder / "set.jsonl",
        "pairs": folder / "pairs.jsonl",
    }


def _scan_tiny(tiny_scan, kind: str = "lora", **options):
    """scan() of `kind`'s pair on the tiny base: KEEP the id set, FORGET and TRUTH the same pairs."""
    adapters = tiny_scan[kind]
    sets = dict(keep=tiny_scan["set"], forget=tiny_scan["pairs"], truth=tiny_scan["pairs"])
    return scan(adapters["expert"], adapters["anti"], base=tiny_scan["base"], **sets, **options)


@pytest.mark.parametrize(
    ("kind", "save_format", "message"),
    [
        ("lora", "ia3", r"format=ia3 does not apply to LoRA adapters; their formats: lora"),
        ("prefix", "model", r"save_format= model: prefix-tuning adapters change no weight.*save_format= prefix-tuning"),
        ("lora", "model-ish", r"unknown format 'model-ish'"),
    ],
)
def test_save_format_is_checked_before_base_loads(tiny_scan, tmp_path, monkeypatch, kind, save_format, message):
    """A --format that --save-best cannot write fails before MODEL loads and before any point is measured."""
    import extsub_kernels.lambda_scan.workers as workers

    def no_load(*args, **kwargs):
        raise AssertionError("MODEL loaded before --format was checked")

    monkeypatch.setattr(workers, "load_model", no_load)
    with pytest.raises(InputError, match=message):
        _scan_tiny(
            tiny_scan, kind, out=tmp_path / "scan", lam="0,1", save_best=tmp_path / "best", save_format=save_format
        )
    assert not list(tmp_path.iterdir())


def test_save_best_writes_nothing_when_the_expert_is_recommended(tiny_scan, tmp_path):
    """TRUTH = FORGET: the FORGET − TRUTH margin is 0 at every λ, so no λ > 0 does better and λ = 0 (the expert) is
    recommended; --save-best says so and writes no copy of the expert labelled as a merge."""
    with pytest.warns(UserWarning, match=r"the best merge: the recommended λ of ext-sub is 0, the expert.*nothing"):
        result = _scan_tiny(
            tiny_scan, out=None, lam="0,1", method="ext-sub", max_keep_increase=1e9, save_best=tmp_path / "best"
        )
    assert result.recommendations["ext-sub"].lam == 0
    assert result.saved is None and not (tmp_path / "best").exists()


def test_missing_dependencies_are_named_together_with_a_command_that_resolves(tiny_scan, monkeypatch):
    """Without transformers and peft, one error names both, with an install command that works before the
    package is on an index (from the source checkout)."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "peft", None)
    adapters = tiny_scan["lora"]
    with pytest.raises(InputError, match=r"needs transformers, peft, which are not installed") as info:
        scan(
            adapters["expert"], adapters["anti"], base=tiny_scan["base"], keep=tiny_scan["set"], forget=tiny_scan["set"]
        )
    assert 'pip install -e ".[scan]"' in str(info.value) and "extsub[" not in str(info.value)


def test_save_best_s_card_records_the_scan(tiny_scan, tmp_path, monkeypatch):
    """The model card of --save-best says how λ was chosen: the grid, the sets and the row measured at that λ."""
    import extsub_kernels.lambda_scan.run as run
    from extsub_kernels.lambda_scan.results import Recommendation

    def at_one(rows, method, *rules):  # the recommendation itself is tested above; here: what is saved
        return Recommendation(method, 1.0, 0.01, 0.2, "chosen for the test")

    monkeypatch.setattr(run, "recommend", at_one)
    result = _scan_tiny(tiny_scan, lam="0,1", method="sub", save_best=tmp_path / "best")
    card = (tmp_path / "best" / "README.md").read_text()
    row = result.row("sub", 1.0)
    assert "## How λ was chosen" in card and "extsub-scan" in card
    assert "grid λ ∈ {0, 1}" in card and "methods sub" in card and "set.jsonl" in card
    assert f"KEEP NLL {row.keep_nll:.6g}" in card and f"FORGET NLL {row.forget_nll:.6g}" in card
