"""A dense plan in words: what happens to each tensor and why, for --dry-run, --verbose and the report."""

from collections.abc import Sequence

from extsub_kernels._tensors import is_float
from extsub_kernels.engine.plan import TensorJob
from extsub_kernels.engine.report import Item
from extsub_kernels.io import CheckpointReader
from extsub_kernels.io.format import DTYPE_CODES


def dense_items(
    jobs: Sequence[TensorJob], skipped: Sequence[str], readers: Sequence[CheckpointReader], roles: Sequence[str]
) -> list[Item]:
    """One `Item` per output tensor of the plan (in order), then one per key `skipped`; `readers` and `roles` (a name
    each) numbered as in `TensorJob`."""
    items = []
    for job in jobs:
        dtype = DTYPE_CODES[job.out_dtype]
        if job.merged:
            antis = " and ".join(roles[k] for k in job.antis)
            reason = f"in EXPERT and {antis}" + (" (task vectors against BASE)" if job.base is not None else "")
            if job.transposed:
                reason += "; Conv1D weight stored (in, out): its columns are paired"
            items.append(Item(job.name, "tensor", "merged", reason, job.shape, dtype))
        elif job.source != 0:
            reason = f"only in {roles[job.source]}: written unchanged (--on-missing copy)"
            items.append(Item(job.name, "tensor", "copied", reason, job.shape, dtype))
        else:
            kind = readers[0].info(job.name).dtype
            reason = (
                "in EXPERT only: copied (a zero task vector in the anti-experts)"
                if is_float(kind)
                else f"not a float tensor ({DTYPE_CODES[kind]}): copied from EXPERT"
            )
            items.append(Item(job.name, "tensor", "copied", reason, job.shape, dtype))
    for name in skipped:
        holder = next(k for k in range(1, len(readers)) if name in readers[k])
        info = readers[holder].info(name)
        reason = f"only in {roles[holder]}: left out (--on-missing skip)"
        items.append(Item(name, "tensor", "skipped", reason, info.shape, DTYPE_CODES[info.dtype]))
    return items
