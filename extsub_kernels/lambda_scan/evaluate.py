"""One evaluation of the model as it stands (`Evaluator.measure`, each part timed): NLL on KEEP, FORGET (and TRUTH),
MC1/MC2, greedy generations scored; the sets read and tokenised once (`EvaluationSets`)."""

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extsub_kernels.errors import InputError
from extsub_kernels.lambda_scan import metrics
from extsub_kernels.lambda_scan.choices import Question, load_choices, score_choices
from extsub_kernels.lambda_scan.harness import Harness
from extsub_kernels.lambda_scan.metrics import Example, Generation
from extsub_kernels.lambda_scan.rendering import ChatTemplate

REP_N = 4  # the paper's rep-4 (Welleck et al. 2020)
DISTINCT_NS = (1, 2)


@dataclass(frozen=True)
class EvaluationSets:
    """The sets, tokenised (KEEP, FORGET, TRUTH, questions, prompts); `names`: the files; `chat`: the rendering."""

    keep: list[Example]
    forget: list[Example]
    prompts: list | None
    names: dict[str, str]
    truth: list[Example] | None = None
    choices: list[Question] | None = None
    chat: ChatTemplate | None = None

    @classmethod
    def load(
        cls,
        keep: str | Path,
        forget: str | Path,
        prompts: str | Path | None,
        tokenizer: Any,
        *,
        truth: str | Path | None = None,
        choices: str | Path | None = None,
        chat: ChatTemplate | None = None,
    ) -> "EvaluationSets":
        """Read the files (InputErrors name file and line); TRUTH must pair with FORGET, prompt for prompt."""
        files = {"keep": keep, "forget": forget, "truth": truth, "choices": choices, "prompts": prompts}
        keep_set, forget_set, truth_set = (
            metrics.load_examples(path, tokenizer, chat) if path is not None else None for path in (keep, forget, truth)
        )
        if truth_set is not None:
            _check_paired(truth_set, forget_set, str(truth), str(forget))
        prompt_set = metrics.load_prompts(prompts, tokenizer) if prompts is not None else None
        questions = load_choices(choices, tokenizer, chat) if choices is not None else None
        names = {name: str(path) for name, path in files.items() if path is not None}
        return cls(keep_set, forget_set, prompt_set, names, truth_set, questions, chat)

    def check_fits(self, model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> None:
        """Every example, option and prompt within the model's vocabulary and positions (a prompt with room for
        `max_new_tokens`), before a scan writes anything; an InputError naming the file and line otherwise."""
        options = [o for q in self.choices or () for o in q.options]
        for example in (*self.keep, *self.forget, *(self.truth or ()), *options):
            metrics.check_ids_fit(model, example.input_ids, example.source)
        for number, prompt in enumerate(self.prompts or (), start=1):
            ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) and tokenizer is not None else prompt
            metrics.check_ids_fit(model, ids, f"{self.names['prompts']} prompt {number}", room=max_new_tokens)

    def describe(self) -> dict[str, dict]:
        """Per set: the file, how many examples and how many scored tokens (prompts: how many; choices: questions)."""
        sets = {
            name: {"file": self.names[name], "examples": len(got), "scored_tokens": sum(e.n_scored for e in got)}
            for name, got in (("keep", self.keep), ("forget", self.forget), ("truth", self.truth))
            if got is not None
        }
        if self.choices is not None:
            options = [o for q in self.choices for o in q.options]
            counts = {"questions": len(self.choices), "options": len(options)}
            scored = sum(o.n_scored for o in options)
            sets["choices"] = {"file": self.names["choices"], **counts, "scored_tokens": scored}
        if self.prompts is not None:
            sets["prompts"] = {"file": self.names["prompts"], "prompts": len(self.prompts)}
        return sets


def _check_paired(truth: list[Example], forget: list[Example], truth_name: str, forget_name: str) -> None:
    """TRUTH holds FORGET's prompts with true completions: same count, same prompt tokens, line by line."""
    if len(truth) != len(forget):
        raise InputError(
            f"{truth_name}: {len(truth)} examples, but FORGET {forget_name} has {len(forget)}; TRUTH pairs each "
            "FORGET prompt with its true completion"
        )
    for t, f in zip(truth, forget, strict=True):
        if t.n_context < 2 or t.input_ids[: t.n_context] != f.input_ids[: f.n_context]:
            raise InputError(
                f"{t.source}: not the prompt of {f.source}; TRUTH pairs each FORGET prompt (prompt + completion "
                "lines, in the same order) with its true completion"
            )


@dataclass(frozen=True)
class Evaluator:
    """Measures a model on the sets: `measure(model)` → the metrics, the seconds each part took, the generations."""

    sets: EvaluationSets
    tokenizer: Any
    batch_size: int
    max_new_tokens: int
    device: torch.device
    harness: Harness | None = None

    def measure(self, model: torch.nn.Module) -> tuple[dict[str, float], list[Generation]]:
        """(the row's values: `results.ScanRow`'s NLLs, MC, generation metrics, `lm_eval` and each part's seconds,
        waited for on CUDA; the greedy generations)."""
        with warnings.catch_warnings():  # PEFT's prefix-tuning passes transformers an argument it deprecates
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            values: dict[str, float] = {}
            for name, examples in (("keep", self.sets.keep), ("forget", self.sets.forget), ("truth", self.sets.truth)):
                if examples is not None:
                    start = time.perf_counter()
                    values[f"{name}_nll"] = metrics.mean_nll(model, examples, self.batch_size, self.device)
                    values[f"{name}_seconds"] = time.perf_counter() - start
            if self.sets.choices is not None:
                start = time.perf_counter()
                values |= score_choices(model, self.sets.choices, self.batch_size, self.device)
                values["choices_seconds"] = time.perf_counter() - start
            generations: list[Generation] = []
            if self.sets.prompts is not None:
                start = time.perf_counter()
                given = (self.sets.prompts, self.max_new_tokens, self.batch_size, self.device, self.sets.chat)
                generations = metrics.generate_greedy(model, self.tokenizer, *given)
                values["generate_seconds"] = time.perf_counter() - start
                values |= generation_metrics(generations)
            if self.harness is not None:
                start = time.perf_counter()
                values["lm_eval"] = self.harness.measure(model, self.tokenizer)  # type: ignore[assignment]
                values["lm_eval_seconds"] = time.perf_counter() - start
            return values, generations


def generation_metrics(generations: list[Generation]) -> dict[str, float]:
    """rep-4, distinct-1/2 of the continuations' tokens, their mean length in tokens, and the share that ended."""
    tokens = [g.token_ids for g in generations]
    values = {f"rep_{REP_N}": metrics.mean_rep_n(tokens, REP_N)}
    values |= {f"distinct_{n}": metrics.distinct_n(tokens, n) for n in DISTINCT_NS}
    values["mean_length"] = sum(len(t) for t in tokens) / len(tokens)
    values["end_rate"] = sum(g.stopped for g in generations) / len(generations)
    return values
