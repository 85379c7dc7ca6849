"""TRUTH and CHOICES are inputs like KEEP and FORGET (issue 23): checked against the model's vocabulary and positions
before any scan file is written, never an output's path, and checked unchanged while the scan runs."""

import json
import os

import pytest

from extsub_kernels import scan
from extsub_kernels.errors import InputError, MergeError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def _pairs(trained) -> list[dict]:
    return [json.loads(line) for line in trained.eval_set("forget.jsonl").read_text().splitlines() if line.strip()]


def _truth(trained, path, stretch: int = 1):
    """TRUTH for FORGET: its prompts, each completion `stretch` times over."""
    path.write_text("".join(json.dumps(p | {"completion": p["completion"] * stretch}) + "\n" for p in _pairs(trained)))
    return path


def _choices(trained, path):
    """Questions from FORGET's prompts: the true completion against another's."""
    pairs = _pairs(trained)
    lines = [
        {"question": p["prompt"], "correct": [p["completion"]], "incorrect": [q["completion"]]}
        for p, q in zip(pairs, pairs[1:] + pairs[:1], strict=True)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _scan(trained, **options):
    experts = trained.adapter("llama", "lora", "expert"), trained.adapter("llama", "lora", "anti")
    sets = {"keep": trained.eval_set("keep.jsonl"), "forget": trained.eval_set("forget.jsonl")}
    return scan(*experts, base=trained.base("llama"), **sets, lam="0,1", method="sub", **options)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("truth", r"truth\.jsonl line 1: \d+ tokens, more than the model's 64 positions; shorten it"),
        ("choices", r"choices\.jsonl line \d+: token id 99 is outside the model's vocabulary of 42"),
    ],
)
def test_a_set_that_does_not_fit_the_model_exits_before_any_file(trained, tmp_path, which, message):
    sets = {"truth": _truth(trained, tmp_path / "truth.jsonl", stretch=40 if which == "truth" else 1)}
    if which == "choices":  # pre-tokenised, with an id past the vocabulary
        sets["choices"] = tmp_path / "choices.jsonl"
        sets["choices"].write_text(json.dumps({"question_ids": [3, 4], "correct": [[5, 6]], "incorrect": [[7, 99]]}))
    with pytest.raises(InputError, match=message):
        _scan(trained, out=tmp_path / "scan", **sets)
    assert not (tmp_path / "scan").exists()


@pytest.mark.parametrize("which", ["truth", "choices"])
@pytest.mark.parametrize("output", ["scan file", "save_best"])
def test_a_set_is_never_an_output(trained, tmp_path, which, output):
    """A set where scan.json's folder writes samples.jsonl, or where save_best= writes, is refused (even with
    force=True), and left as it was."""
    folder = tmp_path / "scan"
    folder.mkdir()
    path = folder / "samples.jsonl" if output == "scan file" else tmp_path / f"{which}.jsonl"
    sets = {"truth": _truth(trained, tmp_path / "t.jsonl")}
    sets[which] = _truth(trained, path) if which == "truth" else _choices(trained, path)
    before = path.read_bytes()
    where = {"out": folder} if output == "scan file" else {"out": folder, "save_best": path}
    with pytest.raises(InputError, match=rf"is {which.upper()} .*{path.name}, which this run reads"):
        _scan(trained, force=True, **sets, **where)
    left = sorted(p.name for p in folder.iterdir())
    assert path.read_bytes() == before and left == (["samples.jsonl"] if output == "scan file" else [])


@pytest.mark.parametrize("which", ["truth", "choices"])
def test_a_set_changed_during_the_scan_stops_it(trained, tmp_path, monkeypatch, which):
    """A set written to while the scan runs: MergeError naming it; the rows before it are kept in scan.json."""
    from extsub_kernels.lambda_scan import evaluate

    sets = {"truth": _truth(trained, tmp_path / "truth.jsonl")}
    if which == "choices":
        sets["choices"] = _choices(trained, tmp_path / "choices.jsonl")
    measure, calls = evaluate.Evaluator.measure, []

    def measure_then_touch(self, model):
        calls.append(1)
        if len(calls) == 2:
            os.utime(sets[which], ns=(1, 1))
        return measure(self, model)

    monkeypatch.setattr(evaluate.Evaluator, "measure", measure_then_touch)
    with pytest.raises(MergeError, match=rf"{which.upper()} .*{which}\.jsonl changed while the scan read it"):
        _scan(trained, out=tmp_path / "scan", **sets)
    data = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert data["status"].startswith(f"failed: MergeError: {which.upper()}") and data["measured"] == 1
