"""Sequence classification data: aeon's UCR/UEA datasets and user CSV/NPZ files.

Every source becomes a :class:`ClassificationData`: lists of float32 arrays ``(T_i, C)``
(time-major per sequence, so lengths may differ) and integer labels indexing ``classes``.

User files (``--data PATH``):

* **CSV, wide** (univariate, UCR style): a header row, a ``label`` column, and one column
  per time step holding numbers. A shorter sequence leaves its *trailing* cells empty
  (variable length); an empty cell followed by a value is an error. Optional ``split``
  column with ``train`` / ``test``.
* **CSV, long** (multivariate): columns ``id``, ``label`` and one column per channel, one
  row per time step, rows of a sequence in time order (sequences may differ in length; the
  label must be the same on every row of an id). Optional ``split`` column.
* **NPZ**: ``X_train, y_train, X_test, y_test`` (or ``X, y``). ``X`` is ``(n, T)``
  univariate or ``(n, T, C)``; variable length is trailing NaN padding (or ``lengths_train``
  / ``lengths_test`` / ``lengths`` arrays). Labels are integers or strings. Loaded with
  ``allow_pickle=False``.

Without a ``split`` (CSV) or ``*_test`` arrays (NPZ) a stratified 30% of the file, drawn with
the run's seed, is the test split. For prediction the ``label`` column / ``y`` may be absent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import DatasetInfo, module_available

#: name -> (aeon loader, description); published figures in RESULTS.md and shared/DATA.md
AEON = {
    "gunpoint": ("load_gunpoint", "GunPoint: 50/150, length 150, 1 dim, 2 classes"),
    "italy_power_demand": ("load_italy_power_demand",
                           "ItalyPowerDemand: 67/1029, length 24, 1 dim, 2 classes"),
    "arrow_head": ("load_arrow_head", "ArrowHead: 36/175, length 251, 1 dim, 3 classes"),
    "osuleaf": ("load_osuleaf", "OSULeaf: 200/242, length 427, 1 dim, 6 classes"),
    "acsf1": ("load_acsf1", "ACSF1: 100/100, length 1460, 1 dim, 10 classes"),
    "basic_motions": ("load_basic_motions", "BasicMotions: 40/40, length 100, 6 dims, 4 classes"),
    "japanese_vowels": ("load_japanese_vowels",
                        "JapaneseVowels: 270/370, length 7-29 (variable), 12 dims, 9 classes"),
    "pickup_gesture_wiimoteZ": ("load_pickup_gesture_wiimoteZ",
                                "PickupGestureWiimoteZ: 50/50, length 29-361 (variable), 1 dim, "
                                "10 classes"),
}


def catalog() -> list[DatasetInfo]:
    """The aeon datasets classify can load, and whether this aeon ships each."""
    have_aeon = module_available("aeon")
    out = []
    for name, (loader, desc) in AEON.items():
        ok = False
        if have_aeon:
            import aeon.datasets
            ok = hasattr(aeon.datasets, loader)
        hint = "" if ok else ("pip install 'aeon>=1.0,<1.7'" if have_aeon
                              else "pip install aeon")
        out.append(DatasetInfo(name, "classify", desc, ok, hint))
    return out


@dataclass
class ClassificationData:
    """Train and test sequences ``(T_i, C)`` float32, labels as indices into ``classes``."""

    name: str
    X_train: list[np.ndarray]
    y_train: np.ndarray
    X_test: list[np.ndarray]
    y_test: np.ndarray
    classes: list[str]

    @property
    def n_channels(self) -> int:
        return self.X_train[0].shape[1]

    @property
    def variable_length(self) -> bool:
        return len({x.shape[0] for x in self.X_train + self.X_test}) > 1


def _encode(y_train: np.ndarray, y_test: np.ndarray, source: str):
    classes = sorted({str(v) for v in y_train}, key=_natural)
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({str(v) for v in y_test} - set(classes))
    if unseen:
        raise ValueError(f"{source}: test labels {unseen[:5]} never occur in the training split "
                         f"(classes {classes[:10]})")
    enc = lambda ys: np.array([index[str(v)] for v in ys], dtype=np.int64)  # noqa: E731
    return enc(y_train), enc(y_test), classes


def _natural(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def load(data: str, seed: int = 0) -> ClassificationData:
    """A named aeon dataset (``catalog()``) or a CSV/NPZ path (module docstring)."""
    return load_named_or_file(data, seed, AEON, load_aeon, load_file, "dataset")


def load_named_or_file(data: str, seed: int, names, load_named, load_path, kind: str):
    """``load_named(data)`` for a name in ``names``, ``load_path(path, seed=seed)`` for a
    .csv/.npz path (or any existing file), one error naming ``data`` for anything else;
    ``kind`` names what ``names`` holds in the error."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"data: got {data!r}, expected a {kind} name ({', '.join(names)}) or a "
                         ".csv/.npz path")
    if data in names:
        return load_named(data)
    path = Path(data)
    if path.suffix.lower() in (".csv", ".npz") or path.exists():
        return load_path(path, seed=seed)
    raise ValueError(f"data: got {data!r}, which is neither a known {kind} ({', '.join(names)}) "
                     "nor a .csv/.npz file")


def aeon_sequences(X) -> list[np.ndarray]:
    """aeon's ``(n, C, T)`` array or list of ``(C, T_i)`` arrays as ``(T_i, C)`` float32."""
    return [np.ascontiguousarray(np.asarray(x, np.float32).T) for x in X]


def split_indices(split: list[str]) -> tuple[list[int], list[int]]:
    """Positions of the ``train`` and of the ``test`` entries of ``split``."""
    return ([i for i, s in enumerate(split) if s == "train"],
            [i for i, s in enumerate(split) if s == "test"])


def load_aeon(name: str) -> ClassificationData:
    loader, _ = AEON[name]
    try:
        import aeon.datasets
    except ModuleNotFoundError:
        raise ValueError(f"data: {name!r} comes from aeon, which is not installed "
                         "(pip install aeon)") from None
    fn = getattr(aeon.datasets, loader, None)
    if fn is None:
        raise ValueError(f"data: this aeon ({aeon.__version__}) no longer ships {name!r}; "
                         "pip install 'aeon>=1.0,<1.7'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        Xtr, ytr = fn(split="train")
        Xte, yte = fn(split="test")
    y_train, y_test, classes = _encode(ytr, yte, name)
    return ClassificationData(name, aeon_sequences(Xtr), y_train, aeon_sequences(Xte), y_test,
                              classes)


# -- user files ---------------------------------------------------------------------------------
def _read(path: str | Path, labels: bool):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        X, y, split = _read_csv(path, labels)
    elif suffix == ".npz":
        X, y, split = _read_npz(path, labels)
    else:
        raise ValueError(f"data: got {str(path)!r}, expected a .csv or .npz file")
    if not X:
        raise ValueError(f"data: {str(path)!r} holds no sequences")
    return path, X, y, split


def read_sequences(path: str | Path) -> list[np.ndarray]:
    """Every sequence of a CSV/NPZ file, in file order, labels and splits ignored (prediction)."""
    return _read(path, labels=False)[1]


def load_file(path: str | Path, seed: int = 0) -> ClassificationData:
    """A labeled CSV or NPZ file (module docstring) split into train and test."""
    path, X, y, split = _read(path, labels=True)
    if split is None:
        split = _stratified_split(y, 0.3, seed, str(path))
    tr, te = split_indices(split)
    if not tr or not te:
        raise ValueError(f"data: {str(path)!r} needs sequences in both splits; got {len(tr)} "
                         f"train and {len(te)} test")
    y_train, y_test, classes = _encode(y[tr], y[te], str(path))
    if len(classes) < 2:
        raise ValueError(f"data: {str(path)!r} has only one class {classes}; classification "
                         "needs at least two")
    return ClassificationData(path.stem, [X[i] for i in tr], y_train, [X[i] for i in te], y_test,
                              classes)


def _stratified_split(y: np.ndarray, fraction: float, seed: int, source: str) -> list[str]:
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    counts = np.unique(y.astype(str), return_counts=True)[1]
    strat = y.astype(str) if counts.min() >= 2 else None
    if len(y) < 4:
        raise ValueError(f"data: {source!r} has {len(y)} labeled sequences, too few to split "
                         "into train and test (give a 'split' column or X_test/y_test)")
    _, te = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    split = ["train"] * len(y)
    for i in te:
        split[i] = "test"
    return split


def _read_csv(path: Path, labels: bool):
    import pandas as pd
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"data: {str(path)!r} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"data: {str(path)!r} is not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise ValueError(f"data: {str(path)!r} has a header but no rows")
    has_label = "label" in df.columns
    if labels and not has_label:
        raise ValueError(f"data: {str(path)!r} has no 'label' column (columns: "
                         f"{', '.join(map(str, df.columns[:8]))}...); classification needs one")
    split = None
    if "split" in df.columns:
        bad = sorted(set(df["split"].astype(str)) - {"train", "test"})
        if bad:
            raise ValueError(f"data: {str(path)!r} column 'split' has {bad[:3]}, expected "
                             "'train' or 'test'")
    reserved = {"label", "split", "id"}
    value_cols = [c for c in df.columns if c not in reserved]
    if not value_cols:
        raise ValueError(f"data: {str(path)!r} has no value columns besides "
                         f"{', '.join(c for c in df.columns if c in reserved)}")
    if has_label and df["label"].isna().any():
        row = int(np.flatnonzero(df["label"].isna().to_numpy())[0]) + 2
        raise ValueError(f"data: {str(path)!r} line {row}: the label is missing")
    values = _numeric(df[value_cols], path)
    if "id" in df.columns:  # long: one row per step
        X, y, split = [], [], [] if "split" in df.columns else None
        for key, rows in df.groupby("id", sort=False).indices.items():
            v = values[rows]
            if np.isnan(v).any():
                r = int(rows[np.argwhere(np.isnan(v))[0, 0]]) + 2
                raise ValueError(f"data: {str(path)!r} line {r} (id {key}): empty value; the long "
                                 "format needs every channel at every step")
            X.append(np.ascontiguousarray(v, np.float32))
            if has_label:
                labs = df["label"].iloc[rows].astype(str).unique()
                if len(labs) > 1:
                    raise ValueError(f"data: {str(path)!r} id {key} has several labels "
                                     f"{list(labs[:3])}, expected one per sequence")
                y.append(labs[0])
            if split is not None:
                split.append(str(df["split"].iloc[rows[0]]))
        return X, (np.array(y) if has_label else None), split
    X = []
    for r, row in enumerate(values):  # wide: one row per sequence
        nan = np.isnan(row)
        n = len(row) - int(np.argmax(~nan[::-1])) if (~nan).any() else 0
        if n == 0:
            raise ValueError(f"data: {str(path)!r} line {r + 2}: the sequence has no values")
        if nan[:n].any():
            col = value_cols[int(np.argmax(nan[:n]))]
            raise ValueError(f"data: {str(path)!r} line {r + 2}: ragged row, empty cell in column "
                             f"{col!r} before later values (only trailing cells may be empty)")
        X.append(row[:n, None].astype(np.float32))
    y = df["label"].astype(str).to_numpy() if has_label else None
    split = df["split"].astype(str).tolist() if "split" in df.columns else None
    return X, y, split


def _numeric(frame, path: Path) -> np.ndarray:
    import pandas as pd
    num = frame.apply(pd.to_numeric, errors="coerce")
    bad = num.isna() & frame.notna()
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise ValueError(f"data: {str(path)!r} line {r + 2}, column {frame.columns[c]!r}: "
                         f"{frame.iat[r, c]!r} is not a number")
    v = num.to_numpy(np.float64)
    if np.isinf(v).any():
        r, c = np.argwhere(np.isinf(v))[0]
        raise ValueError(f"data: {str(path)!r} line {r + 2}, column {frame.columns[c]!r}: "
                         "infinite value")
    return v


class _NpzArrays:
    """An open .npz whose arrays, read one at a time, refuse object (pickled) arrays with an
    error naming the file and the array."""

    def __init__(self, z, path: Path) -> None:
        self.z, self.path, self.files = z, path, z.files

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.z[key]
        except ValueError as e:
            if "allow_pickle" not in str(e):
                raise
            raise ValueError(f"data: {str(self.path)!r} (--data) array {key!r} holds Python "
                             "objects (dtype object), which gyre does not load (it may carry "
                             "code); save numbers as a numeric array and labels as a fixed-width "
                             "string array (np.asarray(labels, dtype=str))") from None


def _read_npz(path: Path, labels: bool):
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"data: {str(path)!r} is not a readable .npz without pickled objects "
                         f"({e})") from None
    z = _NpzArrays(z, path)
    keys = set(z.files)
    if {"X_train", "X_test"} <= keys:
        parts = [("train", "X_train", "y_train", "lengths_train"),
                 ("test", "X_test", "y_test", "lengths_test")]
    elif "X" in keys:
        parts = [(None, "X", "y", "lengths")]
    else:
        raise ValueError(f"data: {str(path)!r} has arrays {sorted(keys)}, expected X_train, "
                         "y_train, X_test, y_test (or X, y)")
    X, y, split = [], [], []
    for name, xk, yk, lk in parts:
        arr = z[xk]
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"data: {str(path)!r} array {xk} has dtype {arr.dtype}, expected "
                             "numbers")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"data: {str(path)!r} array {xk} has shape {arr.shape}, expected "
                             "(n, T) or (n, T, C) with n, T >= 1")
        arr = arr.astype(np.float32)
        if np.isinf(arr).any():
            raise ValueError(f"data: {str(path)!r} array {xk} holds infinite values")
        lens = z[lk].astype(np.int64) if lk in keys else None
        if lens is not None and (lens.shape != (arr.shape[0],) or (lens < 1).any()
                                 or (lens > arr.shape[1]).any()):
            raise ValueError(f"data: {str(path)!r} array {lk} must hold {arr.shape[0]} lengths "
                             f"in 1..{arr.shape[1]}")
        for i, seq in enumerate(arr):
            nan = np.isnan(seq).any(axis=1)
            n = lens[i] if lens is not None else (
                len(nan) - int(np.argmax(~nan[::-1])) if (~nan).any() else 0)
            if n == 0 or np.isnan(seq[:n]).any():
                raise ValueError(f"data: {str(path)!r} {xk}[{i}] has NaN inside the sequence "
                                 "(NaN may only pad its end)")
            X.append(np.ascontiguousarray(seq[:n]))
        if yk in keys:
            ys = z[yk]
            if ys.shape != (arr.shape[0],):
                raise ValueError(f"data: {str(path)!r} array {yk} has shape {ys.shape}, expected "
                                 f"({arr.shape[0]},), one label per sequence")
            y.extend(ys.astype(str).tolist())
        elif labels:
            raise ValueError(f"data: {str(path)!r} has no labels array {yk}")
        split.extend([name] * arr.shape[0])
    if len({x.shape[1] for x in X}) > 1:
        raise ValueError(f"data: {str(path)!r} train and test have different channel counts")
    y_arr = np.array(y) if y and len(y) == len(X) else None
    if labels and y_arr is None:
        raise ValueError(f"data: {str(path)!r} has labels for only some sequences")
    return X, y_arr, (None if parts[0][0] is None else split)


# -- preparing for the Trainer --------------------------------------------------------------------
class Standardizer:
    """Per-channel mean and standard deviation over every step of every training sequence;
    with ``log``, of ``sign(x) * log(1 + |x|)`` instead (every value mapped so before
    standardising): heavy-tailed inputs such as counts spanning orders of magnitude would
    otherwise leave all but the largest series near one constant after standardising."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, log: bool = False) -> None:
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.log = bool(log)

    @staticmethod
    def signed_log(x: np.ndarray) -> np.ndarray:
        return np.sign(x) * np.log1p(np.abs(x))

    @classmethod
    def fit(cls, X: list[np.ndarray], log: bool = False) -> Standardizer:
        allv = np.concatenate(X, axis=0).astype(np.float64)
        if log:
            allv = cls.signed_log(allv)
        std = allv.std(axis=0)
        return cls(allv.mean(axis=0), np.where(std > 1e-8, std, 1.0), log)

    def __call__(self, X: list[np.ndarray]) -> list[np.ndarray]:
        if X and X[0].shape[1] != self.mean.shape[0]:
            raise ValueError(f"data: got {X[0].shape[1]} channels, expected {self.mean.shape[0]} "
                             "(as in training)")
        f = self.signed_log if self.log else (lambda x: x)
        return [((f(x) - self.mean) / self.std).astype(np.float32) for x in X]

    def state(self) -> dict:
        return {"mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std),
                "log": self.log}

    @classmethod
    def from_state(cls, state: dict) -> Standardizer:
        # runs saved before ``log`` existed standardised the raw values
        return cls(state["mean"].numpy(), state["std"].numpy(), state.get("log", False))


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: a stratified ``fraction`` of ``y`` (plain random when a class
    has a single example); ``fraction=0`` or too few examples gives an empty validation set."""
    idx = np.arange(len(y))
    n_val = int(round(fraction * len(y)))
    if fraction == 0 or n_val < 1 or len(y) - n_val < 1:
        return idx, idx[:0]
    from sklearn.model_selection import train_test_split
    counts = np.unique(y, return_counts=True)[1]
    n_classes = len(counts)
    strat = y if counts.min() >= 2 and n_classes <= n_val and n_classes <= len(y) - n_val else None
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


class SequenceDataset(torch.utils.data.Dataset):
    """``(x (T_i, C) tensor, target)`` pairs for :func:`collate`; targets are int64 class
    indices, or ``dtype`` (float32 for regression)."""

    def __init__(self, X: list[np.ndarray], y: np.ndarray, dtype=np.int64) -> None:
        if len(X) != len(y):
            raise ValueError(f"y: got {len(y)} labels for {len(X)} sequences")
        self.X = [torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in X]
        self.y = torch.as_tensor(np.asarray(y, dtype))

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int):
        return self.X[i], self.y[i]


def collate(items: list) -> dict[str, Tensor]:
    """Pad to the longest sequence: ``{"x": (B, T_max, C), "y": (B,), "lengths": (B,)}``;
    ``lengths`` only when the batch's lengths differ."""
    xs, ys = zip(*items, strict=True)
    lens = torch.tensor([x.shape[0] for x in xs], dtype=torch.int64)
    x = torch.nn.utils.rnn.pad_sequence(list(xs), batch_first=True)
    batch = {"x": x, "y": torch.stack(list(ys))}
    if (lens != lens[0]).any():
        batch["lengths"] = lens
    return batch
