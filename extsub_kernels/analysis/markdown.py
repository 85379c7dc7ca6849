"""report.md of `extsub-inspect`: the inputs, then per anti-expert a table per module type and one per layer."""

from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.tables import anti_roles, layer_and_type, layer_table, summary_table


def inspection_markdown(report: MergeReport) -> str:
    """The Markdown report of an inspection (or of any run with statistics)."""
    context = report.context
    lines = ["# Ext-Sub geometry of an expert/anti-expert pair", ""]
    if context is not None:
        lines += [f"- {record['role']}: `{record['spec']}`" + _commit(record) for record in context.inputs]
        lines += ["", f"Command: `{context.command}`", ""]
    if report.layout:
        lines += [f"Rows: {report.layout}.", ""]
    lines += [
        "Per row, cos(p, m) between expert and anti-expert (task vectors), the deficiency share "
        "|Ext(m)|/|m| = √((1 − cos)/2) that Ext-Sub removes (mean weighted by |m|), and the relative change "
        "‖θ' − θ⁺‖/‖θ⁺‖ a merge at each λ would make. Degenerate rows have a zero norm or an antiparallel pair.",
        "",
    ]
    if not report.stats:
        return "\n".join([*lines, "No tensor or module is in both the expert and an anti-expert.", ""])
    lines += ["## By module type", "", summary_table(report.stats, report.settings).rstrip(), ""]
    for anti in anti_roles(report.stats):
        lines += [f"## By layer and module type ({anti})", "", layer_table(report.stats, anti, report.settings)]
    outside = list(
        dict.fromkeys(kind for tensor in report.stats for layer, kind in [layer_and_type(tensor.name)] if layer is None)
    )
    if outside:
        lines += ["", f"Left out of report.png (no layer): {', '.join(outside)}; they are in the tables above.", ""]
    return "\n".join(lines)


def _commit(record: dict) -> str:
    return f" ({record.get('repo')} @ `{record['commit']}`)" if record.get("commit") else ""
