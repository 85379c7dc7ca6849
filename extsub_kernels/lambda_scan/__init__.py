"""The λ scan (docs/design.md §8): one load of the base model, the merge at each (method, λ) installed and measured.

`scan()` (`run`) is the entry point; `workers` runs the points here or on Ray workers, `installers` puts the merge
into the model, `evaluate`, `metrics`, `choices`, `rendering`, `harness` measure, `model` loads BASE, `results`,
`report`, `plot` make the files. Names are imported on first use (the command's signal handlers come first)."""

from extsub_kernels._lazy import lazy_getattr

_LOCATIONS = {
    "Recommendation": "extsub_kernels.lambda_scan.results",
    "ScanResult": "extsub_kernels.lambda_scan.results",
    "ScanRow": "extsub_kernels.lambda_scan.results",
    "scan": "extsub_kernels.lambda_scan.run",
}

__getattr__ = lazy_getattr(__name__, _LOCATIONS, globals())

__all__ = sorted(_LOCATIONS)
