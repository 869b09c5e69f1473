"""Forecasting data: real series that work offline, a user's CSV, splits in time, scaling, windows.

The pieces, in the order a run uses them:

* :func:`load_series` returns a :class:`SeriesSet` (one or many series, each ``(T_i, C)``) for a
  built-in name (:data:`BUILTIN`) or a path to a CSV file.
* :func:`split_points` cuts every series in time: the last ``horizon`` points are the test part,
  the ``horizon`` points before them the validation part (optional), the rest the training part.
* :class:`Scaler` is fitted on the training part of each series only (per series, per column)
  and is applied to the whole series; nothing after the training part leaks into it.
* :func:`make_windows` cuts ``(lookback, horizon)`` samples whose targets lie inside one part.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

LAYOUTS = ("auto", "long", "wide")

__all__ = [
    "BUILTIN", "FREQUENCIES", "LAYOUTS", "frequency_of", "SeriesSet", "Scaler", "Windows",
    "catalog", "load_series", "make_windows", "calendar_features",
    "calendar_width", "future_index",
    "split_points", "SCALERS", "TRANSFORMS",
]


@dataclass(frozen=True)
class SeriesSet:
    """One or many aligned-column time series.

    ``series[i]`` is a float64 array ``(T_i, C)`` (the columns named by ``columns``), ``index[i]``
    its time stamps (``T_i`` values, for plots), ``target`` the column indices to forecast,
    ``season`` the seasonal period ``m`` (12 monthly, 4 quarterly, 1 yearly), ``horizon`` the
    default number of steps to forecast, ``note`` anything done to the raw data (interpolation),
    ``freq`` the sampling frequency's name (``monthly``, ``half-hourly``...; "" unknown);
    ``future[i]`` / ``future_index[i]``: rows after the observed part (``future_rows`` of
    :func:`load_series`: the known future values of covariates, targets NaN), else empty.
    """

    name: str
    series: tuple[np.ndarray, ...]
    index: tuple[np.ndarray, ...]
    columns: tuple[str, ...]
    target: tuple[int, ...]
    season: int
    horizon: int
    ids: tuple[str, ...]
    note: str = ""
    freq: str = ""
    future: tuple[np.ndarray, ...] = ()
    future_index: tuple[np.ndarray, ...] = ()

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.series])


# -- built-in data sets --------------------------------------------------------------------------

def _airline() -> SeriesSet:
    from aeon.datasets import load_airline

    y = np.asarray(load_airline(), dtype=np.float64)
    idx = pd.period_range("1949-01", periods=len(y), freq="M").to_timestamp().to_numpy()
    return SeriesSet("airline", (y[:, None],), (idx,), ("passengers",), (0,), 12, 12, ("airline",),
                     "monthly international airline passengers (thousands), 1949-1960")


def _m1_yearly() -> SeriesSet:
    from aeon.datasets import load_forecasting

    df = load_forecasting("m1_yearly_dataset")
    series, index = [], []
    for start, values in zip(df["start_timestamp"], df["series_value"], strict=True):
        v = np.asarray(values, dtype=np.float64)
        series.append(v[:, None])
        index.append(pd.date_range(pd.Timestamp(start), periods=len(v), freq="YS").to_numpy())
    return SeriesSet("m1_yearly", tuple(series), tuple(index), ("value",), (0,), 1, 6,
                     tuple(str(s) for s in df["series_name"]),
                     "M1 competition, 181 yearly series (Monash archive copy shipped with aeon)")


def _co2() -> SeriesSet:
    import statsmodels.api as sm

    df = sm.datasets.co2.load_pandas().data
    missing = int(df["co2"].isna().sum())
    weekly = df["co2"].interpolate(method="time")
    monthly = weekly.resample("MS").mean()
    return SeriesSet("co2", (monthly.to_numpy(np.float64)[:, None],), (monthly.index.to_numpy(),),
                     ("co2",), (0,), 12, 12, ("co2",),
                     f"Mauna Loa CO2 (ppm), weekly 1958-2001: {missing} missing weeks linearly "
                     "interpolated in time, then averaged to monthly means")


def _sunspots() -> SeriesSet:
    import statsmodels.api as sm

    df = sm.datasets.sunspots.load_pandas().data
    idx = pd.to_datetime(df["YEAR"].astype(int).astype(str), format="%Y").to_numpy()
    return SeriesSet("sunspots", (df["SUNACTIVITY"].to_numpy(np.float64)[:, None],), (idx,),
                     ("sunactivity",), (0,), 1, 11, ("sunspots",),
                     "yearly sunspot numbers 1700-2008; horizon one ~11-year cycle, m=1 (yearly)")


def _uschange() -> SeriesSet:
    from aeon.datasets import load_uschange

    x = np.asarray(load_uschange(), dtype=np.float64).T  # (187, 5)
    cols = ("Consumption", "Income", "Production", "Savings", "Unemployment")
    idx = pd.period_range("1970Q1", periods=len(x), freq="Q").to_timestamp().to_numpy()
    return SeriesSet("uschange", (x,), (idx,), cols, tuple(range(len(cols))), 4, 8, ("uschange",),
                     "quarterly % changes of US consumption, income, production, savings, "
                     "unemployment (fpp2), 1970Q1-2016Q3")


BUILTIN = {
    "airline": (_airline, "aeon", "144 monthly airline passengers, horizon 12, m=12"),
    "m1_yearly": (_m1_yearly, "aeon", "181 yearly M1 series (15-58 points), horizon 6, m=1"),
    "co2": (_co2, "statsmodels", "Mauna Loa CO2, monthly means (526), horizon 12, m=12"),
    "sunspots": (_sunspots, "statsmodels", "309 yearly sunspot numbers, horizon 11, m=1"),
    "uschange": (_uschange, "aeon", "5 quarterly US series (187), multivariate, horizon 8, m=4"),
}


_BUILTIN_FREQ = {"airline": "monthly", "m1_yearly": "yearly", "co2": "monthly",
                 "sunspots": "yearly", "uschange": "quarterly"}


def _m1_file_present() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                          "m1_yearly_dataset")
    return os.path.isdir(folder)


def catalog():
    """The built-in forecasting data sets, whether each loads offline here, what to install."""
    from . import DatasetInfo, module_available

    rows = []
    for name, (_, package, desc) in BUILTIN.items():
        ok = module_available(package)
        install = "" if ok else f"pip install {package}"
        if ok and name == "m1_yearly" and not _m1_file_present():
            ok, install = False, ("the aeon wheel's datasets/data/m1_yearly_dataset folder "
                                  "(reinstall aeon)")
        rows.append(DatasetInfo(name, "forecast", desc, ok, install))
    return rows


# -- a user's CSV --------------------------------------------------------------------------------

#: ``(name, season m, default horizon)`` per sampling step: the M4 / Monash convention (yearly 6,
#: quarterly 8, weekly 13, daily 14, hourly 48; monthly 12 as most Monash monthly sets, M4's 18
#: would leave a 36-month series one year of history); finer than hourly: one day ahead.
FREQUENCIES = {"yearly": (1, 6), "quarterly": (4, 8), "monthly": (12, 12), "weekly": (52, 13),
               "daily": (7, 14), "business daily": (5, 10), "hourly": (24, 48)}

#: column names taken as a panel's series id when ``id_column`` is not given
ID_NAMES = ("unique_id", "series_id", "item_id", "series")

_DATE_NAME = re.compile(r"^(ds|dates?|datetime\w*|time(stamp)?|period|month|quarter|week|day|"
                        r"year|years|yr)$", re.IGNORECASE)
_QUARTER = re.compile(r"^(\d{4})\s*[-/ ]?\s*[Qq]([1-4])$")
#: names of a column that numbers the rows (R's write.csv writes "", Rdatasets "rownames")
_INDEX_NAME = re.compile(r"^(|unnamed: ?0|index|obs|row|rownames|#)$", re.IGNORECASE)


def frequency_of(dates) -> tuple[str, int, int]:
    """``(name, season, horizon)`` of evenly spaced time stamps: the median step decides
    (yearly, quarterly, monthly, weekly, daily, business daily, hourly; finer steps get a season
    of one day, ``86400 s / step``, and a horizon of one day). Fewer than 3 stamps: yearly-like
    ``("unknown", 1, 1)``."""
    d = pd.DatetimeIndex(dates)
    if len(d) < 3:
        return "unknown", 1, 1
    step = float(np.median(np.diff(d.as_unit("s").asi8)))  # seconds
    day = 86400.0
    if step <= 0:
        return "unknown", 1, 1
    if step >= 300 * day:
        name = "yearly"
    elif step >= 80 * day:
        name = "quarterly"
    elif step >= 27 * day:
        name = "monthly"
    elif step >= 6.5 * day:
        name = "weekly"
    elif step >= 0.9 * day:
        name = "business daily" if pd.infer_freq(d[: min(len(d), 30)]) == "B" else "daily"
    elif abs(step - 3600) < 1:
        name = "hourly"
    else:
        per_day = int(round(day / step))
        label = {48: "half-hourly", 96: "quarter-hourly", 144: "10-minute"}.get(
            per_day, f"{int(step)}-second")
        return label, max(1, per_day), max(1, per_day)
    return (name, *FREQUENCIES[name])


def _as_dates(col: pd.Series, name: str):
    """The column as time stamps, or None: text that all parses as dates, or numbers in
    1000-2999 in a column named like a date or a row index: whole years (step 1) or decimal
    years stepping by a month or a quarter (:func:`_decimal_years`)."""
    if pd.api.types.is_bool_dtype(col):
        return None
    if not pd.api.types.is_numeric_dtype(col):
        if col.isna().any():
            return None
        text = col.astype(str).str.strip()
        quarters = text.str.extract(_QUARTER)
        if quarters.notna().all().all():  # 1970 Q1, 1970-Q1, 1970q1: what pandas does not parse
            return pd.Series(pd.PeriodIndex.from_fields(
                year=quarters[0].astype(int).to_numpy(),
                quarter=quarters[1].astype(int).to_numpy(), freq="Q").to_timestamp())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = pd.to_datetime(text, errors="coerce", format="mixed")
        if not parsed.notna().all():
            return None
        if getattr(parsed.dt, "tz", None) is not None:
            parsed = parsed.dt.tz_convert(None)
        return parsed
    if not (_DATE_NAME.match(name) or _INDEX_NAME.match(name)):
        return None
    v = col.to_numpy(np.float64)
    if col.isna().any() or not np.isfinite(v).all() or v.min() < 1000 or v.max() >= 3000:
        return None
    if not np.all(np.mod(v, 1) == 0):
        return _decimal_years(v)
    v = v.astype(np.int64)
    if np.all(np.diff(np.unique(v)) == 1):
        return pd.to_datetime(pd.Series(v).astype(str), format="%Y")
    return None


def _decimal_years(v: np.ndarray):
    """Decimal years (R's ``time()`` of a ``ts``: ``1959, 1959.0833, ...``) as the first day of
    their month or quarter, or None: the distinct values must step by ``1/12`` (monthly) or
    ``1/4`` (quarterly), each a whole number of such steps past its year (to the 1e-4 year that
    R's printed digits keep)."""
    u = np.unique(v)
    if len(u) < 2:
        return None
    for per_year in (12, 4):
        steps = (u - u[0]) * per_year
        if not np.allclose(steps, np.round(steps), atol=1e-3, rtol=0):
            continue
        if not np.all(np.diff(np.round(steps)) == 1):
            continue
        k = np.round(v * per_year)  # steps since year 0
        if not np.allclose(v * per_year, k, atol=1e-3, rtol=0):
            return None
        k = k.astype(np.int64)
        year, sub = np.divmod(k, per_year)
        return pd.Series(pd.to_datetime({"year": year, "month": sub * (12 // per_year) + 1,
                                         "day": 1}))
    return None


def _is_label(col: pd.Series) -> bool:
    """A text column none of whose values reads as a number or a date (a station's name, a
    symbol, a category): a series id when the dates repeat, else not used. A column with some
    numbers or dates among text is a damaged column, and refused where it is read."""
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        return False
    text = col.dropna().astype(str).str.strip()
    text = text[text != ""]
    if text.empty or pd.to_numeric(text, errors="coerce").notna().any():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(pd.to_datetime(text, errors="coerce", format="mixed").isna().all())


def _is_row_index(col: pd.Series, name: str) -> bool:
    """A column that only numbers the rows (0..n-1 or 1..n) under an index-like name."""
    if not _INDEX_NAME.match(name) or not pd.api.types.is_numeric_dtype(col):
        return False
    v = col.to_numpy()
    return bool(len(v) and np.isfinite(v).all() and
                (np.array_equal(v, np.arange(len(v))) or np.array_equal(v, np.arange(1, len(v) + 1))))


def _numeric(df: pd.DataFrame, path: str) -> dict:
    values = {}
    for col in df.columns:
        raw = df[col]
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"data: column {col!r} of {path!r} is not numeric: data row {row + 1} "
                             f"holds {raw.iloc[row]!r}; expected numbers (and an optional date "
                             f"column, see date_column, or a series id column, see id_column)")
        values[col] = num.astype(np.float64)
    return values


def _read_csv(path: str, target, date_column: str | None, id_column: str | None = None,
              layout: str = "auto", future_rows: int = 0) -> SeriesSet:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data: file {path!r} does not exist; expected a built-in name "
                         f"({', '.join(BUILTIN)}) or a path to a CSV file")
    if os.path.isdir(path):
        raise ValueError(f"data: {path!r} is a directory; expected a CSV file")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: got {layout!r}, expected one of {', '.join(LAYOUTS)}")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"data: {path!r} is empty; expected a header row and numeric rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"data: {path!r} is not a readable CSV file ({e})") from None
    if df.shape[1] == 0 or len(df) == 0:
        raise ValueError(f"data: {path!r} has no data rows; expected a header row and numeric rows")
    df.columns = ["" if str(c).startswith("Unnamed: ") else str(c).strip() for c in df.columns]
    for name, given in (("date_column", date_column), ("id_column", id_column)):
        if given is not None and given not in df.columns:
            raise ValueError(f"{name}: {given!r} is not a column of {path!r}; "
                             f"columns are {list(df.columns)}")
    if id_column is None and layout in ("auto", "long"):
        id_column = next((c for c in df.columns if c.lower() in ID_NAMES), None)
    given_id = id_column
    ids = None
    if id_column is not None:
        ids = df[id_column].astype(str).str.strip()
        df = df.drop(columns=[id_column])
    dates = None
    if date_column is not None:
        dates = _as_dates(df[date_column], "ds")
        if dates is None:
            parsed = pd.to_datetime(df[date_column].astype(str), errors="coerce", format="mixed")
            row = int(np.flatnonzero(parsed.isna().to_numpy())[0]) if parsed.isna().any() else 0
            raise ValueError(f"date_column: {date_column!r} in {path!r} has a value that is not a "
                             f"date at data row {row + 1}: {df[date_column].iloc[row]!r}")
        df = df.drop(columns=[date_column])
    else:  # the first column that reads as dates (text, or whole years under a date-like name)
        for c in df.columns:
            d = _as_dates(df[c], c)
            if d is not None:
                dates, date_column = d, c
                df = df.drop(columns=[c])
                break
    df = df[[c for c in df.columns if not _is_row_index(df[c], c)]]
    labels = [c for c in df.columns if _is_label(df[c])]
    label_id = None
    if (ids is None and given_id is None and layout in ("auto", "long") and dates is not None
            and dates.duplicated().any()):
        # dates that repeat: the series id is the first text column under which they do not
        for c in labels:
            key = df[c].astype(str).str.strip()
            if not pd.DataFrame({"id": key, "ds": dates}).duplicated().any():
                ids, id_column, label_id = key, c, c
                labels.remove(c)
                break
    if layout == "long" and ids is None:
        raise ValueError(f"id_column: layout 'long' needs a series id column; {path!r} has none "
                         f"of {', '.join(ID_NAMES)} (columns are {list(df.columns)})")
    df = df.drop(columns=[c for c in labels + [label_id] if c is not None])
    if df.shape[1] == 0:
        raise ValueError(f"data: {path!r} has only a date or id column; expected numeric value "
                         "columns")
    values = _numeric(df, path)
    columns = list(values)
    frame = pd.DataFrame(values)
    if target is None:
        target_names = ["y"] if (ids is not None and "y" in columns) else columns
    else:
        target_names = [target] if isinstance(target, str) else list(target)
        if not target_names or not all(isinstance(t, str) for t in target_names):
            raise TypeError(f"target: expected a column name or a list of names, got {target!r}")
        missing = [t for t in target_names if t not in columns]
        if missing:
            raise ValueError(f"target: {missing[0]!r} is not a numeric column of {path!r}; "
                             f"columns are {columns}")
    # the parts: one per id (long), one per column (wide), or one multivariate series
    if ids is not None:
        order = list(dict.fromkeys(ids))
        parts = [(k, (ids == k).to_numpy()) for k in order]
        pieces = [(k, frame[m].reset_index(drop=True), None if dates is None else
                   dates[m].reset_index(drop=True)) for k, m in parts]
    elif layout == "wide":
        pieces = []
        for c in target_names:
            v = frame[c]
            ok = np.flatnonzero(v.notna().to_numpy())
            if len(ok) == 0:
                raise ValueError(f"data: column {c!r} of {path!r} has no values")
            sl = slice(int(ok[0]), int(ok[-1]) + 1)  # leading and trailing blanks: not observed
            pieces.append((c, v.iloc[sl].to_frame("y").reset_index(drop=True),
                           None if dates is None else dates.iloc[sl].reset_index(drop=True)))
        columns, target_names = ["y"], ["y"]
    else:
        pieces = [(os.path.splitext(os.path.basename(path))[0], frame, dates)]
    series, index, names, n_missing, future, future_idx = [], [], [], 0, [], []
    for key, part, d in pieces:
        if future_rows:
            if len(part) <= future_rows:
                raise ValueError(f"data: series {key!r} of {path!r} has {len(part)} rows; "
                                 f"expected its observed rows and then {future_rows} future rows")
            fut = part.iloc[len(part) - future_rows:]
            future.append(fut.to_numpy(np.float64))
            future_idx.append(d.iloc[len(part) - future_rows:].to_numpy() if d is not None
                              else np.arange(len(part) - future_rows, len(part)))
            part = part.iloc[:len(part) - future_rows]
            d = None if d is None else d.iloc[:len(d) - future_rows]
        if d is not None:
            if ids is not None and not d.is_monotonic_increasing:  # a panel may come unsorted
                o = np.argsort(d.to_numpy(), kind="stable")
                part, d = part.iloc[o].reset_index(drop=True), d.iloc[o].reset_index(drop=True)
            if not d.is_monotonic_increasing:
                raise ValueError(f"date_column: {date_column!r} in {path!r} is not in increasing "
                                 "order")
            if d.duplicated().any():
                row = int(np.flatnonzero(d.duplicated().to_numpy())[0])
                where = f" for series {key!r}" if ids is not None else ""
                raise ValueError(f"date_column: {date_column!r} in {path!r} repeats the date "
                                 f"{d.iloc[row]}{where}; expected one row per time step")
        miss = int(part.isna().sum().sum())
        if miss:
            empty = [c for c in part.columns if part[c].isna().all()]
            if empty:
                where = f" for series {key!r}" if ids is not None else ""
                raise ValueError(f"data: column {empty[0]!r} of {path!r} has no values{where}")
            part = part.interpolate(method="linear", limit_direction="both")
            n_missing += miss
        series.append(part.to_numpy(np.float64))
        index.append(d.to_numpy() if d is not None else np.arange(len(part)))
        names.append(str(key))
    if dates is not None:
        freq, season, horizon = frequency_of(index[int(np.argmax([len(i) for i in index]))])
    else:
        freq, season, horizon = "unknown", 1, 1
    notes = [f"{freq} time stamps from column {date_column!r}" if dates is not None
             else "no date column: steps are row numbers"]
    if label_id is not None:
        notes.append(f"series id from text column {label_id!r} (its dates repeat)")
    if len(series) > 1:
        notes.append(f"{len(series)} series")
    if labels:
        notes.append(f"text column{'s' if len(labels) > 1 else ''} "
                     f"{', '.join(map(repr, labels))} not used (neither numbers, dates nor an id)")
    if n_missing:
        notes.append(f"{n_missing} missing values linearly interpolated")
    name = os.path.splitext(os.path.basename(path))[0]
    return SeriesSet(name, tuple(series), tuple(index), tuple(columns),
                     tuple(columns.index(t) for t in target_names), season, horizon, tuple(names),
                     "; ".join(notes), freq, tuple(future), tuple(future_idx))


def load_series(data: str, *, target=None, date_column: str | None = None,
                id_column: str | None = None, layout: str = "auto",
                future_rows: int = 0) -> SeriesSet:
    """Load a built-in data set by name (:data:`BUILTIN`) or a CSV file by path.

    A CSV has a header row and one or more numeric columns. Its time stamps come from
    ``date_column``, else from the first column that reads as dates (text dates of any common
    form, or whole or decimal years (R's ``time()``: monthly or quarterly steps) under a name
    like ``year``/``ds``/``time`` or an unnamed first column, as R and
    pandas write an index); a column that only numbers the rows is dropped. The dates give the
    frequency, the season and the default horizon (:func:`frequency_of`).

    Layouts: a **long** panel has a series id column (``id_column``, else one of
    :data:`ID_NAMES`) and one row per series and time step (``unique_id, ds, y, ...``): each id
    is a series, ``y`` (or ``target``) is forecast and the further numeric columns are inputs.
    **wide** (``layout="wide"``): each numeric column is a series of its own (leading and trailing
    blanks are not observed). Otherwise (``auto`` without an id column) the numeric columns are one
    multivariate series, ``target`` (default: all) forecast, the others inputs. Interior gaps are
    linearly interpolated (and said so in ``note``). ``future_rows=k``: the last ``k`` rows of
    each series are the future (known covariate values, blank targets), kept apart in
    ``future`` and not interpolated.
    """
    if not isinstance(data, str | os.PathLike):
        raise TypeError(f"data: expected a data set name or a CSV path, got {type(data).__name__}")
    data = os.fspath(data)
    key = data.lower().replace("-", "_")
    if key in BUILTIN:
        ss = BUILTIN[key][0]()
        ss = dataclasses.replace(ss, freq=_BUILTIN_FREQ[key])
        if date_column is not None:
            raise ValueError(f"date_column: only for CSV files; {data!r} is a built-in data set")
        if target is not None:
            names = [target] if isinstance(target, str) else list(target)
            missing = [t for t in names if t not in ss.columns]
            if missing:
                raise ValueError(f"target: {missing[0]!r} is not a column of {key}; "
                                 f"columns are {list(ss.columns)}")
            ss = dataclasses.replace(ss, target=tuple(ss.columns.index(t) for t in names))
        if id_column is not None or layout != "auto" or future_rows:
            raise ValueError(f"id_column/layout/future rows: only for CSV files; {data!r} is a "
                             "built-in data set")
        return ss
    if not data.lower().endswith(".csv") and not os.path.exists(data):
        raise FileNotFoundError(f"data: {data!r} is neither a built-in forecasting data set "
                         f"({', '.join(BUILTIN)}) nor an existing CSV file")
    return _read_csv(data, target, date_column, id_column, layout, future_rows)


# -- calendar features (known in advance) --------------------------------------------------------

def _cycles(d: pd.DatetimeIndex, freq: str):
    """``(position, period)`` pairs of the calendar cycles a frequency has."""
    if freq == "monthly":
        return [(d.month - 1, 12)]
    if freq == "quarterly":
        return [(d.quarter - 1, 4)]
    if freq == "weekly":
        return [(d.isocalendar().week.to_numpy() - 1, 52)]
    if freq in ("daily", "business daily"):
        return [(d.dayofweek, 7), (d.dayofyear - 1, 365.25)]
    if freq == "hourly":
        return [(d.hour, 24), (d.dayofweek, 7)]
    if freq.endswith("-hourly") or freq.endswith("-minute") or freq.endswith("-second"):
        return [(d.hour * 60 + d.minute, 1440), (d.dayofweek, 7)]
    return []  # yearly or unknown: no calendar cycle


def calendar_width(freq: str) -> int:
    """How many calendar feature columns :func:`calendar_features` gives for ``freq``."""
    return 2 * len(_cycles(pd.DatetimeIndex([pd.Timestamp("2000-01-01")]), freq))


def calendar_features(dates, freq: str) -> np.ndarray:
    """``(T, F)``: ``sin`` and ``cos`` of each calendar cycle's phase (month of year for monthly
    data; quarter; week of year; day of week and of year for daily; hour or minute of day and
    day of week below daily), known for future steps from their dates alone. Yearly data: none."""
    d = pd.DatetimeIndex(dates)
    cols = []
    for pos, period in _cycles(d, freq):
        a = 2 * np.pi * np.asarray(pos, dtype=np.float64) / period
        cols += [np.sin(a), np.cos(a)]
    return np.stack(cols, axis=1) if cols else np.zeros((len(d), 0))


def future_index(dates, freq: str, steps: int) -> np.ndarray:
    """The ``steps`` time stamps after ``dates`` at the series' frequency (calendar months,
    quarters and years; a fixed step otherwise)."""
    d = pd.DatetimeIndex(dates)
    last = d[-1]
    months = {"monthly": 1, "quarterly": 3, "yearly": 12}.get(freq)
    if months is not None:
        return np.array([(last + pd.DateOffset(months=months * k)).to_datetime64()
                         for k in range(1, steps + 1)])
    step = np.median(np.diff(d.asi8)) if len(d) > 1 else 86400 * 10**9
    return (d.asi8[-1] + step * np.arange(1, steps + 1)).astype(d.asi8.dtype).view(
        d.to_numpy().dtype)


# -- splits in time ------------------------------------------------------------------------------

def split_points(lengths, horizon: int, val_fraction: float = 0.0, backtest: int = 1):
    """Per series ``(val_start, test_start)`` arrays: the test part is the last
    ``backtest * horizon`` points (``backtest`` origins ``horizon`` apart); with
    ``val_fraction > 0`` the validation part is the
    ``max(horizon, round(val_fraction * test_start))`` points before it (whole horizons, in
    time; shortened so that at least 2 training points remain), else empty
    (``val_start == test_start``); the training part is everything before."""
    lengths = np.asarray(lengths, dtype=np.int64)
    test_start = lengths - int(horizon) * int(backtest)
    if val_fraction > 0:
        val_len = np.maximum(int(horizon), np.round(val_fraction * test_start).astype(np.int64))
        val_start = np.maximum(test_start - val_len, np.minimum(2, test_start))
    else:
        val_start = test_start.copy()
    return val_start, test_start


# -- scaling fitted on the training part only ----------------------------------------------------

SCALERS = ("standard", "minmax", "mean", "diff", "none")
#: value transforms applied before scaling: ``log`` (positive data), ``log1p`` (``log(1 + x)``:
#: zeros and intermittent counts, values > -1); ``auto``: ``log`` when every value of every series
#: given to :meth:`Scaler.fit` is positive, else ``none`` (resolved there and saved as such)
TRANSFORMS = ("none", "log", "log1p", "auto")


@dataclass
class Scaler:
    """Per series, per column affine scaling ``(x - loc) / scale`` fitted on the training part.

    ``standard``: mean and standard deviation; ``minmax``: to [0, 1]; ``mean``: divide by the mean
    absolute value (DeepAR-style, no shift); ``diff``: subtract the mean, divide by the mean
    absolute one-step change (the MASE denominator with m=1, so an MAE loss on the scaled values
    is a MASE); ``none``: identity. ``value_transform`` is applied first: ``log`` (every value must be
    positive; ``log=True`` is the same), ``log1p`` (``log(1 + x)``, for zeros and intermittent
    series; values must exceed -1), ``auto`` (``log`` when every value of every series passed to
    :meth:`fit` is positive, else ``none``; :meth:`fit` replaces it by what it chose).
    A column constant on the training part gets scale 1, so nothing divides by zero.
    """

    kind: str = "standard"
    log: bool = False
    loc: np.ndarray = field(default=None, repr=False)  # (S, C)
    scale: np.ndarray = field(default=None, repr=False)  # (S, C)
    value_transform: str = "none"

    def __post_init__(self):
        if self.kind not in SCALERS:
            raise ValueError(f"scaler: got {self.kind!r}, expected one of {', '.join(SCALERS)}")
        if self.value_transform not in TRANSFORMS:
            raise ValueError(f"transform: got {self.value_transform!r}, expected one of "
                             f"{', '.join(TRANSFORMS)}")
        if self.log:
            if self.value_transform == "log1p":
                raise ValueError("log: log=True and transform='log1p' contradict; give one")
            self.value_transform = "log"
        self.log = self.value_transform == "log"

    def _pre(self, x: np.ndarray) -> np.ndarray:
        if self.value_transform == "log":
            if not (np.asarray(x) > 0).all():
                raise ValueError("log: every value must be positive to take logs; got a value "
                                 "<= 0 (for zeros use transform log1p)")
            return np.log(x)
        if self.value_transform == "log1p":
            if not (np.asarray(x) > -1).all():
                raise ValueError("transform: log1p needs every value > -1; got a value <= -1")
            return np.log1p(x)
        return x

    def _post(self, x: np.ndarray) -> np.ndarray:
        if self.value_transform == "log":
            return np.exp(x)
        if self.value_transform == "log1p":
            return np.expm1(x)
        return x

    def fit(self, series, train_ends) -> Scaler:
        """Fit on ``series[i][:train_ends[i]]`` for each series ``i`` (``transform="auto"``
        looks at the signs of the whole series, not at their values' sizes)."""
        if self.value_transform == "auto":
            positive = all(bool((np.asarray(s, dtype=np.float64) > 0).all()) for s in series)
            self.value_transform = "log" if positive else "none"
            self.log = positive
        locs, scales = [], []
        for s, end in zip(series, train_ends, strict=True):
            part = np.asarray(s[: int(end)], dtype=np.float64)
            if len(part) == 0:
                raise ValueError("scaler: a series has no training points to fit on")
            part = self._pre(part)
            if self.kind == "standard":
                loc, scale = part.mean(0), part.std(0)
            elif self.kind == "minmax":
                loc, scale = part.min(0), part.max(0) - part.min(0)
            elif self.kind == "diff":
                loc = part.mean(0)
                scale = (np.abs(np.diff(part, axis=0)).mean(0) if len(part) > 1
                         else np.ones(part.shape[1]))
            elif self.kind == "mean":
                loc, scale = np.zeros(part.shape[1]), np.abs(part).mean(0)
            else:
                loc, scale = np.zeros(part.shape[1]), np.ones(part.shape[1])
            scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(loc)), scale, 1.0)
            locs.append(loc)
            scales.append(scale)
        self.loc, self.scale = np.stack(locs), np.stack(scales)
        return self

    def transform(self, x: np.ndarray, i: int, cols=None) -> np.ndarray:
        cols = slice(None) if cols is None else list(cols)
        return (self._pre(np.asarray(x, dtype=np.float64)) - self.loc[i, cols]) / self.scale[i, cols]

    def inverse(self, z: np.ndarray, i: int, cols=None) -> np.ndarray:
        """Back to the original scale; ``z`` may carry trailing axes after the column axis
        (quantiles), which get the same column's scale (the map is increasing, so quantiles stay
        quantiles)."""
        cols = slice(None) if cols is None else list(cols)
        z = np.asarray(z, dtype=np.float64)
        scale, loc = self.scale[i, cols], self.loc[i, cols]
        if z.ndim == 3:  # (steps, columns, quantiles)
            scale, loc = scale[:, None], loc[:, None]
        return self._post(z * scale + loc)

    def state(self) -> dict:
        return {"kind": self.kind, "log": self.log, "transform": self.value_transform,
                "loc": self.loc.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_state(cls, d: dict) -> Scaler:
        transform = d.get("transform", "log" if d.get("log") else "none")
        return cls(d["kind"], False, np.asarray(d["loc"], dtype=np.float64),
                   np.asarray(d["scale"], dtype=np.float64), transform)


# -- windows ------------------------------------------------------------------------------------

@dataclass
class Windows:
    """``(lookback, horizon)`` samples, right-padded where a series' history is shorter.

    ``seq``: ``(N, lookback + horizon, C)``: the ``n_in[k]`` input steps, then the ``horizon``
    target steps, then zeros; ``n_in``: ``(N,)`` input lengths; ``y``: ``(N, horizon, C_t)`` the
    target columns; ``series``: ``(N,)`` which series; ``start``: ``(N,)`` index of the first
    target step in its series.
    """

    seq: np.ndarray
    n_in: np.ndarray
    y: np.ndarray
    series: np.ndarray
    start: np.ndarray

    def __len__(self) -> int:
        return len(self.n_in)

    def inputs(self) -> np.ndarray:
        """``(N, lookback, C)``: the input steps, zero after ``n_in``."""
        lookback = self.seq.shape[1] - self.y.shape[1]
        x = self.seq[:, :lookback].copy()
        for k, n in enumerate(self.n_in):
            x[k, n:] = 0.0
        return x


def make_windows(series, lookback: int, horizon: int, ranges, *, target=None,
                 min_lookback: int | None = None, stride: int = 1) -> Windows:
    """Cut every series into samples whose ``horizon`` targets start at ``s`` with
    ``lo <= s`` and ``s + horizon <= hi`` for the series' ``(lo, hi)`` in ``ranges``, taking
    (right-aligned to ``s``) the last ``min(lookback, s)`` points before ``s`` as input; samples
    with fewer than ``min_lookback`` (default ``lookback``) input points are left out. Windows
    step by ``stride``, counted back from the latest one, so the most recent one is always kept.
    """
    for name, v, lo_ in (("lookback", lookback, 1), ("horizon", horizon, 1), ("stride", stride, 1)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < lo_:
            raise ValueError(f"{name}: expected an integer >= {lo_}, got {v!r}")
    min_lookback = lookback if min_lookback is None else int(min_lookback)
    if not 1 <= min_lookback <= lookback:
        raise ValueError(f"min_lookback: expected 1 <= min_lookback <= lookback={lookback}, "
                         f"got {min_lookback}")
    n_cols = np.asarray(series[0]).shape[1]
    target = list(range(n_cols)) if target is None else list(target)
    seqs, n_ins, ys, sids, starts = [], [], [], [], []
    for i, (s, (lo, hi)) in enumerate(zip(series, ranges, strict=True)):
        s = np.asarray(s, dtype=np.float64)
        first = max(int(lo), min_lookback)
        last = int(hi) - horizon
        for t in range(last, first - 1, -stride):
            n = min(lookback, t)
            seq = np.zeros((lookback + horizon, n_cols))
            seq[: n + horizon] = s[t - n: t + horizon]
            seqs.append(seq)
            n_ins.append(n)
            ys.append(s[t: t + horizon][:, target])
            sids.append(i)
            starts.append(t)
    if not seqs:
        return Windows(np.zeros((0, lookback + horizon, n_cols)), np.zeros(0, np.int64),
                       np.zeros((0, horizon, len(target))), np.zeros(0, np.int64),
                       np.zeros(0, np.int64))
    order = np.lexsort((np.array(starts), np.array(sids)))  # by series, then time
    return Windows(np.stack(seqs)[order], np.array(n_ins, np.int64)[order],
                   np.stack(ys)[order], np.array(sids, np.int64)[order],
                   np.array(starts, np.int64)[order])
