"""`scan()`: load the base once, then for each (method, λ) install the merge and measure it (docs/design.md §8).

Every option and input is checked first (nothing written on bad input); the points run here or on Ray workers;
scan.json is rewritten after each row, every file at the end or on Ctrl-C / SIGTERM; `save_best` then writes the
recommended merge through `merge()`, exactly as `extsub-merge` would."""

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

from extsub_kernels._version import __version__
from extsub_kernels.adapters.peft import FORMATS
from extsub_kernels.engine.options import (
    FULL_MODEL_FORMAT,
    EvalDtypeName,
    check_choice,
    eval_dtype,
    parse_lam_grid,
    parse_methods,
    resolve_device,
    warn_negative_lams,
)
from extsub_kernels.engine.writing import progress_bar
from extsub_kernels.errors import InputError, MergeError, ScanInterrupted, Terminated
from extsub_kernels.io import ResolvedInput, check_outputs
from extsub_kernels.io.atomic import terminate_as_interrupt
from extsub_kernels.io.identity import InputSnapshot
from extsub_kernels.io.outputs import check_report_folder
from extsub_kernels.lambda_scan.harness import Harness, parse_tasks
from extsub_kernels.lambda_scan.installers import AdapterInstaller, Installer
from extsub_kernels.lambda_scan.model import check_threads, require, torch_threads
from extsub_kernels.lambda_scan.report import SCAN_FILES, ScanFiles, chosen_note
from extsub_kernels.lambda_scan.results import EXPERT, NO_AXIS, Guards, ScanResult, ScanRow, recommend, timing_summary
from extsub_kernels.lambda_scan.workers import Recipe, check_workers, connect, measure_point, prepare, resolve, spread
from extsub_kernels.merging import adapter_inputs

PathLike = str | os.PathLike
_CHANGED = "the rows measured before that was seen are kept, nothing was saved; run again once the inputs are stable"


def scan(
    expert: PathLike,
    anti: PathLike | Sequence[PathLike],
    *,
    base: PathLike,
    keep: PathLike,
    forget: PathLike,
    out: PathLike | None = None,
    lam: str | float | Sequence[float] = "0:2:0.2",
    method: str | Sequence[str] = "ext-sub,sub",
    prompts: PathLike | None = None,
    truth: PathLike | None = None,
    choices: PathLike | None = None,
    chat_template: str = "auto",
    system: str | None = None,
    lm_eval: str | Sequence[str] | None = None,
    lm_eval_include: Sequence[PathLike] = (),
    max_new_tokens: int = 64,
    device: str | torch.device = "auto",
    dtype: EvalDtypeName | torch.dtype = "auto",
    batch_size: int = 8,
    max_keep_increase: float = 0.05,
    guards: Guards | None = None,
    threads: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    save_best: PathLike | None = None,
    save_format: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> ScanResult:
    """Measure the Ext-Sub merge of an expert and anti-expert(s) at every λ, on one loaded base model.

    Each point installs the merge in place (adapters: the factored weights, never ΔW; full models: the op on the
    device) and measures NLL on `keep`, `forget` (and `truth`), MC1/MC2 on `choices`, and greedy continuations of
    `prompts` (rep-4, distinct-1/2, length, ends). Recommended per method: the best MC2 (else the FORGET − TRUTH
    margin) among the λ within the KEEP budget whose generations pass `guards`.

    Args:
        expert: θ⁺: a PEFT adapter (folder, bare file or hub id), or a full model (with `base` its base).
        anti: θ⁻, one or several, applied in order (same kind as the expert).
        base: the base model, loaded once with transformers (a folder or hub id with config.json).
        keep: text the merged model should still model well (.txt, or .jsonl text / prompt + completion / ids).
        forget: examples of the deficiency (same formats).
        out: SCAN_DIR for scan.json, scan.csv, scan.md, scan.png and samples.jsonl (None: nothing written).
        lam: the λ grid: "0:2:0.2" (start:stop:step), "0,0.5,1,2", both mixed, or a list; λ = 0 is always measured.
        method: the methods to compare, "ext-sub,sub" or a list.
        prompts: prompts to continue greedily (.txt lines, or .jsonl prompt / prompt_ids).
        truth: FORGET's prompts with true completions, line for line (.jsonl prompt + completion).
        choices: multiple-choice questions (.jsonl, TruthfulQA's layout or question/correct/incorrect).
        chat_template: "auto" (the tokenizer's chat template when it has one), "on" (it must) or "off".
        system: a system message before every rendered prompt (needs the chat template).
        lm_eval: lm-evaluation-harness tasks ("a,b" or a list) at every point, each metric a column (`eval` extra).
        lm_eval_include: folders of local lm-eval task definitions.
        max_new_tokens: the longest continuation.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: the model's dtype: "auto" (the checkpoint's on CUDA, float32 on the CPU), or a float dtype's name.
        batch_size: examples (or prompts) per forward pass.
        max_keep_increase: the recommendation's budget: KEEP-NLL may rise by this fraction over λ = 0.
        guards: how far generations may move from λ = 0's and stay candidates (default `Guards()`).
        threads: torch's CPU threads (default: half the cores); with local workers on the CPU, split between them.
        workers: measure on this many Ray workers (the `ray` extra), BASE loaded once in each: one per GPU where
            there are GPUs, else processes sharing the cores (`lambda_scan.workers`).
        ray_address: an existing Ray cluster to run the workers on (default workers: one per GPU, else per node).
        save_best: write the merge at the recommended λ of the first method here, as `merge()` does.
        save_format: an adapter format of `merge()`, or "model" (θ₀ + ΔW'); default: the adapter type's own
            format ("model" for full models).
        force: replace existing scan files in `out` and an existing `save_best`.
        progress: a progress bar over the points (stderr).

    Returns:
        A ScanResult: `rows` (iterate it), `recommendations`, `timing`, `files`, `saved`.

    Raises:
        InputError: bad options or inputs, before anything is written.
        ScanInterrupted: Ctrl-C or SIGTERM; `.result` has the rows so far, written to `out` too.
        MergeError: an input changed while the scan read it, or a merge overflowed the model's dtype (the
            rows before it are written to `out`, with the status saying why the scan stopped).
    """
    started = time.perf_counter()
    grid, methods = parse_lam_grid(lam), parse_methods(method)
    for name in methods:
        warn_negative_lams([(v,) for v in grid], name)
    guards = guards if guards is not None else Guards()
    _check_numbers(max_keep_increase, guards, max_new_tokens=max_new_tokens, batch_size=batch_size)
    threads = check_threads(threads)
    spreads = check_workers(workers, ray_address, device)
    harness = None
    if lm_eval is not None:
        harness = Harness(parse_tasks(lm_eval), tuple(str(p) for p in lm_eval_include), batch_size)
        harness.check()
    target = None if spreads else resolve_device(device)
    requested_dtype = eval_dtype(dtype)
    antis = [anti] if isinstance(anti, (str, os.PathLike)) else list(anti)
    if not antis:
        raise InputError("give at least one anti-expert")
    inputs = resolve([expert, *antis, base], quiet=not progress)
    given = {"keep": keep, "forget": forget, "prompts": prompts, "truth": truth, "choices": choices}
    read = [(f"{name.upper()} {path}", Path(path)) for name, path in given.items() if path is not None]
    sets_read = [(what.split()[0], ResolvedInput(str(p), p.name, "file", p.parent, (p,))) for what, p in read]
    snapshot = InputSnapshot([*inputs, *sets_read], reader="the scan", then=_CHANGED)
    adapters = adapter_inputs(inputs)
    require("transformers", *(["peft"] if adapters else []), *(["matplotlib"] if out is not None else []))
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        others = [(f"the best merge {save_best}", Path(save_best))] if save_best is not None else []
        check_report_folder(out_dir, SCAN_FILES, inputs, force=force, others=others, read=read)
    save_format = _check_save(save_best, save_format, inputs, adapters=adapters, force=force, read=read)
    if save_best is not None and truth is None and choices is None:
        why = NO_AXIS.split(": ", 1)[1]
        raise InputError(f"save_best= needs a truthfulness axis to choose λ by: {why}", options=("save_best",))

    specs = tuple(inp.spec for _, inp in inputs)
    evaluation = (chat_template, system, harness, batch_size, max_new_tokens, requested_dtype)
    recipe = Recipe(specs, tuple(methods), given, *evaluation)
    timing: dict[str, float] = {}
    check = (lambda made: _check_save_format(save_format, made)) if save_best is not None else None
    with torch_threads(threads):
        installer, evaluator = prepare(recipe, inputs, torch.device("meta") if spreads else target, timing, check)
    model_dtype = (requested_dtype or "auto") if spreads else next(installer.model.parameters()).dtype
    expert_in, antis_in, base_in = inputs[0][1], [i for _, i in inputs[1:-1]], inputs[-1][1]
    setup = {  # what was scanned, as scan.json records it
        "extsub_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pem": installer.kind,
        "inputs": {"expert": expert_in.spec, "anti": [a.spec for a in antis_in], "base": base_in.spec},
        "names": {"expert": expert_in.name, "anti": [a.name for a in antis_in], "base": base_in.name},
        "sets": evaluator.sets.describe(),
    }
    setup["options"] = {
        "lam": list(grid),
        "methods": list(methods),
        "device": str(target if target is not None else device),
        "dtype": str(model_dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "max_keep_increase": max_keep_increase,
        "max_new_tokens": max_new_tokens if prompts is not None else None,
        "guards": asdict(guards),
        "chat_template": evaluator.sets.chat is not None,
        "system": system,
        "threads": threads,
        "lm_eval": list(harness.tasks) if harness is not None else None,
        "workers": 1 if not spreads else workers,
    }
    points = [(EXPERT, 0.0)] + [(m, x) for m in methods for x in grid if x != 0]
    rows: list[ScanRow] = []
    samples: list[dict] = []
    measured: dict[int, tuple[ScanRow, list[dict]]] = {}

    def result(status: str, *, write: bool = False) -> ScanResult:
        """The scan as it stands; `write`: every file written from it (`files` set to them)."""
        now = {**timing, "total_seconds": time.perf_counter() - started, **timing_summary(rows)}
        recommendations = {m: recommend(rows, m, max_keep_increase, guards) for m in methods}
        made = ScanResult(rows, recommendations, status, len(points), setup, now, samples=samples)
        if write and files is not None:
            made.files = files.final(made)
        return made

    cluster = connect(workers, ray_address, str(device), threads) if spreads else None
    files = ScanFiles(out_dir) if out_dir is not None else None

    def done(index: int, row: ScanRow, point_samples: list[dict]) -> None:
        """Keep a row (in the order of `points`, wherever measured) once the inputs are seen unchanged."""
        snapshot.check()  # full models are read again at every point
        measured[index] = (row, point_samples)
        rows[:] = [measured[i][0] for i in sorted(measured)]
        samples[:] = [s for i in sorted(measured) for s in measured[i][1]]
        if files is not None:
            files.progress(result("running"))
        bar.update(1)

    try:
        bar_over = progress_bar(len(points), progress, "extsub-scan", unit="point")
        with terminate_as_interrupt(), torch_threads(threads), bar_over as bar:
            if cluster is not None:
                spread(cluster, recipe, points, done, setup["options"], timing)
            for index, (name, x) in enumerate(points if not spreads else ()):
                bar.set_postfix_str(f"{name} λ={x:g}")
                done(index, *measure_point(installer, evaluator, name, x, methods[0]))
    except BaseException as e:
        status = _stopped(e)
        partial = result(status, write=True)
        if isinstance(e, KeyboardInterrupt):
            raise ScanInterrupted(
                f"{status} after {len(rows)} of {len(points)} points", partial, terminated=status == "terminated"
            ) from None
        _name_written(e, partial.files)
        raise
    finally:
        installer.close()
    final = result("complete", write=True)
    if save_best is not None:
        try:
            snapshot.check()  # merge() reads the inputs again: they must be the ones measured
        except MergeError as e:  # scan.json says what the exit code says
            final = result(_stopped(e), write=True)
            _name_written(e, final.files)
            raise
        try:
            final.saved = _save(final, inputs, methods[0], save_best, save_format, force=force, progress=progress)
        except Exception as e:
            _name_written(e, final.files)
            raise
    return final


def _name_written(error: BaseException, files: Sequence[Path]) -> None:
    """Attach the scan files written to `error` (`published`): the command line says where the rows are."""
    if files and not getattr(error, "published", ()):
        with contextlib.suppress(AttributeError):
            error.published = tuple(files)  # type: ignore[attr-defined]


def _stopped(error: BaseException) -> str:
    """The status of a scan stopped by `error`: interrupted (Ctrl-C), terminated (SIGTERM) or failed: <why>."""
    if isinstance(error, Terminated):
        return "terminated"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"failed: {type(error).__name__}: {error}"


def _check_numbers(max_keep_increase: float, guards: Guards, **counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(max_keep_increase, bool) or not isinstance(max_keep_increase, (int, float)):
        raise InputError(f"max_keep_increase must be a number, got {max_keep_increase!r}")
    if not 0 <= max_keep_increase < float("inf"):
        raise InputError(f"max_keep_increase must be ≥ 0 (a fraction: 0.05 is +5 %), got {max_keep_increase!r}")
    for f in fields(guards):
        value = getattr(guards, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise InputError(f"{f.name} must be a number ≥ 0, got {value!r}")


def _check_save(
    save_best: PathLike | None, save_format: str | None, inputs, *, adapters: bool, force: bool, read=()
) -> str | None:
    """The format `save_best` is written in, after checking it and its path (before any work)."""
    if save_best is None:
        if save_format is not None:
            raise InputError(
                "save_format= says how save_best= writes the best merge; give save_best= too",
                options=("save_format", "save_best"),
            )
        return None
    if save_format is not None:
        check_choice(save_format, (*FORMATS, FULL_MODEL_FORMAT), "format")
    if not adapters and save_format not in (None, FULL_MODEL_FORMAT):
        raise InputError(
            f"full models merge into a full model; save_format= {save_format} is for adapter inputs",
            options=("save_format",),
        )
    fmt = save_format if adapters else FULL_MODEL_FORMAT
    merge_inputs = inputs if fmt == FULL_MODEL_FORMAT else inputs[:-1]
    check_outputs([Path(save_best)], merge_inputs, force=force, read=read)
    return fmt


def _check_save_format(fmt: str | None, installer: Installer) -> None:
    """Refuse a `save_format` the adapters' type cannot write (extsub-merge's rule), before BASE loads."""
    from extsub_kernels.adapters import AdapterOptions

    if fmt is None or not isinstance(installer, AdapterInstaller):
        return
    kind = type(installer.expert)
    if fmt != FULL_MODEL_FORMAT:
        AdapterOptions(output_format=fmt).format_for(kind, base=False)
    elif kind.base_refusal is not None:
        raise InputError(
            f"save_format= {fmt}: {kind.label} adapters change no weight of MODEL, so there is no full model to save; "
            f"save the adapter itself (save_format= {kind.formats[0].name}, the default)",
            options=("save_format",),
        )


def _save(result: ScanResult, inputs, method: str, out: PathLike, fmt: str | None, *, force: bool, progress: bool):
    """The merge at the recommended λ of `method`, by `merge()`; at λ = 0 (the expert) nothing, with a warning."""
    from extsub_kernels.adapters import AdapterOptions
    from extsub_kernels.merging import merge

    rec = result.recommendations[method]
    if rec.lam == 0:
        warnings.warn(
            f"the best merge: the recommended λ of {method} is 0, the expert itself ({rec.note}); nothing was saved to "
            f"{out}: the expert is already on disk ({inputs[0][1].spec})",
            stacklevel=3,
        )
        return None
    specs = [inp.spec for _, inp in inputs]
    full = fmt == FULL_MODEL_FORMAT
    adapter = AdapterOptions(output_format=None if full else fmt)
    chosen = dict(lam=rec.lam, method=method, base=specs[-1] if full else None, card_note=chosen_note(result, method))
    return merge(specs[0], specs[1:-1], out, force=force, progress=progress, adapter=adapter, **chosen)
