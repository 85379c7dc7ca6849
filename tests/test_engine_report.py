"""The summary line and --verbose lines: counts per output apart from totals, units that fit the job."""

from pathlib import Path

import torch

from extsub_kernels.engine.report import Item, MergeReport, human_bytes, human_rate, human_seconds, item_line
from extsub_kernels.engine.stats import TensorStats, pair_stats


def _report(**fields) -> MergeReport:
    base = dict(
        outputs=(Path("out-lam0.5"), Path("out-lam1")),
        tensors=6,
        merged=4,
        copied=2,
        skipped=1,
        bytes_read=30_200,
        bytes_written=34_000,
        seconds=0.025,
        peak_rss_bytes=260_000_000,
        peak_gpu_bytes=None,
        device="cpu",
    )
    return MergeReport(**(base | fields))


def test_per_output_counts_do_not_mix_with_totals():
    line = _report().summary()
    assert line.startswith(
        "2 outputs of 6 tensors each (4 merged, 2 copied, 1 skipped) | read 30.20 kB, wrote 34.00 kB in all"
    )
    assert "| 25 ms, 1.21 MB/s | peak RSS 260.00 MB, GPU n/a (cpu) | cpu -> out-lam0.5, out-lam1" in line
    one = _report(outputs=(Path("o.safetensors"),), skipped=0).summary()
    assert one.startswith("6 tensors (4 merged, 2 copied) | read 30.20 kB, wrote 34.00 kB | ") and "in all" not in one


def test_units_fit_the_amounts():
    assert (human_bytes(999), human_bytes(2_500_000), human_bytes(3 * 10**9)) == ("999 B", "2.50 MB", "3.00 GB")
    assert (human_rate(24_000_000, 1.0), human_rate(1_520_000_000, 1.0), human_rate(310, 1.0)) == (
        "24 MB/s",
        "1.52 GB/s",
        "310 B/s",
    )
    assert (human_seconds(0.0384), human_seconds(2.414)) == ("38 ms", "2.41 s")


def test_an_item_line_carries_its_statistics():
    sums = torch.tensor([[1.0, 1.0, 0.5], [4.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    stats = TensorStats("w", "tensor", (pair_stats(sums, "ANTI"),), (0.25, None))
    line = item_line(Item("w", "tensor", "merged", "in EXPERT and ANTI", (3, 2), "F32"), stats, [(0.5,), (1.0,)])
    assert line.startswith("merged  w [3, 2] F32: in EXPERT and ANTI; 3 rows, 1 degenerate row, cos mean +0.250")
    assert line.endswith("; change 25 % at λ=0.5, n/a")
    plain = item_line(Item("ids", "tensor", "copied", "not a float tensor (I64): copied from EXPERT"), None, [])
    assert plain == "copied  ids: not a float tensor (I64): copied from EXPERT"
