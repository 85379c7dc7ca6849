"""Public names imported on first use (PEP 562), so a command sets its signal handlers before torch loads."""

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, locations: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: imports `name` from `locations[name]` once and keeps it in `namespace`."""

    def __getattr__(name: str) -> object:
        module = locations.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
