"""lambda_scan.metrics: NLL against independent computations, completion-only scoring, greedy generation,
rep-n and distinct-n by hand, prompts, and the errors a bad evaluation file gives."""

import json
import math
import warnings

import pytest
import torch

from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan.metrics import (
    Example,
    distinct_n,
    generate_greedy,
    load_examples,
    load_prompts,
    mean_nll,
    mean_rep_n,
    rep_n,
)

import trained_fixtures as tf
from helpers import DEVICES, lazy_module

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # PEFT's prefix path
peft = lazy_module("peft")
transformers = lazy_module("transformers")

# float32 logits of the same tokens, padded or not, differ by a few ulps of |logits| (≲ 10): the
# mean NLL by ≲ 1e-6 relative (observed ≤ 5e-8). 2⁻¹⁶ ≈ 1.5e-5 leaves a wide margin; a scoring
# error (one token too many or too few in 24 examples of ~8) moves the mean by > 1e-2.
RTOL32 = 2.0**-16


def _load(trained, model: str, kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The base ("base"), a PEFT model on it (a PEFT type) or a full fine-tune ("full"), role expert."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "full":
            net = transformers.AutoModelForCausalLM.from_pretrained(trained.adapter(model, "full", "expert"))
        elif kind == "base":
            net = trained.load_base(model)
        else:
            net = peft.PeftModel.from_pretrained(trained.load_base(model), trained.adapter(model, kind, "expert"))
    return net.to(device, dtype).eval()


def _tokenizer(trained, model: str = "llama"):
    return transformers.AutoTokenizer.from_pretrained(trained.base(model))


def _reference_nll(model, examples: list[Example]) -> float:
    """Σ (the model's own mean loss over an example's scored tokens) × (their number) / Σ numbers, one at a time."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids], device=device)
        labels = ids.clone()
        labels[0, : max(e.n_context, 1)] = -100
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * e.n_scored
        count += e.n_scored
    return total / count


# ---------------------------------------------------------------------------------------------
# mean_nll


class Bigram(torch.nn.Module):
    """logits at t = table[x_t]: the NLL of token t is −log softmax(table[x_{t−1}])[x_t], computable by hand."""

    def __init__(self, vocab: int = 7):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]


def test_mean_nll_exact_on_a_model_computable_by_hand():
    model = Bigram()
    examples = []
    for _ in range(11):
        n = int(torch.randint(2, 9, ()))
        examples.append(Example(tuple(torch.randint(0, 7, (n,)).tolist()), int(torch.randint(0, n, ()))))
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    terms = [
        -logp[e.input_ids[t - 1], e.input_ids[t]]
        for e in examples
        for t in range(max(e.n_context, 1), len(e.input_ids))
    ]
    expected = float(sum(terms)) / len(terms)
    for batch_size in (1, 3, 100):
        assert mean_nll(model, examples, batch_size) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize(
    ("model", "kind"),
    [(m, k) for m in tf.MODELS for k in ("base", "lora", "prefix", "ia3")]
    + [("llama", "prefix_projection"), ("gpt2", "full")],
)
def test_mean_nll_matches_the_models_own_loss(trained, model, kind):
    """Text lines: every token after the first is scored; batched by length and padded, or one at a time."""
    net = _load(trained, model, kind)
    examples = load_examples(trained.eval_set("keep.txt"), _tokenizer(trained, model))
    assert all(e.n_context == 1 and e.input_ids[0] == tf.BOS_ID for e in examples)
    expected = _reference_nll(net, examples)
    for batch_size in (1, 5, 64):
        assert mean_nll(net, examples, batch_size) == pytest.approx(expected, rel=RTOL32)
    assert not net.training


@pytest.mark.parametrize("model", tf.MODELS)
def test_prompt_completion_scores_only_the_completion(trained, model):
    net = _load(trained, model, "lora")
    tokenizer = _tokenizer(trained, model)
    path = trained.eval_set("keep.jsonl")
    examples = load_examples(path, tokenizer)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for e, row in zip(examples, rows, strict=False):
        assert e.n_scored == len(row["completion"].split())  # one token per word
        assert e.input_ids == tuple(tokenizer(row["prompt"] + row["completion"])["input_ids"])
        assert e.n_context == 1 + len(row["prompt"].split())  # <s> and the prompt's words
    expected = _reference_nll(net, examples)
    assert mean_nll(net, examples, 7) == pytest.approx(expected, rel=RTOL32)
    # The same lines scored whole: the completion's mean is the mean of the whole line's per-token losses at the
    # completion's positions, and differs from the whole line's mean (other tokens are in it).
    lines = load_examples(trained.eval_set("keep.txt"), tokenizer)
    assert [e.input_ids for e in lines] == [e.input_ids for e in examples]
    per_token = []
    for e in lines:
        with torch.no_grad():
            logits = net(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].double()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(e.input_ids[1:]), reduction="none")
        per_token.append(losses)
    completions = torch.cat([t[e.n_context - 1 :] for t, e in zip(per_token, examples, strict=True)])
    assert mean_nll(net, examples) == pytest.approx(float(completions.mean()), rel=RTOL32)
    assert mean_nll(net, lines) == pytest.approx(float(torch.cat(per_token).mean()), rel=RTOL32)


def test_jsonl_text_is_a_txt_line(trained, tmp_path):
    """{"text": line} in a .jsonl file is the same example as that line in a .txt file: every token after the first."""
    tokenizer = _tokenizer(trained)
    lines = trained.eval_set("keep.txt").read_text().splitlines()
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    from_jsonl = load_examples(tmp_path / "text.jsonl", tokenizer)
    from_txt = load_examples(trained.eval_set("keep.txt"), tokenizer)
    assert [(e.input_ids, e.n_context) for e in from_jsonl] == [(e.input_ids, e.n_context) for e in from_txt]
    assert len(from_txt) == len(lines) == tf.EVAL_LINES


def test_pretokenised_sets_give_the_same_examples(trained, tmp_path):
    tokenizer = _tokenizer(trained)
    text = load_examples(trained.eval_set("keep.jsonl"), tokenizer)
    rows = [{"prompt_ids": e.input_ids[: e.n_context], "completion_ids": e.input_ids[e.n_context :]} for e in text]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    rows = [{"input_ids": list(e.input_ids), "id": i} for i, e in enumerate(text)]  # other keys are ignored
    (tmp_path / "whole.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ids = load_examples(tmp_path / "ids.jsonl")
    assert [(e.input_ids, e.n_context) for e in ids] == [(e.input_ids, e.n_context) for e in text]
    whole = load_examples(tmp_path / "whole.jsonl")
    assert [(e.input_ids, e.n_context) for e in whole] == [(e.input_ids, 1) for e in text]
    assert ids[3].source == f"{tmp_path / 'ids.jsonl'} line 4"
    net = _load(trained, "llama", "lora")
    assert mean_nll(net, ids) == mean_nll(net, text)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_nll_in_the_models_dtype(trained, device, dtype):
    """The model runs in its dtype on its device; unbatched, the result is the model's own loss on the same logits."""
    net = _load(trained, "llama_gqa", "lora", device, dtype)
    examples = load_examples(trained.eval_set("forget.jsonl"), _tokenizer(trained))[:8]  # bf16 on CPU is slow
    reference = _reference_nll(net, examples)
    assert mean_nll(net, examples, 1) == pytest.approx(reference, rel=RTOL32)
    # Batched, bf16 logits round differently with padding: within a few bf16 ulps (2⁻⁸ relative) of each logit.
    rel = RTOL32 if dtype == torch.float32 else 2.0**-5
    assert mean_nll(net, examples, 8, device=device) == pytest.approx(reference, rel=rel)


# ---------------------------------------------------------------------------------------------
# Loading: the errors name the file and line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "prev red = door"}\n{oops\n', r"bad\.jsonl line 2: not valid JSON"),
        ('\n\n{"prompt": "prev red ="}\n', r"bad\.jsonl line 3: expected exactly one of \(text; prompt \+ completion;"),
        ('{"text": "red", "input_ids": [1]}\n', r"line 1: expected exactly one of .*keys \['input_ids', 'text'\]"),
        ("[1, 2]\n", r"line 1: expected a JSON object, found list"),
        ('{"input_ids": [2, -5]}\n', r"line 1: 'input_ids' must be a list of non-negative integer token ids"),
        ('{"input_ids": [2, "red"]}\n', r"line 1: 'input_ids' must be a list of non-negative integer token ids"),
        ('{"prompt_ids": [2], "completion_ids": "red"}\n', r"line 1: 'completion_ids' must be a list"),
        ('{"input_ids": [2]}\n', r"line 1: nothing to score \(1 tokens, 1 of context\)"),
        ('{"prompt_ids": [2, 9], "completion_ids": []}\n', r"line 1: nothing to score \(2 tokens, 2 of context\)"),
        ('{"prompt": "prev red =", "completion": ""}\n', r"line 1: nothing to score"),
        ('{"text": 5}\n', r"line 1: 'text' must be a string, found int"),
        ("\n  \n", r"bad\.jsonl: no examples"),
    ],
)
def test_bad_jsonl_lines_are_named(trained, tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(InputError, match=message):
        load_examples(tmp_path / "bad.jsonl", _tokenizer(trained))


def test_other_bad_sets(trained, tmp_path):
    tokenizer = _tokenizer(trained)
    (tmp_path / "set.csv").write_text("a\n")
    with pytest.raises(InputError, match=r"set\.csv: unknown evaluation set format '\.csv'; expected \.txt or \.jsonl"):
        load_examples(tmp_path / "set.csv", tokenizer)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match=r"empty\.txt: no examples"):
        load_examples(tmp_path / "empty.txt", tokenizer)
    with pytest.raises(InputError, match=r"keep\.txt line 1: text is text, but there is no tokenizer"):
        load_examples(trained.eval_set("keep.txt"))
    with pytest.raises(InputError, match=r"keep\.jsonl line 1: prompt \+ completion is text, but there is no tokeni"):
        load_examples(trained.eval_set("keep.jsonl"))
    (tmp_path / "one.txt").write_text("prev\n")
    assert load_examples(tmp_path / "one.txt", tokenizer)[0].input_ids == (tf.BOS_ID, tf.VOCAB.index("prev"))

    net = _load(trained, "llama", "base")
    vocab = len(tf.VOCAB)
    (tmp_path / "big.jsonl").write_text(f'{{"input_ids": [2, 5]}}\n{{"input_ids": [2, {vocab}]}}\n')
    with pytest.raises(InputError, match=rf"big\.jsonl line 2: token id {vocab} is outside the model's vocabulary"):
        mean_nll(net, load_examples(tmp_path / "big.jsonl"))
    (tmp_path / "long.jsonl").write_text(json.dumps({"input_ids": [5] * 65}) + "\n")
    with pytest.raises(InputError, match=r"long\.jsonl line 1: 65 tokens, more than the model's 64 positions"):
        mean_nll(net, load_examples(tmp_path / "long.jsonl"))
    with pytest.raises(ValueError, match="mean_nll: no examples"):
        mean_nll(net, [])


def test_load_prompts(trained, tmp_path):
    tokenizer = _tokenizer(trained)
    lines = trained.eval_set("prompts.txt").read_text().splitlines()
    assert load_prompts(trained.eval_set("prompts.txt"), tokenizer) == lines
    (tmp_path / "p.jsonl").write_text('{"prompt": "prev red ="}\n\n{"prompt": "next cat =", "id": 2}\n')
    assert load_prompts(tmp_path / "p.jsonl", tokenizer) == ["prev red =", "next cat ="]
    (tmp_path / "ids.jsonl").write_text('{"prompt_ids": [2, 5, 9]}\n')
    assert load_prompts(tmp_path / "ids.jsonl") == [(2, 5, 9)]  # token ids need no tokenizer


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "p.jsonl",
            '{"prompt": "a", "prompt_ids": [2]}\n',
            r"p\.jsonl line 1: expected exactly one of prompt \(text\)",
        ),
        ("p.jsonl", '{"prompt_ids": []}\n', r"line 1: 'prompt_ids' is empty"),
        ("p.jsonl", '{"prompt": 3}\n', r"line 1: 'prompt' must be a non-empty string"),
        ("p.jsonl", '{"prompt_ids": [2]}\n{"prompt": "prev red ="}\n', r"line 2: mixes text prompts and prompt_ids"),
        ("p.txt", "prev red =\n", r"p\.txt line 1: the prompt is text, but there is no tokenizer"),
        ("p.txt", "\n \n", r"p\.txt: no prompts"),
        ("p.md", "a\n", r"p\.md: unknown evaluation set format '\.md'"),
    ],
)
def test_bad_prompts_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message):
        load_prompts(tmp_path / name)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match=r"nope\.txt: no such file"):
        load_examples(tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match=r"latin1\.txt: cannot be read as UTF-8 text"):
        load_prompts(tmp_path / "latin1.txt")


# ---------------------------------------------------------------------------------------------
# Greedy generation


def _reference_greedy(model, ids: list[int], max_new_tokens: int) -> tuple[tuple[int, ...], bool]:
    """Argmax of a full forward pass (no cache, no batch) per step, up to EOS."""
    ids, new = list(ids), []
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].argmax())
        if token == tf.EOS_ID:
            return tuple(new), True
        ids.append(token)
        new.append(token)
    return tuple(new), False


@pytest.mark.parametrize(
    ("model", "kind"), [("llama", "lora"), ("llama_gqa", "prefix"), ("gpt2", "prefix_projection"), ("gpt2", "full")]
)
def test_generate_greedy_matches_a_plain_argmax_loop(trained, model, kind):
    net = _load(trained, model, kind)
    tokenizer = _tokenizer(trained, model)
    prompts = trained.eval_set("prompts.txt").read_text().splitlines()
    batched = generate_greedy(net, tokenizer, prompts, max_new_tokens=9, batch_size=8)
    single = generate_greedy(net, tokenizer, prompts, max_new_tokens=9, batch_size=1)
    assert batched == single
    for prompt, g in zip(prompts, batched, strict=False):
        expected = _reference_greedy(net, tokenizer(prompt)["input_ids"], 9)
        assert (g.token_ids, g.stopped) == expected, prompt
        assert g.prompt == prompt and g.text == tokenizer.decode(g.token_ids)
        assert tf.EOS_ID not in g.token_ids and (g.stopped or len(g.token_ids) == 9)
    # Token-id prompts, no tokenizer: the same tokens, no text.
    by_ids = generate_greedy(net, None, [tokenizer(p)["input_ids"] for p in prompts], max_new_tokens=9)
    assert [(g.token_ids, g.stopped, g.text) for g in by_ids] == [(g.token_ids, g.stopped, None) for g in batched]


def test_generate_greedy_errors(trained):
    net = _load(trained, "gpt2", "base")
    with pytest.raises(ValueError, match="prompt 1 is text, but there is no tokenizer"):
        generate_greedy(net, None, [[2, 5], "prev red ="], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be ≥ 1, got 0"):
        generate_greedy(net, None, [[2, 5]], 0)
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        generate_greedy(net, None, [[]], 3)


# ---------------------------------------------------------------------------------------------
# rep-n and distinct-n, by hand


def test_rep_n_by_hand():
    assert rep_n(["a", "b", "c", "d", "a", "b", "c", "d"], 4) == pytest.approx(1 - 4 / 5)  # abcd bcda cdab dabc abcd
    assert rep_n([7] * 6, 4) == pytest.approx(1 - 1 / 3)  # three 4-grams, all (7, 7, 7, 7)
    assert rep_n([1, 2, 3, 4, 5], 4) == 0.0
    assert rep_n([1, 2, 1, 2, 1], 2) == pytest.approx(0.5)  # 12 21 12 21
    assert rep_n([1, 1, 1], 4) == 0.0  # no 4-gram: nothing repeated
    assert rep_n([], 1) == 0.0
    with pytest.raises(ValueError, match="n must be ≥ 1, got 0"):
        rep_n([1, 2], 0)


def test_mean_rep_n_by_hand():
    assert mean_rep_n([[7] * 6, [1, 2, 3, 4], [1, 2]], 4) == pytest.approx((2 / 3 + 0) / 2)  # [1, 2] left out
    assert math.isnan(mean_rep_n([[1, 2, 3], []], 4))
    assert math.isnan(mean_rep_n([], 4))


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the cat sat the cat ran
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # the-cat cat-sat the-cat cat-ran
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n([" a  b\ta "], 1) == pytest.approx(2 / 3)  # whitespace split
    assert distinct_n([[1, 2], [2, 1]], 2) == 1.0  # token sequences; no n-gram across texts
    assert math.isnan(distinct_n(["a", "b"], 2))
    with pytest.raises(ValueError, match="n must be ≥ 1"):
        distinct_n(texts, 0)
