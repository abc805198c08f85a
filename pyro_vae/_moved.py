"""Old import paths of modules that moved into the layer subpackages (docs/layout.md). Each old path is a
two-line module whose attributes come from the new module, each with a DeprecationWarning that names the
new path:

    from ._moved import forward
    __getattr__, __dir__ = forward(__name__, "pyro_vae.inference.estimators")

Importing an old path changes nothing else (no import hook is installed); the new module is imported when
an attribute is first asked for.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _Callable(ModuleType):
    """An old path that is also the name of one of the package's functions (`pyro_vae.train`,
    `pyro_vae.evaluate`): importing the old module rebinds the package's attribute to it, so the module
    calls the function it displaced, and `pyro_vae.train(...)` keeps working."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_displaced"](*args, **kwargs)


def forward(old: str, new: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of the old module `old`: attributes of `new`, with a
    DeprecationWarning at the line that asks for them."""
    parent, _, leaf = old.rpartition(".")
    displaced = getattr(sys.modules.get(parent), leaf, None)
    if callable(displaced) and not isinstance(displaced, ModuleType):
        module = sys.modules[old]
        module._displaced = displaced
        module.__class__ = _Callable

    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name != "__all__":  # __path__, __file__, ...: what a module has or not
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old} moved to {new}: import {name} from {new}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    def __dir__() -> list[str]:
        return dir(importlib.import_module(new))

    return __getattr__, __dir__
