"""Real datasets and user files, as tensors ready for the Trainer.

Each task's data module (``classification``, ``forecasting``) exposes ``catalog() ->
list[DatasetInfo]``: the named datasets it can load, whether each is available offline here,
and what to install when not. :func:`catalog` gathers them for ``gyre data list``.
Loaders read only what is installed; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

#: task -> module that provides ``catalog()``
SOURCES = {"classify": "gyre.data.classification", "forecast": "gyre.data.forecasting",
           "regress": "gyre.data.regression"}


@dataclass(frozen=True)
class DatasetInfo:
    """One named dataset: ``name`` (what ``--data`` takes), ``task``, a one-line ``description``
    (size, length, dims, classes), ``available`` offline now, and ``install`` (what to install
    when it is not, or ``""``)."""

    name: str
    task: str
    description: str
    available: bool
    install: str = ""


def module_available(name: str) -> bool:
    """Whether a top-level module can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def catalog() -> list[DatasetInfo]:
    """Every task's named datasets (a task whose data module is missing is skipped)."""
    out: list[DatasetInfo] = []
    for mod in SOURCES.values():
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        out.extend(m.catalog())
    return out


__all__ = ["DatasetInfo", "SOURCES", "catalog", "module_available"]
