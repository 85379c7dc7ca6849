"""Row statistics of a dense run, gathered block by block in the compute stage, one `TensorStats` per merged tensor.

The geometry of each anti-expert (cos, deficiency share) is taken against the expert's rows
(task vectors with a base); it does not depend on λ, so the first λ setting of a block gives
it. The relative change per λ setting follows from it for one anti-expert; a tensor merged
with several anti-experts in sequence has its change measured on the result.
"""

import math
from collections.abc import Callable, Sequence

import torch

from extsub_kernels.engine.plan import Block, rows_of
from extsub_kernels.engine.stats import PairAccumulator, TensorStats, measured_change


class DenseStats:
    """Accumulators of the tensor being streamed, and the `TensorStats` of those already done.

    Args:
        roles: a name per input, numbered as in `TensorJob` (EXPERT, ANTI, ..., BASE).
        settings: λ per anti-expert, one tuple per output.
        method: "ext-sub", "sub" or "add".
    """

    def __init__(self, roles: Sequence[str], settings: Sequence[tuple[float, ...]], method: str):
        self.roles, self.settings, self.method = list(roles), list(settings), method
        self.done: list[TensorStats] = []
        self._name: str | None = None
        self._pairs: list[PairAccumulator] = []
        self._changed_sq: list[float] = []

    def observer(self, block: Block) -> Callable[[int, torch.Tensor], None]:
        """The `observe` hook of `apply_method` for this block: (step, row sums) → the step's accumulator."""
        if block.job.name != self._name:
            self._name = block.job.name
            self._pairs = [PairAccumulator() for _ in block.job.antis]
            self._changed_sq = [0.0] * len(self.settings)
        return lambda step, sums: self._pairs[step].add(sums)

    def measure(self, block: Block, setting: int, result: torch.Tensor, plus: torch.Tensor) -> None:
        """Several steps: add ‖result − plus‖² of this block at λ setting `setting` (before `plus` is reused)."""
        if len(block.job.antis) > 1:
            self._changed_sq[setting] += measured_change(result, plus)

    def block_done(self, block: Block) -> None:
        """After the last block of a tensor, summarise it."""
        job = block.job
        if block.stop < rows_of(job.shape) and not job.transposed:
            return
        pairs = tuple(acc.result(self.roles[k]) for acc, k in zip(self._pairs, job.antis, strict=True))
        if len(job.antis) == 1:
            k = job.antis[0]
            changes = tuple(pairs[0].relative_change(setting[k - 1], self.method) for setting in self.settings)
        else:
            norm = pairs[0].expert_norm
            changes = tuple(math.sqrt(sq) / norm if norm > 0 else None for sq in self._changed_sq)
        self.done.append(TensorStats(job.name, "tensor", pairs, changes))
        self._name = None
