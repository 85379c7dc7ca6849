"""One evaluation of the model as it stands: NLL on KEEP and FORGET, and with prompts, greedy generations scored.

The sets are read and tokenised once; each point of a scan calls `Evaluator.measure`, which
times every part so the scan can report what a merge costs against what an evaluation costs.
"""

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extsub_kernels.lambda_scan.metrics import (
    Example,
    check_ids_fit,
    distinct_n,
    generate_greedy,
    load_examples,
    load_prompts,
    mean_nll,
    mean_rep_n,
)

REP_N = 4  # the paper's rep-4 (Welleck et al. 2020)
DISTINCT_NS = (1, 2)


@dataclass(frozen=True)
class EvaluationSets:
    """KEEP and FORGET examples and the optional prompts, tokenised; `names` are the files as given."""

    keep: list[Example]
    forget: list[Example]
    prompts: list | None
    names: dict[str, str]

    @classmethod
    def load(cls, keep: str | Path, forget: str | Path, prompts: str | Path | None, tokenizer: Any) -> "EvaluationSets":
        """Read the files (see `metrics.load_examples` and `metrics.load_prompts`); InputErrors name file and line."""
        names = {"keep": str(keep), "forget": str(forget)} | ({"prompts": str(prompts)} if prompts else {})
        return cls(
            load_examples(keep, tokenizer),
            load_examples(forget, tokenizer),
            load_prompts(prompts, tokenizer) if prompts is not None else None,
            names,
        )

    def check_fits(self, model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> None:
        """Every example and prompt within the model's vocabulary and positions (a prompt with room for
        `max_new_tokens`), before a scan writes anything; an InputError naming the file and line otherwise."""
        for example in (*self.keep, *self.forget):
            check_ids_fit(model, example.input_ids, example.source)
        for number, prompt in enumerate(self.prompts or (), start=1):
            ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) and tokenizer is not None else prompt
            check_ids_fit(model, ids, f"{self.names['prompts']} prompt {number}", room=max_new_tokens)

    def describe(self) -> dict[str, dict]:
        """Per set: the file, how many examples and how many scored tokens (prompts: how many)."""
        sets = {
            name: {
                "file": self.names[name],
                "examples": len(examples),
                "scored_tokens": sum(e.n_scored for e in examples),
            }
            for name, examples in (("keep", self.keep), ("forget", self.forget))
        }
        if self.prompts is not None:
            sets["prompts"] = {"file": self.names["prompts"], "prompts": len(self.prompts)}
        return sets


@dataclass(frozen=True)
class Evaluator:
    """Measures a model on the sets: `measure(model)` → the metrics and the seconds each part took."""

    sets: EvaluationSets
    tokenizer: Any
    batch_size: int
    max_new_tokens: int
    device: torch.device

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """keep_nll and forget_nll (nats per scored token), with prompts rep_4, distinct_1, distinct_2; and seconds.

        Seconds: keep_seconds, forget_seconds, generate_seconds (with prompts), each waited for on CUDA.
        """
        with warnings.catch_warnings():
            # PEFT's prefix-tuning passes transformers an argument it deprecates; nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            return self._measure(model)

    def _measure(self, model: torch.nn.Module) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, examples in (("keep", self.sets.keep), ("forget", self.sets.forget)):
            start = time.perf_counter()
            values[f"{name}_nll"] = mean_nll(model, examples, self.batch_size, self.device)
            values[f"{name}_seconds"] = time.perf_counter() - start  # float() of the sum waited for the device
        if self.sets.prompts is not None:
            start = time.perf_counter()
            generations = generate_greedy(
                model, self.tokenizer, self.sets.prompts, self.max_new_tokens, self.batch_size, self.device
            )
            values["generate_seconds"] = time.perf_counter() - start  # .tolist() of the tokens waited too
            tokens = [g.token_ids for g in generations]
            values[f"rep_{REP_N}"] = mean_rep_n(tokens, REP_N)
            for n in DISTINCT_NS:
                values[f"distinct_{n}"] = distinct_n(tokens, n)
        return values
