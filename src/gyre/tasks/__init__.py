"""Task recipes: one command from real data to a trained model beside its baselines.

``TASKS`` maps a task name to its module, imported lazily by :func:`get`::

    TASKS = {"classify": "gyre.tasks.classify", "forecast": "gyre.tasks.forecast"}

The contract every task module follows (the CLI relies on nothing else):

``Config``
    A dataclass subclassing :class:`gyre.tasks.base.TaskConfig`, which holds the common fields
    (``data, out, cell, hidden, layers, bidirectional, dropout, epochs, batch_size, lr,
    weight_decay, optimizer, scheduler, clip_norm, clip_value, accumulate, tbptt, patience,
    val_fraction, device, bf16, seed, progress, tensorboard``). A task adds its own fields,
    each with a default and of type ``int``, ``float``, ``str``, ``bool`` or ``list[str]``
    (the CLI turns every field into a flag ``--field-name``; ``list[str]`` is comma
    separated; TOML has no null, so "off" is ``0`` or ``"none"``, never ``None``). It is
    loaded from TOML with ``base.load_config(Config, path)`` and written with
    ``base.write_config``. ``config.train_config()`` gives the :class:`gyre.train.TrainConfig`.

``train(config, *, resume=False) -> dict``
    Trains in ``config.out`` (``base.resolve_out(config, task)`` fills an empty one with
    ``runs/<task>-<data>-<timestamp>``) and writes there: ``config.toml`` (the resolved
    config), ``checkpoint`` (the Trainer's; the task state needed to rebuild the model, e.g.
    scalers and class names, goes in its ``extra``), ``metrics.json`` and PNG plots (matplotlib,
    Agg backend: ``base.plot_history`` for loss curves, plus the task's own). ``resume=True``
    continues from ``config.out/checkpoint``. Returns the metrics dict, which is also
    ``metrics.json``::

        {"task": str, "data": str, "out": str, "model": str (a one-line description),
         "test": {metric: float, ...},          # the recurrent model on the test split
         "baselines": {name: {metric: float, ...}, ...},
         "train": {"epochs_run": int, "best_epoch": int, "seconds": float, ...}}

    ``test`` and every baseline share metric names, so ``base.format_metrics`` prints one
    table. An interrupted run (Ctrl-C) returns ``{"interrupted": True, "out": ...}`` and
    writes no metrics.

``evaluate(out_dir, data=None) -> dict``
    Rebuilds the model from ``out_dir/config.toml`` and ``out_dir/checkpoint`` and returns
    ``{"test": {...}}`` on the run's test split, or on ``data`` (a dataset name or file path
    in the task's format) when given.

``predict(out_dir, data_path) -> list[dict]``
    Predictions for the unlabeled (or labeled) sequences in ``data_path``: one dict per
    sequence or window (classify: ``{"index", "label", "prob_<class>"...}``; forecast:
    ``{"series", "step", "forecast"}``...). The CLI writes them as CSV.

Errors in configs or data are one clear ``ValueError``/``TypeError``/``FileNotFoundError``
naming the field or file; the CLI prints it as ``gyre: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

TASKS: dict[str, str] = {
    "classify": "gyre.tasks.classify",
    "forecast": "gyre.tasks.forecast",
    "regress": "gyre.tasks.regress",
}


def names() -> list[str]:
    return sorted(TASKS)


#: the modules of the ``tasks`` extra (``pip install 'gyre[tasks]'``) that every task uses: data
#: sets and baselines, metrics, plots, config files, progress and logs
TASKS_EXTRA = ("aeon", "statsmodels", "pandas", "sklearn", "matplotlib", "tomli_w", "tqdm",
               "tensorboard")


def missing_extra(modules=TASKS_EXTRA) -> list[str]:
    """The ``modules`` that cannot be imported here."""
    missing = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[m] is None
            found = False
        if not found:
            missing.append(m)
    return missing


def get(name: str) -> ModuleType:
    """The task module for ``name``, imported on first use; a clear error naming the extra
    when the tasks' libraries are not installed."""
    if name not in TASKS:
        raise ValueError(f"task: got {name!r}, expected one of {', '.join(names())}")
    missing = missing_extra()
    if missing:
        raise ValueError(f"task: {name} needs the tasks extra, not installed here (missing "
                         f"{', '.join(missing)}): pip install 'gyre[tasks]'")
    return importlib.import_module(TASKS[name])


__all__ = ["TASKS", "TASKS_EXTRA", "names", "get", "missing_extra"]
