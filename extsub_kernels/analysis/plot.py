"""report.png of `extsub-inspect`: heatmaps of layers × module types, mean cos(p, m) and the deficiency share, drawn
with matplotlib, an optional dependency (the `plot` extra; without it `draw_heatmaps` raises `PlotUnavailable`)."""

import math
import os

from extsub_kernels._version import install_hint
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.tables import anti_roles, by_layer_and_type

HEATMAP_NAME = "report.png"
# The figure's size in pixels, whatever the model: width fixed, height per anti-expert.
WIDTH_IN, HEIGHT_IN, DPI = 12.0, 6.0, 100
# Cells are labelled with their value while the grid is small enough to read them.
_LABELLED_CELLS = 400


class PlotUnavailable(RuntimeError):
    """matplotlib is missing: the heatmap cannot be drawn (the JSON and Markdown reports still are)."""


def draw_heatmaps(report: MergeReport, path: str | os.PathLike) -> None:
    """Two heatmaps per anti-expert, layers × module types: mean cos(p, m) (−1 to 1) and the deficiency share (0 to 1);
    tensors outside layers are named under the figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed, so report.png was not drawn (report.json and report.md were); "
            f"install it with `{install_hint('plot')}`"
        ) from None
    antis = anti_roles(report.stats) or ["ANTI"]
    figure, axes = plt.subplots(len(antis), 2, figsize=(WIDTH_IN, HEIGHT_IN * len(antis)), dpi=DPI, squeeze=False)
    left_out: list[str] = []
    for row, anti in enumerate(antis):
        cells, outside = drawn_cells(report, anti)
        left_out += [kind for kind in outside if kind not in left_out]
        layers = sorted({layer for layer, _ in cells})
        kinds = list(dict.fromkeys(kind for _, kind in cells))
        for col, (title, value, limits, cmap) in enumerate(
            (
                (f"mean cos(p, m), {anti}", lambda g: g.cos_mean, (-1.0, 1.0), "coolwarm"),
                (f"deficiency share |Ext(m)|/|m|, {anti}", lambda g: g.deficiency_share, (0.0, 1.0), "viridis"),
            )
        ):
            grid = [
                [_value(value(cells[(layer, kind)])) if (layer, kind) in cells else math.nan for kind in kinds]
                for layer in layers
            ]
            ax = axes[row][col]
            image = ax.imshow(grid or [[math.nan]], aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1])
            ax.set_title(title)
            ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
            ax.set_ylabel("layer")
            figure.colorbar(image, ax=ax)
            if 0 < len(layers) * len(kinds) <= _LABELLED_CELLS:
                for y, row_values in enumerate(grid):
                    for x, v in enumerate(row_values):
                        if not math.isnan(v):
                            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7)
    if left_out:
        figure.text(0.01, 0.005, f"left out (no layer): {', '.join(left_out)}; see report.md", fontsize=8)
    figure.tight_layout(rect=(0, 0.02 if left_out else 0, 1, 1))
    figure.savefig(path, dpi=DPI, format="png")
    plt.close(figure)


def drawn_cells(report: MergeReport, anti: str) -> tuple[dict, list[str]]:
    """The heatmap's cells for one anti-expert, (layer, type) → Group, and the types with no layer, in order."""
    groups = by_layer_and_type(report.stats, anti)
    cells = {key: group for key, group in groups.items() if key[0] is not None}
    return cells, list(dict.fromkeys(kind for layer, kind in groups if layer is None))


def _value(x: float | None) -> float:
    return math.nan if x is None else x
