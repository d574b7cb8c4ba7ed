"""Package attributes imported on first use: `__getattr__ = lazy_exports(__name__, globals(), EXPORTS)`.

Used by the packages whose plain-data modules must stay importable without
torch (engine, kv_transfer) or without gRPC and Ray (cluster).
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `exports[name]` (a module path) and caches the attribute."""
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        namespace[name] = value
        return value
    return __getattr__
