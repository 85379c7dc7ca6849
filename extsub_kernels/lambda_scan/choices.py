"""Multiple choice, the paper's truthfulness measure: MC1, MC2 as TruthfulQA defines them (docs/design.md §8a).

Each option is scored by Σ log p(option tokens | question) (a sum, not a mean), in one batched pass
(`metrics.nll_sums`). MC1: 1 if the single correct option of the MC1 set scores highest (a tie goes to the first
listed, as lm-evaluation-harness's argmax); MC2: the probability mass on the MC2 set's correct options,
exp(logsumexp(correct) − logsumexp(all)); each averaged over the questions, as lm-eval's `truthfulqa_mc1/2`.

A `.jsonl` file, one question per line: TruthfulQA's `question`, `mc1_targets` and `mc2_targets` (each
`{"choices": [...], "labels": [1/0, ...]}`), or `question`, `correct: [...]`, `incorrect: [...]` (MC1: the first
correct option against the incorrect ones). Pre-tokenised: `question_ids`, and every option a list of token ids."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan.metrics import Example, nll_sums, read_records, token_ids
from extsub_kernels.lambda_scan.rendering import ChatTemplate, encode_completion, encode_prompt, option_text


@dataclass(frozen=True)
class Question:
    """One question: its distinct options as examples (context: the question), and which are in which set.

    `mc1`: indices of `options` in the MC1 set, and `mc1_correct` the one correct among them;
    `mc2_correct` and `mc2_incorrect`: indices of the MC2 set's options by label."""

    source: str
    options: tuple[Example, ...]
    mc1: tuple[int, ...]
    mc1_correct: int
    mc2_correct: tuple[int, ...]
    mc2_incorrect: tuple[int, ...]


def load_choices(path: str | Path, tokenizer: Any = None, chat: ChatTemplate | None = None) -> list[Question]:
    """Read a multiple-choice file (module docstring) and tokenise it.

    Raises:
        InputError: naming the file and line: missing, bad JSON, neither layout, labels that do not match, an
            MC1 set without one correct option, an MC2 set without both kinds, an empty option, no tokenizer.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        raise InputError(f"{path}: multiple-choice questions are a .jsonl file (one question per line)")
    questions = [_question(record, tokenizer, chat, source) for source, record in read_records(path, "question")]
    if not questions:
        raise InputError(f"{path}: no questions (the file has no non-blank line)")
    return questions


def _question(record: object, tokenizer: Any, chat: ChatTemplate | None, source: str) -> Question:
    if not isinstance(record, dict):
        raise InputError(f"{source}: expected a JSON object, found {type(record).__name__}")
    if ("question" in record) == ("question_ids" in record):
        raise InputError(f"{source}: expected exactly one of question (text) or question_ids; found {sorted(record)}")
    text = "question" in record
    if text and tokenizer is None:
        raise InputError(f"{source}: the question is text, but there is no tokenizer; give question_ids instead")
    if text:
        if not isinstance(record["question"], str) or not record["question"].strip():
            raise InputError(f"{source}: 'question' must be a non-empty string")
        context = encode_prompt(tokenizer, record["question"], chat)
    else:
        context = token_ids(record["question_ids"], "question_ids", source)
        if not context:
            raise InputError(f"{source}: 'question_ids' is empty")
    mc1, mc1_labels, mc2, mc2_labels = _sets(record, source)
    options: dict[tuple[int, ...], int] = {}

    def index(option: object, where: str) -> int:
        if text:
            if not isinstance(option, str) or not option.strip():
                raise InputError(f"{source}: every option of {where} must be a non-empty string")
            ids = encode_completion(tokenizer, option_text(option, chat))
        else:
            ok = isinstance(option, list) and option
            ok = ok and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in option)
            if not ok:
                raise InputError(f"{source}: every option of {where} must be a non-empty list of token ids (≥ 0)")
            ids = tuple(option)
        return options.setdefault(ids, len(options))

    mc1_index = tuple(index(o, "the MC1 set") for o in mc1)
    mc2_index = [index(o, "the MC2 set") for o in mc2]
    examples = tuple(Example(context + ids, len(context), source) for ids in options)
    labelled = list(zip(mc2_index, mc2_labels, strict=True))
    mc2 = tuple(i for i, label in labelled if label), tuple(i for i, label in labelled if not label)
    return Question(source, examples, mc1_index, mc1_index[mc1_labels.index(1)], *mc2)


def _sets(record: dict, source: str) -> tuple[list, list[int], list, list[int]]:
    """(MC1 options, their labels, MC2 options, their labels) from either layout, checked."""
    if "mc1_targets" in record or "mc2_targets" in record:
        mc1, mc1_labels = _targets(record, "mc1_targets", source)
        mc2, mc2_labels = _targets(record, "mc2_targets", source)
    elif "correct" in record and "incorrect" in record:
        correct, incorrect = record["correct"], record["incorrect"]
        if not (isinstance(correct, list) and correct and isinstance(incorrect, list) and incorrect):
            raise InputError(f"{source}: 'correct' and 'incorrect' must be non-empty lists of options")
        mc1, mc1_labels = [correct[0], *incorrect], [1] + [0] * len(incorrect)
        mc2, mc2_labels = [*correct, *incorrect], [1] * len(correct) + [0] * len(incorrect)
    else:
        raise InputError(
            f"{source}: expected mc1_targets + mc2_targets (TruthfulQA's layout) or correct + incorrect; "
            f"found keys {sorted(record)}"
        )
    if mc1_labels.count(1) != 1 or len(mc1) < 2:
        raise InputError(f"{source}: the MC1 set needs exactly one correct option among two or more")
    if 1 not in mc2_labels or 0 not in mc2_labels:
        raise InputError(f"{source}: the MC2 set needs at least one correct and one incorrect option")
    return mc1, mc1_labels, mc2, mc2_labels


def _targets(record: dict, key: str, source: str) -> tuple[list, list[int]]:
    value = record.get(key)
    if not isinstance(value, dict) or not isinstance(value.get("choices"), list):
        raise InputError(f"{source}: {key!r} must be {{'choices': [...], 'labels': [...]}}")
    choices, labels = value["choices"], value.get("labels")
    if not isinstance(labels, list) or len(labels) != len(choices) or any(x not in (0, 1) for x in labels):
        raise InputError(f"{source}: {key!r} needs one label, 0 or 1, per choice ({len(choices)} choices)")
    return choices, [int(x) for x in labels]


def mc_scores(question: Question, scores: Sequence[float]) -> tuple[float, float]:
    """(MC1, MC2) of one question from its options' total log-likelihoods (module docstring)."""
    mc1_scores = [scores[i] for i in question.mc1]
    best = max(range(len(mc1_scores)), key=lambda k: (mc1_scores[k], -k))
    mc1 = 1.0 if question.mc1[best] == question.mc1_correct else 0.0
    correct = torch.tensor([scores[i] for i in question.mc2_correct], dtype=torch.float64)
    every = torch.tensor([scores[i] for i in question.mc2_correct + question.mc2_incorrect], dtype=torch.float64)
    mc2 = math.exp(float(torch.logsumexp(correct, 0) - torch.logsumexp(every, 0)))
    return mc1, mc2


def score_choices(
    model: torch.nn.Module, questions: Sequence[Question], batch_size: int = 8, device: str | torch.device | None = None
) -> dict[str, float]:
    """MC1 and MC2 averaged over `questions`: every option of every question scored in one batched pass.

    Non-finite scores (a diverged model) give NaN."""
    examples = [option for q in questions for option in q.options]
    nll = nll_sums(model, examples, batch_size, device).cpu().tolist()
    totals, start = [0.0, 0.0], 0
    for q in questions:
        scores = [-x for x in nll[start : start + len(q.options)]]
        start += len(q.options)
        if not all(math.isfinite(s) for s in scores):
            return {"mc1": math.nan, "mc2": math.nan}
        for k, value in enumerate(mc_scores(q, scores)):
            totals[k] += value
    return {"mc1": totals[0] / len(questions), "mc2": totals[1] / len(questions)}
