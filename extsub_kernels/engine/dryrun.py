"""A dry run: the files each output would hold with their sizes (generated texts have none yet), planned from the
headers through the same code as a real run, the free space checked; nothing is created, not even a temporary file."""

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
    """The report of a dry run: arguments as the run would hand `OutputSet`; `texts`: generated files' names; `reads`:
    tensor bytes it would read; `facts`: the report's other fields."""
    files = [
        planned_files(
            path, entries, meta, max_shard_size=limit, weights_name=weights_name, extra_files=extra, texts=texts
        )
        for path, meta in zip(paths, metadata, strict=True)
    ]
    check_space((path.parent, sum(size or 0 for _, size in listed)) for path, listed in zip(paths, files, strict=True))
    return MergeReport.finished(paths, bytes_read=reads, mode="dry-run", files=files, **facts)
