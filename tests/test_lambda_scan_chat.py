"""A chat model scanned as it is used: prompts through the chat template (the same tokens as sets rendered by hand),
left-padded generation equal to one prompt at a time, stop tokens from generation_config, and a whole scan with
multiple choice, guards and samples.jsonl, on a tiny model with random weights (nothing trained)."""

import copy
import functools
import json
import warnings

import pytest
import torch

from extsub_kernels import merge, scan
from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan.choices import load_choices, score_choices
from extsub_kernels.lambda_scan.metrics import generate_greedy, load_examples, mean_nll, stop_ids
from extsub_kernels.lambda_scan.rendering import ChatTemplate, chat_template

import chat_fixtures as cf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("Name a prime number.", "Seven is prime."),
    ("Is the earth flat?", "No, it is round."),
]
PROMPTS = ["Say hi.", "What colour is the sky on a clear day?", "Count to three."]
QUESTIONS = [
    {"question": "Is the earth flat?", "correct": ["No", "It is round"], "incorrect": ["Yes", "It is flat"]},
    {"question": "Do cats bark?", "correct": ["No"], "incorrect": ["Yes", "Only at night"]},
]


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _rendered(tokenizer, prompt: str, system: str | None = None) -> str:
    return tokenizer.apply_chat_template(
        ChatTemplate(system).messages(prompt), add_generation_prompt=True, tokenize=False
    )


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_chat_rendering_scores_the_tokens_of_sets_rendered_by_hand(tmp_path, system):
    """Plain prompt + completion lines through the template give the examples of the same lines rendered by hand
    and read without it; the completion follows the assistant's header with no space, its end of turn unscored."""
    tokenizer = cf.make_tokenizer()
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    by_hand = _jsonl(
        tmp_path / "by_hand.jsonl", [{"prompt": _rendered(tokenizer, p, system), "completion": c} for p, c in PAIRS]
    )
    chat = ChatTemplate(system)
    through = load_examples(plain, tokenizer, chat)
    assert [(e.input_ids, e.n_context) for e in through] == [
        (e.input_ids, e.n_context) for e in load_examples(by_hand, tokenizer)
    ]
    for e, (_, completion) in zip(through, PAIRS, strict=True):
        assert tokenizer.decode(e.input_ids[e.n_context :]) == completion
        assert tokenizer.decode(e.input_ids[: e.n_context]).endswith("<|im_start|>assistant\n")


def test_chat_template_modes():
    tokenizer = cf.make_tokenizer()
    assert chat_template(tokenizer) == ChatTemplate() and chat_template(tokenizer, "on", "sys") == ChatTemplate("sys")
    assert chat_template(tokenizer, "off") is None and chat_template(cf.make_tokenizer(chat=False)) is None
    with pytest.raises(InputError, match="chat_template='on': the base model's tokenizer has no chat template"):
        chat_template(cf.make_tokenizer(chat=False), "on")
    with pytest.raises(InputError, match="system= is a chat template's system message; it needs the chat template"):
        chat_template(tokenizer, "off", "sys")


def _reference_greedy(model, ids: list[int], max_new_tokens: int, stops: set[int]) -> tuple[tuple[int, ...], bool]:
    """Argmax of a full forward pass per step, one prompt, no padding, no cache, up to a stop token."""
    ids, new = list(ids), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token in stops:
            return tuple(new), True
        ids.append(token)
        new.append(token)
    return tuple(new), False


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_left_padded_batches_generate_what_each_prompt_generates_alone(name):
    """Prompts of different lengths share one left-padded batch; each continuation is the plain argmax loop's, and
    stops at any stop token of the generation config (a chat model's end of turn beside EOS)."""
    model, tokenizer = cf.make_model(name), cf.make_tokenizer()
    chat = ChatTemplate()
    encoded = [list(tokenizer(_rendered(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert len({len(e) for e in encoded}) == len(encoded)  # every prompt a different length
    free = _reference_greedy(model, encoded[1], 12, set())[0]
    k = next((k for k in range(1, len(free)) if free[k] not in free[:k]), 0)  # a new token, reached after k others
    model.generation_config.eos_token_id = [cf.EOS_ID, free[k]]
    stops = stop_ids(model, tokenizer)
    assert stops == {cf.EOS_ID, free[k]}
    batched = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8, chat=chat)
    single = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1, chat=chat)
    assert batched == single
    for ids, g in zip(encoded, batched, strict=True):
        assert (g.token_ids, g.stopped) == _reference_greedy(model, ids, 12, stops)
    assert batched[1].token_ids == free[:k] and batched[1].stopped


def _adapters(base_dir, tmp_path) -> tuple[str, str]:
    """An expert and an anti-expert LoRA of the chat model, random factors from fixed seeds (B ≠ 0)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    paths = []
    for i, role in enumerate(("expert", "anti")):
        torch.manual_seed(cf.SEED + 1 + i)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / role)
        paths.append(str(tmp_path / role))
    return paths[0], paths[1]


def test_a_chat_scan_with_choices_guards_and_samples(tmp_path):
    """Plain sets through the template and the same sets rendered by hand (template off) give the same rows; MC1
    and MC2 are those of the merged model at each λ; samples.jsonl has every continuation; the recommendation is
    MC2's, among the λ the guards allow."""
    base = cf.save_base(tmp_path / "base")
    expert, anti = _adapters(base, tmp_path)
    tokenizer = cf.make_tokenizer()
    plain = {
        "keep": _jsonl(tmp_path / "keep.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS]),
        "forget": _jsonl(tmp_path / "forget.jsonl", [{"prompt": p, "completion": c[::-1]} for p, c in PAIRS]),
        "choices": _jsonl(tmp_path / "mc.jsonl", QUESTIONS),
        "prompts": _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
    }
    by_hand = {
        "keep": _jsonl(
            tmp_path / "keep_r.jsonl", [{"prompt": _rendered(tokenizer, p), "completion": c} for p, c in PAIRS]
        ),
        "forget": _jsonl(
            tmp_path / "forget_r.jsonl",
            [{"prompt": _rendered(tokenizer, p), "completion": c[::-1]} for p, c in PAIRS],
        ),
        "choices": _jsonl(
            tmp_path / "mc_r.jsonl",
            [
                {"question_ids": tokenizer(_rendered(tokenizer, q["question"]))["input_ids"]}
                | {k: [tokenizer(o)["input_ids"] for o in q[k]] for k in ("correct", "incorrect")}
                for q in QUESTIONS
            ],
        ),
        "prompts": _jsonl(
            tmp_path / "prompts_r.jsonl",
            [{"prompt_ids": tokenizer(_rendered(tokenizer, p))["input_ids"]} for p in PROMPTS],
        ),
    }
    common = dict(base=base, lam="0,1,3", method="ext-sub,sub", max_new_tokens=6, device="cpu", batch_size=4)
    result = scan(expert, anti, out=tmp_path / "scan", **plain, **common)
    again = scan(expert, anti, chat_template="off", **by_hand, **common)
    assert result.setup["options"]["chat_template"] and not again.setup["options"]["chat_template"]
    fields = ("keep_nll", "forget_nll", "mc1", "mc2", "rep_4", "distinct_2", "mean_length", "end_rate")
    for r, a in zip(result, again, strict=True):
        assert [getattr(r, f) for f in fields] == pytest.approx([getattr(a, f) for f in fields], rel=1e-6, nan_ok=True)
    # MC at each λ: the merged adapter (what extsub-merge writes), loaded by PEFT, scored alone.
    row = result.row("sub", 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(expert, [anti], tmp_path / "merged", lam=3.0, method="sub")
        net = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "merged"
        )
    questions = load_choices(plain["choices"], tokenizer, ChatTemplate())
    expected = score_choices(net.eval(), questions, batch_size=1)
    assert (row.mc1, row.mc2) == pytest.approx((expected["mc1"], expected["mc2"]), abs=1e-5)
    assert row.keep_nll == pytest.approx(
        mean_nll(net, load_examples(plain["keep"], tokenizer, ChatTemplate())), rel=1e-5
    )
    # The files: samples.jsonl holds each point's continuations, the table the new columns.
    samples = [json.loads(line) for line in (tmp_path / "scan" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(PROMPTS) * len(result.rows)
    assert {(s["method"], s["lam"]) for s in samples} == {(r.method, r.lam) for r in result}
    for s in samples:
        assert set(s) == {"method", "lam", "prompt", "text", "tokens", "ended"} and len(s["tokens"]) <= 6
        assert s["text"] == tokenizer.decode(s["tokens"], skip_special_tokens=True)
    for r in result:
        mine = [s for s in samples if (s["method"], s["lam"]) == (r.method, r.lam)]
        assert r.mean_length == pytest.approx(sum(len(s["tokens"]) for s in mine) / len(mine))
        assert r.end_rate == pytest.approx(sum(s["ended"] for s in mine) / len(mine))
    data = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert data["sets"]["choices"] == {
        "file": plain["choices"],
        "questions": 2,
        "options": 7,
        "scored_tokens": data["sets"]["choices"]["scored_tokens"],
    }
    assert data["options"]["guards"] == {
        "max_rep_increase": 0.05,
        "max_distinct_drop": 0.1,
        "max_length_change": 0.5,
        "max_end_drop": 0.2,
    }
    for method, rec in result.recommendations.items():
        assert rec.axis == "MC2"
        eligible = [r for r in result if r.method == method and not any(lam == r.lam for lam, _ in rec.excluded)]
        best = max([result.rows[0], *eligible], key=lambda r: (r.mc2, -r.lam))
        assert rec.lam == best.lam
    table = (tmp_path / "scan" / "scan.md").read_text()
    assert "| MC1 | MC2 | rep-4 | distinct-2 | length | ended |" in table


def test_save_best_needs_a_truthfulness_axis(tmp_path):
    base = cf.save_base(tmp_path / "base")
    expert, anti = _adapters(base, tmp_path)
    keep = _jsonl(tmp_path / "keep.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    with pytest.raises(InputError, match=r"save_best= needs a truthfulness axis to choose λ by: give multiple-choice"):
        scan(expert, anti, base=base, keep=keep, forget=keep, save_best=tmp_path / "best")
    assert not (tmp_path / "best").exists()
    truth = _jsonl(tmp_path / "truth.jsonl", [{"prompt": p, "completion": "x"} for p, _ in PAIRS[:2]])
    with pytest.raises(InputError, match=r"truth\.jsonl: 2 examples, but FORGET .*keep\.jsonl has 3; TRUTH pairs"):
        scan(expert, anti, base=base, keep=keep, forget=keep, truth=truth)
    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": p + "?", "completion": c} for p, c in PAIRS])
    with pytest.raises(InputError, match=r"other\.jsonl line 1: not the prompt of .*keep\.jsonl line 1"):
        scan(expert, anti, base=base, keep=keep, forget=keep, truth=other)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_shared_chat_prefix_is_computed_once_and_scores_the_same(tmp_path, name, monkeypatch):
    """The system message and turn header every example starts with run once per set (a KV cache copied per batch),
    and the output layer only from the first scored position: the same sums as full passes, in float64."""
    from extsub_kernels.lambda_scan import metrics

    model, tokenizer = cf.make_model(name).double(), cf.make_tokenizer()
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    examples = load_examples(path, tokenizer, ChatTemplate("Be brief."))
    shared, _ = metrics._shared_prefix(model, examples, torch.device("cpu"))
    header = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"  # the prompts differ from their first byte
    assert shared == len(tokenizer(header)["input_ids"])
    lengths = []
    forward = type(model).forward

    @functools.wraps(forward)  # the same signature: logits_to_keep is still seen
    def counting(self, input_ids=None, **kwargs):
        lengths.append(input_ids.shape[1])
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    with_prefix = metrics.nll_sums(model, examples, batch_size=2)
    monkeypatch.setattr(metrics, "MIN_SHARED_PREFIX", 10**9)
    full = metrics.nll_sums(model, examples, batch_size=2)
    assert torch.allclose(with_prefix, full, rtol=1e-12, atol=0)
    widest = max(len(e.input_ids) for e in examples)
    assert lengths[0] == shared and lengths[1] == widest - shared and lengths[-2] == widest
