"""The λ scan (docs/design.md §8): one load of the base model, the merge at each (method, λ) installed and measured.

`scan()` is the entry point (also `extsub_kernels.scan` and the `extsub-scan` command). Modules:
`run` (the scan), `installers` (the merge put into the loaded model, per PEM type and for full
models), `evaluate` and `metrics` (NLL, greedy generations, rep-n, distinct-n), `choices` (MC1,
MC2), `rendering` (plain or chat-template tokens), `harness` (lm-evaluation-harness tasks), `model`
(loading BASE with transformers, threads), `results` (rows, guards, recommendation, timing),
`report` and `plot` (the files in SCAN_DIR). The command line is `extsub_kernels.cli.scan`.

Names are imported on first use, so the command line sets its signal handlers before torch loads.
"""

from extsub_kernels._lazy import lazy_getattr

_LOCATIONS = {
    "Recommendation": "extsub_kernels.lambda_scan.results",
    "ScanResult": "extsub_kernels.lambda_scan.results",
    "ScanRow": "extsub_kernels.lambda_scan.results",
    "scan": "extsub_kernels.lambda_scan.run",
}


__getattr__ = lazy_getattr(__name__, _LOCATIONS, globals())


__all__ = sorted(_LOCATIONS)
