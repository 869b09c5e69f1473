"""Time-series extrinsic regression data (one number per series): aeon's regression archive
sets and user CSV/NPZ files in the classification format (:mod:`gyre.data.classification`)
whose ``label`` column / ``y`` arrays hold numbers.

Every source becomes a :class:`RegressionData`: lists of float32 arrays ``(T_i, C)`` and float64
targets. Without a ``split`` column / ``*_test`` arrays, a random 30% of the file (the run's
seed) is the test split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import DatasetInfo, module_available
from . import classification as cdata

#: name -> (aeon archive name, description)
AEON = {
    "cardano_sentiment": ("CardanoSentiment",
                          "CardanoSentiment: 74/33, length 24, 2 dims, sentiment score"),
    "covid_3month": ("Covid3Month", "Covid3Month: 140/61, length 84, 1 dim, death rate"),
}


def catalog() -> list[DatasetInfo]:
    """The aeon regression sets regress can load (shipped inside aeon's wheel)."""
    ok = module_available("aeon")
    return [DatasetInfo(name, "regress", desc, ok, "" if ok else "pip install aeon")
            for name, (_, desc) in AEON.items()]


@dataclass
class RegressionData:
    """Train and test sequences ``(T_i, C)`` float32 with float64 targets."""

    name: str
    X_train: list[np.ndarray]
    y_train: np.ndarray
    X_test: list[np.ndarray]
    y_test: np.ndarray

    @property
    def n_channels(self) -> int:
        return self.X_train[0].shape[1]

    @property
    def variable_length(self) -> bool:
        return len({x.shape[0] for x in self.X_train + self.X_test}) > 1


def load(data: str, seed: int = 0) -> RegressionData:
    """A named aeon regression set (``catalog()``) or a CSV/NPZ path with numeric targets."""
    return cdata.load_named_or_file(data, seed, AEON, load_aeon, load_file, "regression dataset")


def load_aeon(name: str) -> RegressionData:
    archive, _ = AEON[name]
    try:
        from aeon.datasets import load_regression
    except ModuleNotFoundError:
        raise ValueError(f"data: {name!r} comes from aeon, which is not installed "
                         "(pip install aeon)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        Xtr, ytr = load_regression(archive, split="train")
        Xte, yte = load_regression(archive, split="test")
    return RegressionData(name, cdata.aeon_sequences(Xtr), np.asarray(ytr, np.float64),
                          cdata.aeon_sequences(Xte), np.asarray(yte, np.float64))


def _numeric_targets(y: np.ndarray, source: str) -> np.ndarray:
    out = np.empty(len(y), np.float64)
    for i, v in enumerate(y):
        try:
            out[i] = float(v)
        except ValueError:
            raise ValueError(f"data: {source!r} target of sequence {i} is {str(v)!r}, expected a "
                             "number (regression needs a numeric label / y)") from None
    if not np.isfinite(out).all():
        i = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(f"data: {source!r} target of sequence {i} is {out[i]}, expected a "
                         "finite number")
    return out


def load_file(path: str | Path, seed: int = 0) -> RegressionData:
    """A CSV or NPZ file in the classification format whose labels are numbers."""
    path, X, y, split = cdata._read(path, labels=True)
    y = _numeric_targets(y, str(path))
    if split is None:
        if len(y) < 4:
            raise ValueError(f"data: {str(path)!r} has {len(y)} sequences, too few to split into "
                             "train and test (give a 'split' column or X_test/y_test)")
        rng = np.random.default_rng(seed)
        test = set(rng.permutation(len(y))[: max(1, round(0.3 * len(y)))].tolist())
        split = ["test" if i in test else "train" for i in range(len(y))]
    tr, te = cdata.split_indices(split)
    if len(tr) < 2 or not te:
        raise ValueError(f"data: {str(path)!r} needs at least 2 training and 1 test sequence; "
                         f"got {len(tr)} train and {len(te)} test")
    return RegressionData(path.stem, [X[i] for i in tr], y[tr], [X[i] for i in te], y[te])


__all__ = ["AEON", "RegressionData", "catalog", "load", "load_aeon", "load_file"]
