"""The standard harness at each point: lm-evaluation-harness's tasks (`Harness`) run by `lm_eval.simple_evaluate` over
an `HFLM` built on the loaded model (never a reload), every numeric metric a column `lm_eval:<task>:<metric>` (filter
`none` dropped). Needs the `eval` extra."""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from extsub_kernels.errors import InputError

EVAL_EXTRA = 'pip install "extsub[eval]"'
PREFIX = "lm_eval:"


@dataclass
class Harness:
    """lm-eval tasks to run at every point (see the module docstring)."""

    tasks: tuple[str, ...]
    include: tuple[str, ...] = ()
    batch_size: int = 8
    _manager: Any = field(default=None, repr=False)

    def check(self) -> None:
        """lm-eval importable, the include folders present, every task known: InputErrors naming what is not."""
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise InputError(
                f"lm_eval= needs lm-eval, which is not installed; install with: {EVAL_EXTRA}", options=("lm_eval",)
            ) from None
        for folder in self.include:
            if not Path(folder).is_dir():
                raise InputError(f"lm_eval_include= {folder}: no such folder", options=("lm_eval_include",))
        logging.getLogger("lm-eval").setLevel(logging.ERROR)
        self._manager = TaskManager(include_path=list(self.include) or None, verbosity="ERROR")
        known = set(self._manager.all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            where = f" nor in {', '.join(self.include)}" if self.include else "; lm_eval_include= adds local ones"
            raise InputError(
                f"lm_eval=: unknown task(s) {', '.join(unknown)} (not among lm-eval's tasks{where})",
                options=("lm_eval", "lm_eval_include"),
            )

    def measure(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Every numeric metric of every task, for the model as it stands (lm_eval.simple_evaluate over an HFLM)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        if self._manager is None:
            self.check()
        was_training = model.training
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            quiet = dict(task_manager=self._manager, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
            out = simple_evaluate(model=lm, tasks=list(self.tasks), **quiet)
        finally:
            model.train(was_training)
        return metric_columns(out["results"])


def metric_columns(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's results as columns: `lm_eval:<task>:<metric>[,<filter> unless none]` → value (NaN for N/A)."""
    columns = {}
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float, str)):
                continue
            value = math.nan if isinstance(value, str) else value  # lm-eval's "N/A": a stderr it did not compute
            columns[f"{PREFIX}{task}:{key.removesuffix(',none')}"] = float(value)
    return columns


def parse_tasks(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """ "a,b" or a list → ("a", "b"); None → ()."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    tasks = tuple(t.strip() for t in items if t.strip())
    if not tasks:
        raise InputError("lm_eval=: give at least one task name", options=("lm_eval",))
    return tasks
