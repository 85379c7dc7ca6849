"""lambda_scan.harness: lm-evaluation-harness run on the model in place, on a small task defined in local files (no
network): its accuracy equals MC1 computed by choices.py from the same options, and a scan with --lm-eval has every
metric lm-eval reports as a column."""

import json

import pytest

from extsub_kernels import scan
from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan.choices import load_choices, score_choices
from extsub_kernels.lambda_scan.harness import Harness, metric_columns, parse_tasks

import chat_fixtures as cf

pytest.importorskip("lm_eval")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

DOCS = [
    {"question": "Is the earth flat?", "choices": ["No", "Yes", "Maybe"], "label": 0},
    {"question": "Do cats bark?", "choices": ["Often", "No"], "label": 1},
    {"question": "What is two plus two?", "choices": ["Three", "Five", "Four", "Two"], "label": 2},
    {"question": "Which is a colour?", "choices": ["Blue", "Seven"], "label": 0},
]


def _task(folder) -> str:
    """A multiple-choice task in lm-eval's YAML, its documents in a local JSON-lines file."""
    folder.mkdir()
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(folder)


def test_lm_eval_accuracy_equals_mc1_from_the_same_options(tmp_path):
    """lm-eval scores each choice after the question and a space, as choices.py scores an option in plain text,
    so its acc is MC1 of the same questions (TruthfulQA's layout keeps the options in the task's order)."""
    model, tokenizer = cf.make_model().double(), cf.make_tokenizer(chat=False)
    harness = Harness(("tiny_mc",), (_task(tmp_path / "tasks"),), batch_size=4)
    harness.check()
    got = harness.measure(model, tokenizer)
    assert set(got) >= {"lm_eval:tiny_mc:acc"}
    records = [
        {
            "question": d["question"],
            "mc1_targets": {
                "choices": d["choices"],
                "labels": [int(i == d["label"]) for i in range(len(d["choices"]))],
            },
            "mc2_targets": {
                "choices": d["choices"],
                "labels": [int(i == d["label"]) for i in range(len(d["choices"]))],
            },
        }
        for d in DOCS
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mine = score_choices(model, load_choices(tmp_path / "mc.jsonl", tokenizer))
    assert got["lm_eval:tiny_mc:acc"] == pytest.approx(mine["mc1"], abs=1e-12)
    assert not model.training


def test_a_scan_with_lm_eval_has_its_metrics_as_columns(tmp_path):
    import copy
    import warnings

    import torch
    import transformers

    base = cf.save_base(tmp_path / "base", chat=False)
    net = transformers.AutoModelForCausalLM.from_pretrained(base)
    adapters = []
    for i, role in enumerate(("expert", "anti")):
        torch.manual_seed(cf.SEED + 1 + i)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(copy.deepcopy(net), config).save_pretrained(tmp_path / role)
        adapters.append(tmp_path / role)
    keep = tmp_path / "keep.txt"
    keep.write_text("the earth is round\ncats meow\n")
    result = scan(
        *adapters,
        base=base,
        keep=keep,
        forget=keep,
        lam="0,2",
        method="sub",
        lm_eval="tiny_mc",
        lm_eval_include=[_task(tmp_path / "tasks")],
        out=tmp_path / "scan",
    )
    assert result.setup["options"]["lm_eval"] == ["tiny_mc"]
    assert all("lm_eval:tiny_mc:acc" in r.lm_eval and r.lm_eval_seconds > 0 for r in result)
    header = (tmp_path / "scan" / "scan.csv").read_text().splitlines()[0].split(",")
    assert "lm_eval:tiny_mc:acc" in header and "lm_eval_seconds" in header
    rows = json.loads((tmp_path / "scan" / "scan.json").read_text())["rows"]
    assert [r["lm_eval:tiny_mc:acc"] for r in rows] == [r.lm_eval["lm_eval:tiny_mc:acc"] for r in result]
    assert "| tiny_mc:acc |" in (tmp_path / "scan" / "scan.md").read_text()


def test_unknown_tasks_and_folders_are_named(tmp_path):
    with pytest.raises(InputError, match=r"lm_eval=: unknown task\(s\) no_such_task \(not among lm-eval's tasks"):
        Harness(("no_such_task",)).check()
    with pytest.raises(InputError, match=r"lm_eval_include= .*missing: no such folder"):
        Harness(("tiny_mc",), (str(tmp_path / "missing"),)).check()
    with pytest.raises(InputError, match="give at least one task name"):
        parse_tasks(" , ")
    assert parse_tasks("a, b") == ("a", "b")


def test_metric_columns():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict": 1}}
    columns = metric_columns(results)
    assert columns["lm_eval:t:acc"] == 0.5 and columns["lm_eval:t:exact_match,strict"] == 1.0
    assert columns["lm_eval:t:acc_stderr"] != columns["lm_eval:t:acc_stderr"]  # NaN
