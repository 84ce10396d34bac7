"""Import the project's own packages even where a folder of the same name comes first on sys.path.

A Dask worker puts its own directory first on sys.path, and by default spills to a folder called
``storage`` inside it. Under a default (finder-mode) editable install the project is found by an
import hook that Python consults only after sys.path, so that empty folder is imported instead,
as a namespace package, and every task fails with "module 'storage' has no attribute 'Store'".
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def own_package(name: str) -> None:
    """Make `name` the installed package, not a namespace package of folders named like it (found, not
    imported, when nothing shadows it: importing `tasks` stays light)."""
    found = importlib.util.find_spec(name)
    if found is not None and found.origin not in (None, "namespace"):  # a regular package comes first
        return
    module = importlib.import_module(name)
    if getattr(module, "__file__", None):  # a regular package: nothing shadows it
        return
    parents = {os.path.dirname(os.path.abspath(str(p))) for p in module.__path__}
    saved = sys.path[:]
    try:
        del sys.modules[name]
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in parents]
        importlib.invalidate_caches()
        importlib.import_module(name)
    finally:
        sys.path[:] = saved
