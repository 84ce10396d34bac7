"""Packages whose exports are imported on first use (PEP 562), so that importing one for a light thing
(the command line's `--help` reads `tasks.study.spec`) does not import torch, Prefect and xarray."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def exports(package: str, owners: dict[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of `package`: each name of `owners` taken, on first use, from the module named
    beside it, relative to `package` ("spec", "..loading"); a name that is that module's own is the module."""

    def __getattr__(name: str) -> Any:
        if name not in owners:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        owner = owners[name]
        module = importlib.import_module(owner if owner.startswith(".") else f".{owner}", package)
        own = module.__name__.rpartition(".")[2] == name and name not in vars(module)
        value = module if own else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
