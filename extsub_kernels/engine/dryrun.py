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
    """The report of a dry run: `paths`…`extra` and `weights_name` as the run would hand `OutputSet`; `texts`: names
    of the generated files; `reads`: tensor bytes it would read; `facts`: the report's other fields."""
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
