"""The package version, read by setup tooling (pyproject's dynamic version) and by outputs' metadata."""

__version__ = "0.2.0"
