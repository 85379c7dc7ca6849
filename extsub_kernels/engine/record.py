"""The machine-readable record of a run (`--report FILE.json`, `extsub-inspect`'s report.json): tool, command,
inputs, options, outputs, costs, each tensor's row statistics; and the one JSON writer."""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from extsub_kernels._version import __version__
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.stats import TensorStats
from extsub_kernels.engine.tables import anti_roles, by_module_type
from extsub_kernels.io.atomic import publish, remove, reserve_temp, write_into, write_text
from extsub_kernels.io.outputs import is_stream

RECORD_FORMAT = 1


def report_record(report: MergeReport) -> dict[str, Any]:
    """The JSON-ready record of `report` (its context supplies the inputs, options and command)."""
    context = report.context
    stats = {s.name: s for s in report.stats}
    files = [*report.files, *[()] * (len(report.outputs) - len(report.files))]
    outputs = zip(report.outputs, report.settings, files, strict=False)
    return {
        "extsub_report": RECORD_FORMAT,
        "tool": {"name": "extsub", "version": __version__},
        "mode": report.mode,
        "command": context.command if context else None,
        "started_at": context.started_at if context else None,
        **{key: getattr(report, key) for key in ("seconds", "device")},
        "inputs": [dict(record) for record in context.inputs] if context else [],
        "options": jsonable(dict(context.options) if context else {}),
        **{key: getattr(report, key) for key in ("method", "layout", "kernel")},
        "outputs": [
            {"path": str(path), "lam": list(setting), "files": [{"name": n, "bytes": size} for n, size in listed]}
            for path, setting, listed in outputs
        ],
        "totals": {
            "tensors_per_output": report.tensors,
            **{key: getattr(report, key) for key in ("merged", "copied", "skipped", "bytes_read", "bytes_written")},
            **{key: getattr(report, key) for key in ("peak_rss_bytes", "peak_gpu_bytes")},
        },
        "items": [
            {**dataclasses.asdict(item), "shape": list(item.shape), "stats": _tensor_stats(stats.get(item.name))}
            for item in report.items
        ],
        "summary": _summary(report),
    }


def _tensor_stats(stats: TensorStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    pairs = [
        {**dataclasses.asdict(p), "degenerate_rows": p.degenerate_rows, "deficiency_share": p.deficiency_share}
        for p in stats.pairs
    ]
    return {"pairs": pairs, "relative_change": list(stats.relative_change)}


def _summary(report: MergeReport) -> list[dict[str, Any]]:
    """Per anti-expert and module type: the same numbers as the model card's table."""
    rows = []
    for anti in anti_roles(report.stats):
        for kind, group in by_module_type(report.stats, anti).items():
            numbers = ("tensors", "rows", "degenerate_rows", "cos_mean", "deficiency_share", "relative_change")
            row = {"anti": anti, "module_type": kind, "layers": sorted(group.layers)}
            rows.append({**row, **{key: getattr(group, key) for key in numbers}})
    return rows


def jsonable(value: Any) -> Any:
    """`value` as JSON takes it: tuples become lists, paths strings, non-finite floats null (every report file)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def json_text(record: Any) -> str:
    """`record` as the JSON every report file holds: indented, UTF-8 kept, non-finite numbers refused."""
    return json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(record: Any, target: str | os.PathLike) -> None:
    """Write `record` to `target` ("-": stdout; a FIFO or a character device: into it) whole or not at all."""
    text = json_text(record)
    if os.fspath(target) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(target)
    if is_stream(path):
        write_into(path, text.encode("utf-8"))
        return
    temp = reserve_temp(path, folder=False)
    try:
        write_text(temp, text)
        publish(temp, path, force=True)  # the caller checked the target (io.outputs.check_report_path)
    except BaseException:
        remove(temp)
        raise
