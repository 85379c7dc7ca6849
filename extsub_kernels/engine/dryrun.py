"""--dry-run: the outputs a run would write, planned from the headers through the same code as a real run.

The plan stops where a real run would create its first output: the files of each output with
their sizes (headers included; generated texts have no size yet), the free space checked.
Nothing is created, not even a temporary file.
"""

from collections.abc import Sequence
from pathlib import Path

from extsub_kernels.constants import MODEL_WEIGHTS
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.io import TensorEntry
from extsub_kernels.io.writer import check_space, planned_files


def dry_run_report(
    paths: Sequence[Path],
    entries: Sequence[TensorEntry],
    metadata: Sequence[dict[str, str]],
    limit: int | None,
    extra: Sequence[Path],
    texts: Sequence[str],
    reads: int,
    facts: dict,
    weights_name: str = MODEL_WEIGHTS,
) -> MergeReport:
    """The report of a dry run: the files each output would hold, checked against the free space; nothing written.

    Args:
        paths, entries, metadata, limit, extra, weights_name: what the run would hand `OutputSet`.
        texts: names of the generated files of a folder output (model card, recipe, ...).
        reads: tensor bytes the run would read.
        facts: the report's other fields (counts, items, settings, context, ...).
    """
    files = [
        planned_files(
            path, entries, meta, max_shard_size=limit, weights_name=weights_name, extra_files=extra, texts=texts
        )
        for path, meta in zip(paths, metadata, strict=True)
    ]
    need: dict[Path, int] = {}
    for path, listed in zip(paths, files, strict=True):
        need[path.parent] = need.get(path.parent, 0) + sum(size or 0 for _, size in listed)
    check_space(need)
    return MergeReport.finished(paths, bytes_read=reads, mode="dry-run", files=files, **facts)
