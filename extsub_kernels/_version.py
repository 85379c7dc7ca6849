"""The package version, read by setup tooling (pyproject's dynamic version) and by outputs' metadata."""

__version__ = "0.2.0"


def install_hint(extra: str) -> str:
    """The command that installs an optional extra. extsub is not on a package index yet, so from its source checkout.

    Example:
        >>> install_hint("scan")
        'pip install -e ".[scan]" (in the extsub source checkout)'
    """
    return f'pip install -e ".[{extra}]" (in the extsub source checkout)'
