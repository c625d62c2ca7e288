"""Package interfaces whose names are imported when first used (PEP 562).

A package's ``__init__`` names what its modules define, so that other code imports from
the package and never from the modules inside it. Importing every such module up front
made each ``txproc`` command pay for what the command never runs: the ledger's compiled
kernels (Numba), the HTTP API (Starlette), Ray. A package that uses ``lazy_exports``
imports a module the first time one of its names is read, and keeps the value in the
package, so every later read is an ordinary attribute lookup.

The package still imports the same names under ``typing.TYPE_CHECKING``: mypy checks them
there and the import contracts (pyproject.toml) see the same imports as before.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str,
                 imports: Mapping[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``, given its imports as
    ``{module: (name, "attribute as name", ...)}``, which reads like the ``from module
    import ...`` statements it stands for; names listed under ``package`` itself are its
    submodules."""
    sources: dict[str, tuple[str, str]] = {}
    for module, names in imports.items():
        for entry in names:
            attribute, _, public = entry.partition(" as ")
            sources[public or attribute] = (module, attribute)

    def load(name: str) -> Any:
        try:
            module, attribute = sources[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        if module == package:
            value: Any = importlib.import_module(f"{package}.{attribute}")
        else:
            value = getattr(importlib.import_module(module), attribute)
        setattr(sys.modules[package], name, value)
        return value

    return load
