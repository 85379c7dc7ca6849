"""scan.png: one panel per metric against λ, one line per method, the recommended λ starred (the paper's Figure 1),
drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display) at the size `png_size` says."""

import io
import math

from extsub_kernels.engine.method_spec import method_spec
from extsub_kernels.lambda_scan.results import EXPERT, ScanResult

DPI = 100
PANEL_INCHES = (5.5, 4.0)
# (row field, panel title); a panel is drawn when the scan measured its field (TRUTH, choices, prompts).
PANELS = (
    ("mc2", "MC2: probability on true answers (higher: more truthful)"),
    ("mc1", "MC1: best answer ranked first (higher: more truthful)"),
    ("truth_margin", "FORGET − TRUTH NLL (higher: doubts the false more)"),
    ("keep_nll", "KEEP NLL, nats/token (lower: kept)"),
    ("forget_nll", "FORGET NLL, nats/token (higher: forgotten)"),
    ("rep_4", "rep-4 of generations (lower: less repetition)"),
    ("distinct_2", "distinct-2 of generations (higher: more diverse)"),
    ("mean_length", "continuation length, tokens"),
    ("end_rate", "share of continuations that end"),
)


def png_size(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of scan.png with `n_panels` panels (two per row)."""
    columns, rows = min(n_panels, 2), math.ceil(n_panels / 2)
    return round(PANEL_INCHES[0] * columns * DPI), round((PANEL_INCHES[1] * rows + 0.6) * DPI)


def plot_png(result: ScanResult) -> bytes:
    """The PNG bytes of the scan's plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = [p for p in PANELS if any(getattr(r, p[0]) is not None for r in result.rows)]  # the NLLs always
    width, height = png_size(len(chosen))
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    columns = min(len(chosen), 2)
    expert = next((r for r in result.rows if r.method == EXPERT), None)
    methods = list(result.recommendations) or sorted({r.method for r in result.rows} - {EXPERT})
    budget = result.setup.get("options", {}).get("max_keep_increase")
    for i, (field, title) in enumerate(chosen):
        axes = figure.add_subplot(math.ceil(len(chosen) / 2), columns, i + 1)
        for method in methods:
            rows = ([expert] if expert is not None else []) + [r for r in result.rows if r.method == method]
            points = [(r.lam, getattr(r, field)) for r in rows if _finite(getattr(r, field))]
            if not points:
                continue
            color = method_spec(method).color
            axes.plot(*zip(*points, strict=True), marker="o", markersize=4, linewidth=1.8, color=color, label=method)
            rec = result.recommendations.get(method)
            best = next((y for x, y in points if rec is not None and rec.lam is not None and x == rec.lam), None)
            if best is not None:
                star = dict(marker="*", markersize=15, markeredgecolor="black", linestyle="none", zorder=5)
                axes.plot([rec.lam], [best], color=color, **star)
        if field == "keep_nll" and expert is not None and budget is not None and _finite(expert.keep_nll):
            limit = expert.keep_nll * (1 + budget)
            axes.axhline(limit, color="gray", linestyle="--", linewidth=1, label=f"KEEP budget (+{budget:.0%})")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("λ")
        axes.grid(True, alpha=0.3)
        if i == 0:
            axes.legend(fontsize=9, loc="best")
    inputs = result.setup.get("names", {})
    status = "" if result.complete else f" — {result.status}: {len(result.rows)} of {result.points} points"
    title = f"Ext-Sub λ scan: {inputs.get('expert')} − {', '.join(inputs.get('anti', []))} on {inputs.get('base')}"
    figure.suptitle(f"{title}{status}   (★ recommended λ)", fontsize=11, y=1 - 0.15 / (height / DPI), va="top")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (height / DPI)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
