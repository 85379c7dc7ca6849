"""What a merge did and what it cost: one report type for every path, with an optional section for adapters."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

GB = 1e9


class ReportSection(Protocol):
    """A path-specific part of the report (adapter merges: what happened to each module)."""

    def summary(self) -> str:
        """The part of the one-line summary this section adds."""

    def details(self, outputs: Sequence[Path]) -> list[str]:
        """Extra lines for --verbose, per output."""


@dataclass(frozen=True)
class MergeReport:
    """What a merge did and what it cost.

    Attributes:
        outputs: the paths written (one per λ setting).
        tensors: tensors in each output; merged went through the method, copied did not.
        skipped: keys left out (anti-expert-only keys with on_missing="skip").
        bytes_read: tensor bytes read from all inputs.
        bytes_written: bytes written to all outputs (headers included).
        seconds: wall time of the whole merge, fsync included.
        peak_rss_bytes: peak resident memory of this process (None where unknown).
        peak_gpu_bytes: peak CUDA memory allocated by torch during the merge (None on CPU).
        device: where the op ran.
        skipped_keys: the keys counted in `skipped`.
        adapter: adapter merges: what happened to each module (None for dense inputs).
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

    @property
    def gb_per_s(self) -> float:
        """Input bytes read per second, in GB/s (10⁹ bytes)."""
        return self.bytes_read / GB / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: tensors, GB read and written, seconds, GB/s, peak host RSS, peak GPU memory."""
        rss = human_bytes(self.peak_rss_bytes) if self.peak_rss_bytes is not None else "n/a"
        gpu = human_bytes(self.peak_gpu_bytes) if self.peak_gpu_bytes is not None else "n/a (cpu)"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        outputs = ", ".join(str(p) for p in self.outputs)
        modules = f"{self.adapter.summary()} | " if self.adapter is not None else ""
        return (
            f"{modules}{self.tensors} tensors ({self.merged} merged, {self.copied} copied{skipped}) | "
            f"read {human_bytes(self.bytes_read)}, wrote {human_bytes(self.bytes_written)} | {self.seconds:.2f} s | "
            f"{self.gb_per_s:.2f} GB/s | peak RSS {rss} | peak GPU {gpu} | {self.device} -> {outputs}"
        )

    def details(self) -> list[str]:
        """Per-module lines of an adapter merge (truncation error, modules left out), per output."""
        return self.adapter.details(self.outputs) if self.adapter is not None else []


def human_bytes(n: int) -> str:
    """Bytes in GB (10⁹), or MB / kB for small amounts.

    Example:
        >>> human_bytes(2_500_000)
        '2.50 MB'
    """
    for unit, size in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
