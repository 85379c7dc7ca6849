"""What a merge did and what it cost: one report type for every path and mode, with row statistics and provenance."""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from extsub_kernels.engine.context import RunContext
from extsub_kernels.engine.memory import peak_rss_bytes
from extsub_kernels.engine.method_spec import DEFAULT_METHOD
from extsub_kernels.engine.options import lam_text
from extsub_kernels.engine.stats import TensorStats
from extsub_kernels.io.outputs import listed_files

_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))  # SI, as the progress bar counts
Files = tuple[tuple[str, int | None], ...]


class ReportSection(Protocol):
    """A path-specific part of the report (adapters: each module): its part of the summary, its --verbose lines."""

    def summary(self) -> str: ...

    def details(self, outputs: Sequence[Path]) -> list[str]: ...


@dataclass(frozen=True)
class Item:
    """What a run does with one tensor or module (`kind`) and why: `action` ("merged", "copied", "skipped", "dropped",
    "added"), `reason`, and `shape` and safetensors `dtype` as written (a module: (out, in) of its ΔW)."""

    name: str
    kind: str
    action: str
    reason: str
    shape: tuple[int, ...] = ()
    dtype: str | None = None


@dataclass(frozen=True)
class MergeReport:
    """What a merge did and what it cost.

    Attributes:
        outputs: the paths written, one per λ setting (a dry run: those it would write).
        tensors, merged, copied, skipped: tensors in each output, through the method or not; keys left out.
        bytes_read, bytes_written: tensor bytes read from all inputs; bytes written to all outputs (headers too).
        seconds, peak_rss_bytes, peak_gpu_bytes: wall time, fsync included; peak memory (None where unknown, on CPU).
        device, kernel: where the op ran and what ran it (`ops.op_backend`; None where nothing was computed).
        adapter: adapter merges: what happened to each module (None for dense inputs).
        mode: "merge", "dry-run" (nothing read but headers, nothing written) or "inspect" (statistics only).
        method, settings, items, stats: the method; λ per anti-expert per output; each tensor's fate and statistics.
        files: (name, bytes) of the files of each output (bytes None for texts a dry run cannot size).
        layout, context: how rows were paired, and why; the run's provenance (inputs, recipe, command).
    """

    outputs: tuple[Path, ...]
    tensors: int
    merged: int
    copied: int
    skipped: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int | None
    peak_gpu_bytes: int | None
    device: str
    skipped_keys: tuple[str, ...] = field(default=(), repr=False)
    adapter: ReportSection | None = field(default=None, repr=False)
    mode: str = "merge"
    method: str = DEFAULT_METHOD
    settings: tuple[tuple[float, ...], ...] = field(default=(), repr=False)
    items: tuple[Item, ...] = field(default=(), repr=False)
    stats: tuple[TensorStats, ...] = field(default=(), repr=False)
    files: tuple[Files, ...] = field(default=(), repr=False)
    layout: str | None = field(default=None, repr=False)
    kernel: str | None = field(default=None, repr=False)
    context: RunContext | None = field(default=None, repr=False)

    @classmethod
    def finished(
        cls,
        outputs: Sequence[Path],
        *,
        bytes_read: int,
        bytes_written: int = 0,
        started: float | None = None,
        peak_gpu_bytes: int | None = None,
        files: Sequence[Sequence[tuple[str, int | None]]] | None = None,
        **facts,
    ) -> "MergeReport":
        """The report of a run ended now, the one builder: seconds since `started` (None: 0), peak RSS, each output's
        files (`files`: a dry run's plan; else those written); `facts`: the other fields."""
        listed = files if files is not None else [listed_files(path) for path in outputs]
        facts.update(
            files=tuple(tuple(f) for f in listed), peak_rss_bytes=peak_rss_bytes(), peak_gpu_bytes=peak_gpu_bytes
        )
        seconds = time.perf_counter() - started if started is not None else 0.0
        return cls(outputs=tuple(outputs), bytes_read=bytes_read, bytes_written=bytes_written, seconds=seconds, **facts)

    def counts(self) -> str:
        """ "6 tensors (4 merged, 2 copied)", or "2 outputs of 6 tensors each (...)"."""
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        split = f"({self.merged} merged, {self.copied} copied{skipped})"
        tensors = f"{self.tensors} tensor{'s' if self.tensors != 1 else ''}"
        if len(self.outputs) > 1:
            return f"{len(self.outputs)} outputs of {tensors} each {split}"
        return f"{tensors} {split}"

    def summary(self) -> str:
        """One line: what each output holds, then bytes, time, throughput and memory of the whole run."""
        modules = f"{self.adapter.summary()} | " if self.adapter is not None else ""
        outputs = ", ".join(str(p) for p in self.outputs)
        if self.mode == "dry-run":
            sizes = [size for files in self.files for _, size in files if size is not None]
            n_files = sum(len(files) for files in self.files)
            return (
                f"dry run: {modules}{self.counts()} | would read {human_bytes(self.bytes_read)} and write "
                f"{human_bytes(sum(sizes))} in {n_files} files -> {outputs} | nothing was written"
            )
        rss = human_bytes(self.peak_rss_bytes) if self.peak_rss_bytes is not None else "n/a"
        gpu = human_bytes(self.peak_gpu_bytes) if self.peak_gpu_bytes is not None else "n/a (cpu)"
        rate = f"{human_seconds(self.seconds)}, {human_rate(self.bytes_read, self.seconds)}"
        if self.mode == "inspect":
            n, kind = len(self.stats), self.stats[0].kind if self.stats else "tensor"
            if self.adapter is not None and self.items:
                kind = self.items[0].kind  # what the adapter type merges: module, vector, prompt embedding
            return (
                f"inspected {n} {kind}{'s' if n != 1 else ''} | read {human_bytes(self.bytes_read)} | {rate} | "
                f"peak RSS {rss}, GPU {gpu} | {self.device}"
            )
        in_all = " in all" if len(self.outputs) > 1 else ""
        return (
            f"{modules}{self.counts()} | read {human_bytes(self.bytes_read)}, wrote {human_bytes(self.bytes_written)}"
            f"{in_all} | {rate} | peak RSS {rss}, GPU {gpu} | {self.device} -> {outputs}"
        )

    def details(self) -> list[str]:
        """--verbose: one line per tensor or module (with its row statistics), then the adapter section's lines."""
        by_name = {s.name: s for s in self.stats}
        lines = []
        for item in self.items:
            lines.append(item_line(item, by_name.get(item.name), self.settings))
            if item.name not in by_name:  # a unit reported in parts (a prefix: per layer and head), a line each
                parts = [s for name, s in by_name.items() if name.startswith(f"{item.name}.")]
                part_of = f"rows of {item.name}"
                lines += [
                    item_line(replace(item, name=s.name, shape=(), reason=part_of), s, self.settings) for s in parts
                ]
        if self.layout:
            lines.append(f"layout: {self.layout}")
        if self.kernel:
            lines.append(f"op on {self.device}: {self.kernel}")
        return lines + (self.adapter.details(self.outputs) if self.adapter is not None else [])

    def file_lines(self) -> list[str]:
        """The files of each output with their sizes (a dry run: those it would write)."""
        lines = []
        for path, files in zip(self.outputs, self.files, strict=False):
            later = "(written after the tensors)"
            lines += [f"{path}:", *(f"  {name}  {human_bytes(n) if n is not None else later}" for name, n in files)]
        return lines


def item_line(item: Item, stats: TensorStats | None, settings: Sequence[Sequence[float]]) -> str:
    """One line of --verbose or --dry-run: action, name, shape and dtype, reason, and the row statistics if any."""
    shape = f" {list(item.shape)}" if item.shape else ""
    dtype = f" {item.dtype}" if item.dtype else ""
    line = f"{item.action:<7} {item.name}{shape}{dtype}: {item.reason}"
    if stats is None:
        return line
    for pair in stats.pairs:
        prefix = f"; vs {pair.anti}" if len(stats.pairs) > 1 else ";"
        c = pair.cos
        cos = f"cos mean {c.mean:+.3f} (quartiles {c.q1:+.3f}, {c.median:+.3f}, {c.q3:+.3f})" if c else "cos n/a"
        share = f"{pair.deficiency_share:.2f}" if pair.deficiency_share is not None else "n/a"
        n = pair.degenerate_rows
        degenerate = f", {n} degenerate row{'s' if n != 1 else ''}" if n else ""
        rows = f"{pair.rows} row{'s' if pair.rows != 1 else ''}"
        line += f"{prefix} {rows}{degenerate}, {cos}, deficiency share {share}"
    changes = [
        f"{100 * c:.3g} % at λ={lam_text(s, short=True)}" if c is not None else "n/a"
        for c, s in zip(stats.relative_change, settings, strict=False)
    ]
    return line + (f"; change {', '.join(changes)}" if changes else "")


def human_bytes(n: int) -> str:
    """Bytes in GB (10⁹), MB or kB: "2.50 MB"."""
    return next((f"{n / size:.2f} {unit}" for unit, size in _UNITS if n >= size), f"{n} B")


def human_rate(n: int, seconds: float) -> str:
    """A throughput in the unit that suits it: "1.52 GB/s", "24 MB/s", "310 kB/s"."""
    if seconds <= 0:
        return "n/a"
    rate = n / seconds
    return next((f"{rate / size:.3g} {unit}/s" for unit, size in _UNITS if rate >= size), f"{rate:.3g} B/s")


def human_seconds(seconds: float) -> str:
    """Seconds, or milliseconds below one second: "2.41 s", "38 ms"."""
    return f"{seconds:.2f} s" if seconds >= 1 else f"{1000 * seconds:.0f} ms"
