"""Package attributes imported on first use (PEP 562).

A package whose ``__init__`` imported every module eagerly would pull in torch.distributed for
callers that only need a pure-Python part (a launcher checking a layout, a Slurm job looking for the
latest checkpoint). ``lazy_exports`` builds the module-level ``__getattr__`` / ``__dir__`` / ``__all__``
from a table of submodule -> names, so each package states its public names once.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, list[str]], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``; ``namespace`` is its ``globals()``, where
    each name is cached after its first import."""
    module_of = {name: module for module, names in exports.items() for name in names}
    public = sorted(module_of)

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__, public
