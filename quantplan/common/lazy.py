"""Lazy packages (PEP 562): a package names its public API without importing all of it.

``from quantplan import plan`` then costs pandas, not torch, and a room's ``__init__`` stays a
table of contents. A public name may equal its module's name (``quantplan.planner.export``
is both a module and the verb it defines): the package attribute is the verb, as an eager
``from .export import export`` would leave it; reach the module with ``importlib.import_module``.
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package whose public names import their module on first use."""

    _public: dict[str, str] = {}

    def __getattr__(self, name: str):
        if name not in self._public:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(self._public[name]), name)
        super().__setattr__(name, value)  # later look-ups skip this method
        return value

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and self._public.get(name) == value.__name__:
            return  # the import system binding submodule `name`: the verb of the same name keeps the attribute
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self._public) | set(super().__dir__()))


def lazy_package(name: str, public: dict[str, str]) -> None:
    """Make the already-executing package ``name`` lazy: ``public`` maps each name to its defining module."""
    module = sys.modules[name]
    module.__all__ = sorted(public)
    module.__class__ = type("LazyPackage", (LazyPackage,), {"_public": dict(public)})


def lazy_room(name: str, public: dict[str, str]) -> None:
    """:func:`lazy_package` for a room (``analysis/``, ``planner/``, ``reports/``): refuse it under a bare name.

    The room folders sit at the top of the repository, so ``import analysis`` from a checkout
    would find them; they are only ``quantplan.analysis`` etc.
    """
    if not name.startswith("quantplan."):
        raise ImportError(f"{name} is not importable on its own: use `import quantplan.{name}` "
                          "(`pip install .` installs the quantplan package)")
    lazy_package(name, public)
