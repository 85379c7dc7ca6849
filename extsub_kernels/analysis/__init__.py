"""Seeing into a merge without making it: row statistics of an expert/anti-expert pair as JSON, Markdown, a heatmap."""

from extsub_kernels.analysis.inspect import inspect, write_inspection

__all__ = ["inspect", "write_inspection"]
