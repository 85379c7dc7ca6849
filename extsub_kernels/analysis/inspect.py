"""`inspect()`: the statistics a merge reports (docs/design.md §7) without writing a merge: the inputs are resolved,
planned and streamed exactly as `merge()` does (same rules, same errors), and the write stage writes nothing."""

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from extsub_kernels._names import DEFAULT_DEVICE, DEFAULT_LAM, DEFAULT_METHOD
from extsub_kernels.adapters import AdapterOptions
from extsub_kernels.analysis.markdown import inspection_markdown
from extsub_kernels.analysis.plot import HEATMAP_NAME, PlotUnavailable, draw_heatmaps
from extsub_kernels.engine import MergeReport
from extsub_kernels.engine.options import Lam, input_roles
from extsub_kernels.engine.record import json_text, report_record
from extsub_kernels.io.atomic import publish, remove, reserve_temp, write_text
from extsub_kernels.io.outputs import check_report_folder
from extsub_kernels.io.resolve import resolve_input
from extsub_kernels.merging import RunSpec, Source, execute, source_list

JSON_NAME, MARKDOWN_NAME = "report.json", "report.md"
_REPORT_FILES = (JSON_NAME, MARKDOWN_NAME, HEATMAP_NAME)


def inspect(
    expert: Source,
    anti: Source | Sequence[Source],
    *,
    base: str | os.PathLike | None = None,
    lam: Lam = DEFAULT_LAM,
    method: str = DEFAULT_METHOD,
    device: str | torch.device = DEFAULT_DEVICE,
    transposed: bool | None = None,
    adapter: AdapterOptions | None = None,
    progress: bool = False,
    block_bytes: int | None = None,
    command: str | None = None,
) -> MergeReport:
    """Row statistics of every tensor or module a merge of these inputs would merge, without merging.

    Args:
        expert, anti, base: as for `merge()` (dense checkpoints or LoRA adapters, hub ids, ...).
        lam: the λ settings the relative change is reported at (as for `merge()`).
        method: the method's name (`engine.method_spec`; the relative change follows it).
        device: where the dense op runs for its row sums.
        transposed: GPT-2 Conv1D layout, as for `merge()`.
        adapter: scaling of bare adapter files, base-model check (the output format is unused).
        progress: a progress bar on stderr.
        block_bytes: target bytes of a block of rows (None: the device's default, as for `merge()`).
        command: the command line to record.

    Returns:
        A MergeReport with mode "inspect", no outputs, and `stats` for every merged tensor or module.
    """
    return execute(RunSpec.create(**locals(), out=None, mode="inspect", stats=True))


def write_inspection(report: MergeReport, folder: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write report.json, report.md and (with matplotlib, else a warning) report.png into `folder`, each whole or not
    at all, existing ones replaced only with `force`; returns the files written."""
    folder = Path(folder)
    check_inspection_folder(folder, force=force)  # the inputs were checked before the run (the command does)
    renders = {
        JSON_NAME: lambda temp: write_text(temp, json_text(report_record(report))),
        MARKDOWN_NAME: lambda temp: write_text(temp, inspection_markdown(report)),
        HEATMAP_NAME: lambda temp: draw_heatmaps(report, temp),
    }
    written: list[Path] = []
    try:
        for name, render in renders.items():
            temp = reserve_temp(folder / name, folder=False)
            try:
                render(temp)
                publish(temp, folder / name, force=force)
                written.append(folder / name)
            except PlotUnavailable as e:
                warnings.warn(str(e), stacklevel=2)
            finally:
                remove(temp)
    except BaseException as error:  # an interrupt or a failure after some files: say which are in place, complete
        done = tuple(dict.fromkeys([*written, *getattr(error, "published", ())]))
        if done:
            with contextlib.suppress(AttributeError):
                error.published = done  # type: ignore[attr-defined]
        raise
    return written


def check_inspection_folder(
    folder: Path,
    expert: Source | None = None,
    anti: Source | Sequence[Source] = (),
    base: str | os.PathLike | None = None,
    *,
    force: bool,
) -> None:
    """Refuse, before any work, a folder that cannot take the report files (a file, report files without `force`, an
    input's folder)."""
    sources = source_list(expert, anti) if expert is not None else []
    roles = [*input_roles(len(sources) - 1), "BASE"] if sources else []
    sources += [base] if base is not None else []
    given = [(role, s) for role, s in zip(roles, sources, strict=False) if isinstance(s, (str, os.PathLike))]
    inputs = [(role, resolve_input(s, role=role, quiet=True)) for role, s in given]
    check_report_folder(folder, _REPORT_FILES, inputs, force=force, label="-o")
