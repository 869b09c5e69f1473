"""Forecasting: a recurrent model over windows of one or many series, beside statsmodels baselines.

The model reads ``lookback`` scaled steps of every column and forecasts the next ``horizon`` steps
of the target columns, either all at once (``strategy="direct"``: the head emits ``horizon x C_t``
numbers from the last state) or one step at a time (``"recursive"``: the head emits the next step
of every column, which is fed back as the next input). With ``residual="last"`` the head predicts
the change from the last observed value (or, with ``residual="seasonal"``, from the value one
season back), so an untrained model starts at the naive forecast.
Many series (M1) train one global model across all series, each scaled by its own training part.

Metrics (per series and target column on the original scale, then averaged, as the Monash archive
reports them):

* MAE ``mean|y - f|``, RMSE ``sqrt(mean (y - f)^2)``;
* MAPE ``100 mean|y - f| / |y|`` (NaN when an actual is 0);
* sMAPE ``100 mean 2|y - f| / (|y| + |f|)`` (Makridakis; terms with ``|y| + |f| = 0`` count 0);
* MASE ``mean|y - f| / mean_{t>m} |x_t - x_{t-m}|`` over the in-sample series ``x`` (everything
  before the test part), ``m`` the season (12 monthly, 4 quarterly, 1 yearly); ``m = 1`` when the
  in-sample part is not longer than ``m`` (Hyndman & Koehler 2006; Godahewa et al. 2021).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.forecasting import (
    LAYOUTS,
    SCALERS,
    TRANSFORMS,
    Scaler,
    SeriesSet,
    Windows,
    calendar_features,
    calendar_width,
    future_index,
    load_series,
    make_windows,
    split_points,
)
from ..nn import Recurrent
from . import base
from .base import TaskConfig

#: published mean MASE on M1 yearly (Monash archive, Godahewa et al. 2021; ../shared/DATA.md)
PUBLISHED = {"m1_yearly": {"TBATS MASE": 3.499, "ETS MASE": 3.771, "Theta MASE": 4.191,
                           "N-BEATS MASE": 4.384, "DeepAR MASE": 4.603,
                           "Transformer MASE": 5.519}}

STRATEGIES = ("direct", "recursive")
RESIDUALS = ("last", "seasonal", "none")
LOSSES = ("mse", "mae", "huber")


# -- metrics ------------------------------------------------------------------------------------

def mae(y, f) -> float:
    y, f = np.asarray(y, np.float64), np.asarray(f, np.float64)
    return float(np.mean(np.abs(y - f)))


def rmse(y, f) -> float:
    y, f = np.asarray(y, np.float64), np.asarray(f, np.float64)
    return float(np.sqrt(np.mean((y - f) ** 2)))


def mape(y, f) -> float:
    y, f = np.asarray(y, np.float64), np.asarray(f, np.float64)
    if (y == 0).any():
        return math.nan
    return float(100.0 * np.mean(np.abs(y - f) / np.abs(y)))


def smape(y, f) -> float:
    y, f = np.asarray(y, np.float64), np.asarray(f, np.float64)
    den = np.abs(y) + np.abs(f)
    terms = np.divide(2.0 * np.abs(y - f), den, out=np.zeros_like(den), where=den > 0)
    return float(100.0 * np.mean(terms))


def mase(y, f, insample, m: int = 1) -> float:
    y, f = np.asarray(y, np.float64), np.asarray(f, np.float64)
    x = np.asarray(insample, np.float64)
    if len(x) <= m:
        m = 1
    if len(x) < 2:
        return math.nan
    scale = np.mean(np.abs(x[m:] - x[:-m]))
    if scale == 0:
        return math.nan
    return float(np.mean(np.abs(y - f)) / scale)


METRICS = ("mae", "rmse", "mape", "smape", "mase")


def score(actuals, forecasts, insamples, season: int) -> dict[str, float]:
    """Every metric per series and column (arrays ``(h, C)`` or ``(h,)``), then the mean over
    series and columns (NaNs left out of the mean; a metric that is NaN everywhere stays NaN)."""
    per = {k: [] for k in METRICS}
    for y, f, x in zip(actuals, forecasts, insamples, strict=True):
        y, f, x = (np.asarray(a, np.float64) for a in (y, f, x))
        if y.ndim == 1:
            y, f, x = y[:, None], f[:, None], x[:, None]
        for c in range(y.shape[1]):
            per["mae"].append(mae(y[:, c], f[:, c]))
            per["rmse"].append(rmse(y[:, c], f[:, c]))
            per["mape"].append(mape(y[:, c], f[:, c]))
            per["smape"].append(smape(y[:, c], f[:, c]))
            per["mase"].append(mase(y[:, c], f[:, c], x[:, c], season))
    out = {}
    for k, v in per.items():
        v = np.asarray(v)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return out


def interval_pairs(levels) -> list[tuple[int, int, int]]:
    """``(lower index, upper index, coverage %)`` for each central interval in ``levels``
    (a level ``q < 0.5`` and ``1 - q`` both present: the ``100 (1 - 2q)`` % interval)."""
    lv = [float(q) for q in levels]
    pairs = []
    for i, q in enumerate(lv):
        if q < 0.5:
            j = next((j for j, r in enumerate(lv) if abs(r - (1 - q)) < 1e-9), None)
            if j is not None:
                pairs.append((i, j, int(round(100 * (1 - 2 * q)))))
    return pairs


def prob_score(actuals, quantiles, insamples, season: int, levels) -> dict[str, float]:
    """Probabilistic metrics per series and column (``quantiles`` ``(h, C, Q)`` at ``levels``),
    then the mean over series and columns, scaled like MASE by the in-sample seasonal-naive MAE:

    * ``coverage_L``: the share of actuals inside the central ``L`` % interval;
    * ``msis_L``: the mean scaled interval score (M4): ``(U - L) + (2/a)(L - y)[y < L] +
      (2/a)(y - U)[y > U]`` with ``a = 1 - L/100``, averaged over steps, over the MASE scale;
    * ``scaled_crps``: CRPS approximated on the quantile grid, ``2 mean_q pinball_q``, averaged
      over steps, over the MASE scale (the ``sQL`` of the Monash/M5 reports).
    """
    lv = np.asarray([float(q) for q in levels])
    pairs = interval_pairs(levels)
    per: dict[str, list] = {"scaled_crps": []}
    for _, _, L in pairs:
        per[f"coverage_{L}"], per[f"msis_{L}"] = [], []
    for y, q, x in zip(actuals, quantiles, insamples, strict=True):
        y, q, x = (np.asarray(a, np.float64) for a in (y, q, x))
        if y.ndim == 1:
            y, q, x = y[:, None], q[:, None], x[:, None]
        for c in range(y.shape[1]):
            m = season if len(x) > season else 1
            scale = np.mean(np.abs(x[m:, c] - x[:-m, c])) if len(x) > 1 else math.nan
            ok = np.isfinite(scale) and scale > 0
            d = y[:, c, None] - q[:, c]
            ql = 2 * np.mean(np.maximum(lv * d, (lv - 1) * d))
            per["scaled_crps"].append(ql / scale if ok else math.nan)
            for i, j, L in pairs:
                lo, hi, yy = q[:, c, i], q[:, c, j], y[:, c]
                a_ = 1 - L / 100
                per[f"coverage_{L}"].append(float(np.mean((yy >= lo) & (yy <= hi))))
                iscore = (hi - lo) + 2 / a_ * (lo - yy) * (yy < lo) + 2 / a_ * (yy - hi) * (yy > hi)
                per[f"msis_{L}"].append(float(np.mean(iscore)) / scale if ok else math.nan)
    out = {}
    for k, v in per.items():
        v = np.asarray(v, np.float64)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return out


# -- baselines (statsmodels, statsforecast) -------------------------------------------------------

BASELINES = ("naive", "seasonal_naive", "holt_winters", "arima", "auto_ets", "auto_arima",
             "auto_theta")
#: statsforecast's automatic model selection (the ``forecast`` extra)
AUTO_BASELINES = ("auto_ets", "auto_arima", "auto_theta")


def _naive(x, h, m):
    return np.repeat(x[-1:], h)


def _seasonal_naive(x, h, m):
    if m <= 1 or len(x) < m:
        return _naive(x, h, m)
    return np.resize(x[-m:], h)  # repeats the last season: x[-m], ..., x[-1], x[-m], ...


def _holt_winters(x, h, m):
    """Holt-Winters, additive trend, multiplicative season (additive if any value <= 0) when
    there are two full seasons; otherwise Holt's damped additive trend; simple exponential
    smoothing for fewer than 10 points."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    if m > 1 and len(x) >= 2 * m:
        model = ExponentialSmoothing(x, trend="add", seasonal="mul" if (x > 0).all() else "add",
                                     seasonal_periods=m)
    elif len(x) >= 10:
        model = ExponentialSmoothing(x, trend="add", damped_trend=True)
    else:
        model = ExponentialSmoothing(x)
    return model.fit().forecast(h)


def _arima(x, h, m):
    """SARIMA(0,1,1)(0,1,1)m (the airline model), on logs when every value is positive, when
    there are more than two seasons; otherwise ARIMA(0,1,1) with drift."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    pos = bool((x > 0).all())
    z = np.log(x) if pos else x
    if m > 1 and len(x) > 2 * m + 1:
        fit = SARIMAX(z, order=(0, 1, 1), seasonal_order=(0, 1, 1, m)).fit(disp=False)
        f = fit.forecast(h)
        return np.exp(f) if pos else f
    fit = SARIMAX(x, order=(0, 1, 1), trend="t").fit(disp=False)
    return fit.forecast(h)


def _statsforecast_models():
    try:
        from statsforecast.models import AutoARIMA, AutoETS, AutoTheta
    except ImportError as e:
        raise ImportError(f"baselines: auto_ets, auto_arima and auto_theta need statsforecast "
                          f"({e}); pip install 'gyre[forecast]' and then pip install --no-deps "
                          "statsforecast coreforecast utilsforecast fugue triad adagio (see the "
                          "Makefile's FORECAST_NODEPS), or leave them out with --baselines") from e
    return {"auto_ets": AutoETS, "auto_arima": AutoARIMA, "auto_theta": AutoTheta}


def _pct(q: float):
    """The central interval (in %) whose bound is quantile ``q``, as statsforecast names it."""
    p = round(100 * abs(1 - 2 * float(q)), 6)
    return int(p) if p == int(p) else p


def _auto(name):
    def fit(x, h, m, levels=()):
        """statsforecast's automatic model (season ``m``, or 1 where it cannot fit one):
        ``(mean (h,), quantiles (h, Q) at levels)``."""
        cls = _statsforecast_models()[name]
        pct = sorted({_pct(q) for q in levels if abs(q - 0.5) > 1e-9})
        last = None
        for season in dict.fromkeys((m, 1)):
            try:
                r = cls(season_length=season).forecast(y=np.asarray(x, np.float64), h=h,
                                                       level=pct or None)
                break
            except Exception as e:  # noqa: BLE001 - too short for the season: retried with 1
                last = e
        else:
            raise last
        mean = np.asarray(r["mean"], np.float64)
        qs = []
        for q in levels:
            if abs(q - 0.5) < 1e-9:
                qs.append(mean)
            else:
                key = f"{'lo' if q < 0.5 else 'hi'}-{_pct(q)}"
                qs.append(np.asarray(r[key], np.float64))
        return mean, (np.stack(qs, axis=1) if qs else None)
    return fit


_BASELINE_FNS = {"naive": _naive, "seasonal_naive": _seasonal_naive,
                 "holt_winters": _holt_winters, "arima": _arima,
                 **{n: _auto(n) for n in AUTO_BASELINES}}


def baseline_forecasts(insamples, horizon: int, season: int, names=BASELINES, levels=None):
    """``{name: (forecasts, failures)}``: each baseline fitted on each in-sample column
    (``(n, C)`` arrays) separately; a fit that raises or gives non-finite values falls back to
    the last-value forecast and is counted in ``failures``. With ``levels`` (quantile levels),
    ``{name: (forecasts, failures, quantiles)}``: ``quantiles`` ``(h, C, Q)`` per series from the
    models that give intervals (statsforecast's), None for the others."""
    if any(n in AUTO_BASELINES for n in names):
        _statsforecast_models()
    result = {}
    for name in names:
        fn = _BASELINE_FNS[name]
        auto = name in AUTO_BASELINES
        fcs, qfcs, failures = [], [], 0
        for x in insamples:
            x = np.asarray(x, np.float64)
            x2 = x[:, None] if x.ndim == 1 else x
            cols, qcols = [], []
            for c in range(x2.shape[1]):
                q = None
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if auto:
                            f, q = fn(x2[:, c], horizon, season, tuple(levels or ()))
                        else:
                            f = fn(x2[:, c], horizon, season)
                        f = np.asarray(f, np.float64)
                    if f.shape != (horizon,) or not np.isfinite(f).all():
                        raise FloatingPointError("non-finite forecast")
                    if q is not None and not np.isfinite(q).all():
                        raise FloatingPointError("non-finite interval")
                except Exception:  # noqa: BLE001 - a baseline that fails must not stop the run
                    failures += 1
                    f = _naive(x2[:, c], horizon, season)
                    q = (np.repeat(f[:, None], len(levels), axis=1)
                         if auto and levels else None)
                cols.append(f)
                qcols.append(q)
            fcs.append(np.stack(cols, axis=1))
            qfcs.append(np.stack(qcols, axis=1) if auto and levels else None)
        if levels is None:
            result[name] = (fcs, failures)
        else:
            result[name] = (fcs, failures, qfcs if auto and levels else None)
    return result


# -- combining the network with the automatic statistical models ---------------------------------

#: what the network's forecast is combined with (``Config.combine``)
COMBINES = ("none", "mean", "best", "best_all", "guarded", "inverse", "top3")
#: the combination's interval offsets use split conformal's (n + 1)-corrected rank
#: (:func:`combination_offsets`)
COMBINE_CONSERVATIVE = True
#: ... and only widen it (chosen with the rank on the development series' validation origins,
#: out of sample: RESULTS.md, issue 16, fifth day)
COMBINE_WIDEN_ONLY = True
#: the network weights every combination is scored at on the validation origins
COMBINE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _statistical(kind: str, fcs: dict, names, weights=None) -> list:
    """Per window, the statistical side of a combination: the mean of the models ``names``'
    forecasts (``fcs``: ``{name: [array per window]}``), weighted by ``weights`` (one per name,
    summing to 1) when given."""
    n = len(fcs[names[0]])
    wts = np.full(len(names), 1.0 / len(names)) if weights is None else np.asarray(weights)
    return [sum(float(a) * np.asarray(fcs[m][k], np.float64) for a, m in zip(wts, names,
                                                                            strict=True))
            for k in range(n)]


def last_origins(w: Windows, count: int) -> np.ndarray:
    """Indices of the windows whose origin is among the ``count`` latest of their series (all
    with ``count`` 0)."""
    keep = np.ones(len(w), bool)
    if count > 0:
        for i in np.unique(w.series):
            k = np.flatnonzero(w.series == i)
            keep[k[np.argsort(w.start[k])[:-count]]] = False
    return np.flatnonzero(keep)


def combined(net, quantiles, stat, weight: float):
    """``(forecasts, quantiles)``: per window ``weight * net + (1 - weight) * stat``, and the
    network's quantiles moved by the same amount as its median (the interval's width is the
    network's, centred on the combination)."""
    w = float(weight)
    fc = [w * np.asarray(f, np.float64) + (1 - w) * np.asarray(s, np.float64)
          for f, s in zip(net, stat, strict=True)]
    if quantiles is None:
        return fc, None
    qs = [np.asarray(q, np.float64) + (c - np.asarray(f, np.float64))[..., None]
          for q, c, f in zip(quantiles, fc, net, strict=True)]
    return fc, qs


def _mase_scale(insample, season: int) -> np.ndarray:
    """``(C,)``: the in-sample seasonal-naive MAE of each column (MASE's denominator; NaN where
    it is 0 or the in-sample too short)."""
    x = np.asarray(insample, np.float64)
    x = x[:, None] if x.ndim == 1 else x
    m = season if len(x) > season else 1
    if len(x) <= m:
        return np.full(x.shape[1], np.nan)
    s = np.mean(np.abs(x[m:] - x[:-m]), axis=0)
    return np.where(s > 0, s, np.nan)


def combination_offsets(forecasts, quantiles, actuals, insamples, season: int, levels,
                        conservative: bool = False, widen_only: bool = False) -> list[float]:
    """Per level, how far (in units of each series' MASE scale) to move that quantile of the
    combined forecasts outwards so that the share of ``actuals`` beyond it, over these
    (validation) windows, is the level's tail ``a = min(q, 1 - q)``: split-conformal
    calibration of the combination's interval on the scale-free exceedances ``(y - q) / s``
    (above the median; ``(q - y) / s`` below), whose ``1 - a`` empirical quantile is the offset
    (``conservative``: the ``ceil((n + 1)(1 - a))``-th smallest, the finite-sample rank of split
    conformal prediction, Vovk et al. 2005); 0 for the median; ``widen_only``: never below 0
    (a few origins' errors, correlated along the horizon, understate the spread). Scaling by the series' own
    MASE scale pools the windows of a panel and of short series (one origin of one series
    gives ``horizon`` entries), which the network's own calibration in its scaled units
    (:func:`interval_offsets`, 50 entries at least) cannot use."""
    lv = [float(q) for q in levels]
    mid = min(range(len(lv)), key=lambda j: abs(lv[j] - 0.5))
    e = [[] for _ in lv]
    for y, q, x in zip(actuals, quantiles, insamples, strict=True):
        y, q = np.asarray(y, np.float64), np.asarray(q, np.float64)
        y, q = (y[:, None], q[:, None]) if y.ndim == 1 else (y, q)
        sc = _mase_scale(x, season)
        for j in range(len(lv)):
            if j != mid:
                d = (y - q[..., j]) if j > mid else (q[..., j] - y)
                e[j].append((d / sc).ravel())
    out = []
    for j, level in enumerate(lv):
        v = np.concatenate(e[j]) if e[j] else np.array([])
        v = np.sort(v[np.isfinite(v)])
        if j == mid or not len(v):
            out.append(0.0)
            continue
        a = min(level, 1.0 - level)
        if conservative:
            o = float(v[min(len(v), math.ceil((len(v) + 1) * (1 - a))) - 1])
        else:
            o = float(np.quantile(v, 1 - a))
        out.append(max(0.0, o) if widen_only else o)
    return out


def widened(forecasts, quantiles, insamples, season: int, offsets, levels) -> list:
    """``quantiles`` (per window ``(h, C, Q)``) with each level moved outwards by its offset
    (:func:`combination_offsets`) times the window's MASE scale (a column with no scale keeps
    its quantiles), and kept on their side of the point forecast."""
    lv = [float(q) for q in levels]
    mid = min(range(len(lv)), key=lambda j: abs(lv[j] - 0.5))
    side = np.array([-1.0 if j < mid else 1.0 if j > mid else 0.0 for j in range(len(lv))])
    off = side * np.asarray(offsets, np.float64)
    out = []
    for f, q, x in zip(forecasts, quantiles, insamples, strict=True):
        q = np.asarray(q, np.float64)
        sc = np.nan_to_num(_mase_scale(x, season))
        sc = sc if q.ndim == 3 else sc[0]
        w = q + off * (sc[..., None] if q.ndim == 3 else sc)
        f = np.asarray(f, np.float64)[..., None]
        w = np.where(side < 0, np.minimum(w, f), np.where(side > 0, np.maximum(w, f), w))
        out.append(np.sort(w, axis=-1))
    return out


def choose_combination(kind: str, weights, net, auto: dict, actuals, insamples,
                       season: int) -> dict:
    """The combination of the network's forecasts ``net`` with the statistical models'
    (``auto``: ``{name: [array per window]}``, all fitted on the points before each window's
    origin; AutoETS, AutoARIMA and AutoTheta among them) that scores the lowest MASE on these
    (validation) windows: the statistical side is the mean of AutoETS, AutoARIMA and AutoTheta
    (``kind="mean"``), the one of those three with the lowest MASE here (``"best"``) or the one
    of every model in ``auto`` with the lowest MASE here (``"best_all"``); the network's weight
    is the best of ``weights`` (ties: the larger weight). Also returns every kind's MASE at
    every weight of :data:`COMBINE_GRID`."""
    own = {m: score(actuals, f, insamples, season)["mase"] for m, f in auto.items()}

    def lowest(names):
        return min(names, key=lambda m: (not math.isfinite(own[m]), own[m]))

    best = lowest(AUTO_BASELINES)
    best_all = lowest(list(auto))
    sides = {"mean": list(AUTO_BASELINES), "best": [best], "best_all": [best_all]}
    grid = {}
    for k, names in sides.items():
        stat = _statistical(k, auto, names)
        grid[k] = {f"{w:g}": score(actuals, combined(net, None, stat, w)[0], insamples,
                                   season)["mase"] for w in sorted(set(COMBINE_GRID) |
                                                                   {float(x) for x in weights})}
    net_mase = grid["mean"]["1"]
    if kind == "guarded":
        return _guarded(weights, net, auto, actuals, insamples, season, own, grid, best,
                        best_all)
    if kind in POOLED:
        pick, models, mw = _pooled(kind, net_mase, own)
        stat = _statistical(kind, auto, models, mw)
        chosen = score(actuals, combined(net, None, stat, pick)[0], insamples, season)["mase"]
        return {"kind": kind, "models": models, "model_weights": mw, "weight": pick,
                "best_model": best, "best_all_model": best_all,
                "validation_mase": {"network": net_mase, **own, "combination": chosen},
                "grid": grid}
    scores = grid[kind]
    pick = min((float(w) for w in weights),
               key=lambda w: (not math.isfinite(scores[f"{w:g}"]), scores[f"{w:g}"], -w))
    return {"kind": kind, "models": sides[kind], "weight": pick, "best_model": best,
            "best_all_model": best_all,
            "validation_mase": {"network": scores["1"], **own, "combination": scores[f"{pick:g}"]},
            "grid": grid}


def window_mase(actuals, forecasts, insamples, season: int) -> np.ndarray:
    """``(N,)``: each window's MASE, the mean over its columns (NaN where none has a scale)."""
    out = []
    for y, f, x in zip(actuals, forecasts, insamples, strict=True):
        y, f, x = (np.asarray(a, np.float64) for a in (y, f, x))
        if y.ndim == 1:
            y, f, x = y[:, None], f[:, None], x[:, None]
        v = np.array([mase(y[:, c], f[:, c], x[:, c], season) for c in range(y.shape[1])])
        out.append(float(np.nanmean(v)) if np.isfinite(v).any() else math.nan)
    return np.asarray(out)


def _guarded(weights, net, auto, actuals, insamples, season, own, grid, best, best_all):
    """``guarded``: ``best_all``'s choice (the baseline best on validation, the network's weight
    from ``weights``) where, over the validation windows, its MASE is below the equal-weight
    combination's (half the network, half the mean of AutoETS, AutoARIMA and AutoTheta) by more
    than one standard error of their paired per-window difference; else that equal-weight
    combination. The one-standard-error rule (Breiman et al. 1984): a choice among many
    candidates on a few windows is kept only where validation separates it from the simple
    average, which forecast combination studies find hard to beat out of sample (the
    "forecast combination puzzle", Smith and Wallis 2009). Chosen on the development series'
    validation origins, out of sample (RESULTS.md, issue 16, fifth day)."""
    scores = grid["best_all"]
    w = min((float(x) for x in weights),
            key=lambda x: (not math.isfinite(scores[f"{x:g}"]), scores[f"{x:g}"], -x))
    pick = combined(net, None, _statistical("best_all", auto, [best_all]), w)[0]
    equal = combined(net, None, _statistical("mean", auto, list(AUTO_BASELINES)), 0.5)[0]
    d = (window_mase(actuals, pick, insamples, season) -
         window_mase(actuals, equal, insamples, season))
    d = d[np.isfinite(d)]
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    kept = len(d) > 0 and float(np.mean(d)) < -se
    if kept:
        models, weight, chosen = [best_all], w, scores[f"{w:g}"]
    else:
        models, weight, chosen = list(AUTO_BASELINES), 0.5, grid["mean"]["0.5"]
    return {"kind": "guarded", "models": models, "weight": weight, "best_model": best,
            "best_all_model": best_all, "kept_best_all": kept,
            "paired_difference": {"mean": float(np.mean(d)) if len(d) else None,
                                  "standard_error": se if math.isfinite(se) else None,
                                  "windows": int(len(d))},
            "validation_mase": {"network": grid["mean"]["1"], **own, "combination": chosen},
            "grid": grid}


#: combinations whose weights come from every model's validation MASE, with no grid search
POOLED = ("inverse", "top3")


def _pooled(kind: str, net_mase: float, own: dict):
    """``(network weight, statistical models, their weights within the statistical side)`` of a
    pooled combination from the validation MASE of the network (``net_mase``) and of each
    baseline (``own``): ``inverse`` weighs every model with a finite MASE by ``1 / MASE``
    (Bates and Granger 1969, with MASE for the error); ``top3`` takes the mean of the three
    models with the lowest MASE (Kourentzes et al. 2019, forecast pooling). A run whose
    statistical side gets no weight keeps the lowest-MASE baseline at weight 0."""
    pool = {"network": net_mase, **own}
    pool = {m: v for m, v in pool.items() if math.isfinite(v)}
    if kind == "inverse":
        wts = {m: 1.0 / max(v, 1e-12) for m, v in pool.items()}
    else:
        wts = {m: 1.0 for m in sorted(pool, key=pool.get)[:3]}
    if not wts:
        wts = {"network": 1.0}
    tot = sum(wts.values())
    w_net = wts.pop("network", 0.0) / tot
    if not wts:
        best = min(own, key=lambda m: (not math.isfinite(own[m]), own[m]))
        return 1.0, [best], [1.0]
    side = sum(wts.values())
    return w_net, list(wts), [v / side for v in wts.values()]


def auto_forecasts(insamples, horizon: int, season: int, names) -> dict:
    """``{name: [forecast per window]}`` of the automatic models ``names`` (falling back to
    the last value where one fails, as :func:`baseline_forecasts` does)."""
    return {n: v[0] for n, v in baseline_forecasts(insamples, horizon, season,
                                                   list(names)).items()}


def combination_describe(comb: dict | None) -> str:
    if not comb or comb["weight"] >= 1.0:
        return ""
    mw = comb.get("model_weights")
    if len(comb["models"]) == 1:
        side = comb["models"][0]
    elif mw is not None:
        side = " + ".join(f"{a:.2f} x {m}" for a, m in zip(mw, comb["models"], strict=True))
    else:
        side = "mean of " + ", ".join(comb["models"])
    return f"{comb['weight']:.2g} x network + {1 - comb['weight']:.2g} x ({side})"


# -- the model ----------------------------------------------------------------------------------

DISTRIBUTIONS = ("none", "normal", "studentt", "negbin")
_DIST_PARAMS = {"normal": 2, "studentt": 3, "negbin": 2}


class Forecaster(nn.Module):
    """A :class:`gyre.nn.Recurrent` stack and a linear head.

    ``forward(x, state=None, *, lengths=None) -> (output, state)``, ``x`` ``(B, T, C)``
    batch-first, right-padded, ``lengths`` the valid steps.

    * ``direct``: ``output`` ``(B, horizon, C_t)``, read from the output at the last valid step
      (for a bidirectional stack, the forward half there and the backward half at step 0).
    * ``recursive``: the head gives the next step of every column, ``output`` ``(B, T, C)``. In
      training every step is teacher-forced (step ``t`` predicts ``x[t + 1]``). In evaluation the
      last ``horizon - 1`` valid steps of each row are taken as the future: the model reads the
      first ``lengths - horizon + 1`` steps and then feeds back its own predictions, so
      ``output[b, lengths_b - horizon + k]`` is the genuine ``k+1``-step-ahead forecast.

    ``residual`` says what the head's output is added to: ``"last"`` the last observed value
    (the head learns the change), ``"seasonal"`` the value one season ``m`` before the forecast
    step, i.e. the seasonal-naive forecast (the last value where the history is shorter than
    ``m``), ``"none"`` nothing. An untrained model then starts at that naive forecast.
    With ``center`` the recurrent stack reads each window relative to its last observed value
    (``x - x[n_in - 1]``), which makes a global model over series of different levels
    level-free (with logs: it reads log-ratios).

    Direct only, the extras (the CLI's covariates and probabilistic forecasts):

    * ``future``: indices of input columns known in advance (calendar features, user columns).
      ``x`` then holds ``lookback + horizon`` steps: the inputs up to ``lengths`` and after them
      the ``horizon`` future steps, of which only the ``future`` columns are read (by the head,
      beside the last state). They are not centered.
    * ``n_ids`` > 0: ``x``'s last column is the series number (``0 .. n_ids - 1``; ``-1`` unknown,
      which gets the mean embedding), embedded in ``id_dim`` numbers for the head (static
      covariate); it is not an input of the recurrent stack.
    * ``quantiles``: the head gives one forecast per level, ``output`` ``(B, horizon, C_t, Q)``,
      increasing in the level by construction (the level nearest 0.5 plus or minus cumulative
      softplus steps), each with the residual base added.
    * ``distribution`` ``normal`` or ``studentt``: ``output`` ``(B, horizon, C_t, P)`` the
      location (residual base added), the scale (softplus, > 0) and for ``studentt`` the degrees
      of freedom (``2 + softplus``, so the variance is finite).
    * ``distribution="negbin"`` (counts, read unscaled): each window is divided by its level
      ``v = 1 + mean |x|`` over its input steps (per column) before the recurrence, and
      ``output`` ``(B, horizon, C_t, 2)`` is the mean ``mu = v softplus(.)`` and the dispersion
      ``alpha = softplus(.) / sqrt(v)`` (variance ``mu + alpha mu^2``), as DeepAR scales counts;
      ``residual`` does not apply.
    """

    def __init__(self, cell, n_inputs: int, target: list[int], horizon: int, hidden: int = 64,
                 layers: int = 1, dropout: float = 0.0, bidirectional: bool = False,
                 strategy: str = "direct", residual: str = "last", season: int = 1,
                 center: bool = False, *, future=(), n_ids: int = 0, id_dim: int = 0,
                 quantiles=(), distribution: str = "none") -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: got {strategy!r}, expected one of {', '.join(STRATEGIES)}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual: got {residual!r}, expected one of {', '.join(RESIDUALS)}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution: got {distribution!r}, expected one of "
                             f"{', '.join(DISTRIBUTIONS)}")
        if strategy == "recursive" and bidirectional:
            raise ValueError("bidirectional: a recursive forecaster feeds back one step at a time, "
                             "which a reverse direction cannot do; use strategy='direct'")
        if quantiles and distribution != "none":
            raise ValueError("quantiles: give quantiles or a distribution, not both")
        if strategy == "recursive" and (future or n_ids or quantiles or distribution != "none"):
            raise ValueError("strategy: covariates known in advance, series ids, quantiles and "
                             "distributions need strategy='direct'")
        self.strategy = strategy
        self.horizon = int(horizon)
        self.n_inputs = int(n_inputs)
        self.target = list(target)
        self.residual = residual
        self.season = max(1, int(season)) if residual == "seasonal" else 1
        self.center = bool(center)
        self.future = [int(c) for c in future]
        self.n_ids = int(n_ids)
        self.quantiles = [float(q) for q in quantiles]
        self.distribution = distribution
        self.rnn = Recurrent(cell, n_inputs, hidden, layers, batch_first=True, dropout=dropout,
                             bidirectional=bidirectional)
        width = self.rnn.output_size * (2 if bidirectional else 1)
        width += self.horizon * len(self.future)
        self.ids = None
        if self.n_ids:
            self.ids = nn.Embedding(self.n_ids, max(1, int(id_dim)))
            width += self.ids.embedding_dim
        self.n_params = (len(self.quantiles) or _DIST_PARAMS.get(distribution, 1))
        n_out = (horizon * len(self.target) * self.n_params if strategy == "direct"
                 else n_inputs)
        self.head = nn.Linear(width, n_out)
        mask = torch.ones(n_inputs)
        mask[self.future] = 0.0  # known-in-advance columns are read as they are
        self.register_buffer("center_mask", mask, persistent=False)

    @property
    def probabilistic(self) -> bool:
        return bool(self.quantiles) or self.distribution != "none"

    def _base(self, x: Tensor, n: Tensor, steps: int) -> Tensor:
        """``(B, steps, C)``: the naive forecast of steps ``n, n+1, ...`` from ``x[:, :n]``."""
        B = x.shape[0]
        rows = torch.arange(B)[:, None]
        k = torch.arange(steps)[None]
        m = self.season
        src = n[:, None] - m + k % m  # one season back, repeating the last season
        src = torch.where(n[:, None] >= m, src, n[:, None] - 1)  # too short: the last value
        return x[rows, src]

    # the export hook (gyre.export.onnx), direct strategy: forward is
    # export_head(rnn(*export_pre(x, lengths))[0], x, lengths); lengths (B,) int64, always given.
    # Both use torch ops only (traced into the ONNX graph), no Python branch on tensor values.
    def _level(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``(B, n_inputs)``: ``1 + mean |x|`` over each row's input steps (negbin's scale)."""
        xin = x[:, :, :self.n_inputs]
        steps = torch.arange(x.shape[1], device=x.device)[None]
        valid = (steps < lengths[:, None].to(x.device)).to(x.dtype)[..., None]
        n = lengths.to(x.device, x.dtype).clamp(min=1)[:, None]
        return 1.0 + (xin.abs() * valid).sum(1) / n

    def export_pre(self, x: Tensor, lengths: Tensor):
        """The recurrence's input: ``x``'s first ``n_inputs`` columns (not the series number),
        divided by the window's level for ``negbin``, relative to its last observed value with
        ``center`` (known-in-advance columns as they are). Steps after ``lengths`` (the future
        covariates' horizon) are padding to it."""
        xin = x[:, :, :self.n_inputs]
        if self.distribution == "negbin":
            v = self._level(x, lengths)
            div = v * self.center_mask + (1.0 - self.center_mask)  # future columns unscaled
            xin = xin / div[:, None]
        if not self.center:
            return xin, lengths
        rows = torch.arange(x.shape[0])
        return xin - xin[rows, lengths - 1][:, None] * self.center_mask, lengths

    @property
    def export_features(self) -> int:
        """Columns of ``x``: the recurrence's inputs, then the series number with ``n_ids``."""
        return self.n_inputs + (1 if self.n_ids else 0)

    def export_head(self, out: Tensor, x: Tensor, lengths: Tensor) -> Tensor:
        """The direct forecast from the recurrence's output: ``(B, horizon, C_t)``, or a
        probabilistic model's ``(B, horizon, C_t, Q or P)``."""
        B = x.shape[0]
        rows = torch.arange(B)
        O = self.rnn.output_size
        feat = out[rows, lengths - 1]
        if self.rnn.bidirectional:
            feat = torch.cat([feat[:, :O], out[:, 0, O:]], dim=1)
        parts = [feat]
        if self.future:
            # horizon zero steps appended, so lengths + k is in range for any T (the ONNX trace
            # runs on a short example); the real future steps lie within x
            pad = torch.cat([x, x[:, :1].expand(-1, self.horizon, -1) * 0.0], dim=1)
            idx = lengths[:, None].to(x.device) + torch.arange(self.horizon, device=x.device)[None]
            fut = pad[rows[:, None], idx][:, :, self.future]  # (B, horizon, F)
            parts.append(fut.reshape(B, -1))
        if self.ids is not None:
            sid = x[:, 0, -1].round()
            known = (sid >= 0) & (sid < self.n_ids)
            emb = self.ids(sid.clamp(0, self.n_ids - 1).long())
            mean = self.ids.weight.mean(0, keepdim=True).expand_as(emb)
            parts.append(torch.where(known[:, None], emb, mean))
        h = self.head(torch.cat(parts, dim=1) if len(parts) > 1 else feat)
        C_t = len(self.target)
        xin = x[:, :, :self.n_inputs]
        base = (self._base(xin, lengths, self.horizon)[:, :, self.target]
                if self.residual != "none" else None)
        if not self.probabilistic:
            pred = h.view(B, self.horizon, C_t)
            return pred + base if base is not None else pred
        raw = h.view(B, self.horizon, C_t, self.n_params)
        if self.distribution == "negbin":
            v = self._level(x, lengths)[:, self.target][:, None]  # (B, 1, C_t)
            mu = v * nn.functional.softplus(raw[..., 0]) + 1e-4
            alpha = nn.functional.softplus(raw[..., 1]) / v.sqrt() + 1e-4
            return torch.stack([mu, alpha], dim=-1)
        if self.quantiles:
            mid = min(range(len(self.quantiles)), key=lambda j: abs(self.quantiles[j] - 0.5))
            center = raw[..., mid:mid + 1]
            up = center + torch.cumsum(nn.functional.softplus(raw[..., mid + 1:]), dim=-1)
            below = nn.functional.softplus(raw[..., :mid])  # reverse cumulative sum, no flip
            down = center - (below.sum(-1, keepdim=True) - torch.cumsum(below, dim=-1) + below)
            q = torch.cat([down, center, up], dim=-1)
            return q + base[..., None] if base is not None else q
        loc = raw[..., 0] + (base if base is not None else 0.0)
        scale = nn.functional.softplus(raw[..., 1]) + 1e-4
        params = [loc, scale]
        if self.distribution == "studentt":
            params.append(2.0 + nn.functional.softplus(raw[..., 2]))
        return torch.stack(params, dim=-1)

    def export_unsupported(self) -> str | None:
        """Why the model does not export with its head (None: it does)."""
        if self.strategy != "direct":
            return ("strategy='recursive' feeds its own forecasts back one step at a time; "
                    "only strategy='direct' runs export with its head")
        return None

    @property
    def stream_window(self) -> int | None:
        """Steps of input the head reads for the forecast from the latest step: one season
        for the seasonal residual, else the latest step."""
        return self.season if self.residual == "seasonal" else 1

    def stream_unsupported(self) -> str | None:
        """Why this model cannot be served step by step (None: it can): every reason at once,
        with the training options that avoid them (a default run has ``center`` and
        ``calendar`` on, so it is refused for both)."""
        if self.strategy != "direct":
            return "strategy='recursive' is not served; train with strategy='direct'"
        why, flags = [], []
        if self.center:
            why.append("center=True reads every step relative to the last one, so each new "
                       "step changes all earlier inputs")
            flags.append("--no-center")
        if self.future:
            why.append("the head reads covariates of the forecast steps (calendar features or "
                       "future_covariates), which a stream of past steps does not carry")
            flags.append("--no-calendar and no --future-covariates")
        if self.n_ids:
            why.append("id_embedding reads the series number as a column the recurrence does "
                       "not take, which a stream's steps do not carry")
            flags.append("--id-embedding 0")
        if self.distribution == "negbin":
            why.append("negbin scales each window by its level over all its steps, which "
                       "changes with every new step")
            flags.append("no --distribution negbin")
        if not why:
            return None
        return ("; ".join(why) + "; serve a run trained with " + ", ".join(flags)
                + " (gyre predict forecasts any run)")

    def forward(self, x: Tensor, state=None, *, lengths: Tensor | None = None):
        B, T, _ = x.shape
        if lengths is None:
            lengths = torch.full((B,), T - (self.horizon if self.future else 0),
                                 dtype=torch.int64)
        lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        rows = torch.arange(B)
        n_last = lengths - 1 if self.strategy == "direct" else lengths - self.horizon
        if (n_last < 0).any():
            raise ValueError(f"lengths: a recursive forecast of horizon {self.horizon} needs "
                             f"lengths >= {self.horizon}, got {int(lengths.min())}")
        if self.strategy == "direct":
            xr, _ = self.export_pre(x, lengths)
            out, state = self.rnn(xr, state, lengths=lengths)
            return self.export_head(out, x, lengths), state
        ref = x[rows, n_last][:, None] * self.center_mask if self.center else 0.0  # (B, 1, C)
        if self.training:
            out, state = self.rnn(x - ref, state, lengths=lengths)
            pred = self.head(out)
            if self.residual != "none":  # the base of step t+1's forecast, for every t
                t1 = torch.arange(1, T + 1)
                src = torch.where(t1 >= self.season, t1 - self.season, t1 - 1)
                pred = pred + x[:, src]
            return pred, state
        # evaluation: read the inputs, then feed the forecasts back
        n_in = lengths - (self.horizon - 1)
        out, state = self.rnn(x - ref, state, lengths=n_in)
        pred = self.head(out)
        seq = x.clone()  # the inputs, then the forecasts fed back in place of the future
        if self.residual != "none":
            t1 = torch.arange(1, T + 1)
            src = torch.where(t1 >= self.season, t1 - self.season, t1 - 1)
            pred = pred + x[:, src]
        p = pred[rows, n_in - 1]
        for k in range(1, self.horizon):
            seq[rows, n_in - 1 + k] = p
            y, state = self.rnn.step(p - ref[:, 0] if self.center else p, state)
            p = self.head(y)
            if self.residual != "none":
                p = p + self._base(seq, n_in + k, 1)[:, 0]
            pred[rows, n_in - 1 + k] = p
        return pred, state


def pinball_loss(quantiles):
    """``loss(output (B, h, C, Q), y (B, h, C))``: the mean pinball (quantile) loss
    ``max(q (y - f), (q - 1)(y - f))`` over levels and the entries where ``y`` is finite."""
    qs = torch.tensor([float(q) for q in quantiles])

    def loss(output: Tensor, y: Tensor) -> Tensor:
        mask = torch.isfinite(y)
        d = y[mask][:, None] - output[mask]  # (n, Q)
        q = qs.to(output.device, output.dtype)
        return torch.maximum(q * d, (q - 1) * d).mean()

    return loss


def nll_loss(distribution: str):
    """``loss(output (B, h, C, P), y)``: the mean negative log-likelihood of the finite targets
    under the predicted normal, Student-t or negative binomial distributions."""
    def loss(output: Tensor, y: Tensor) -> Tensor:
        mask = torch.isfinite(y)
        p = output[mask]
        if distribution == "normal":
            d = torch.distributions.Normal(p[:, 0], p[:, 1])
        elif distribution == "negbin":  # mean mu, dispersion alpha: r = 1 / alpha
            r = 1.0 / p[:, 1]
            d = torch.distributions.NegativeBinomial(r, logits=p[:, 0].log() - r.log(),
                                                     validate_args=False)
        else:
            d = torch.distributions.StudentT(p[:, 2], p[:, 0], p[:, 1])
        return -d.log_prob(y[mask]).mean()

    return loss


def output_quantiles(model: Forecaster, out: np.ndarray, levels) -> np.ndarray:
    """``(N, h, C, Q)`` quantiles at ``levels`` from a probabilistic model's scaled output."""
    from scipy import stats

    if model.quantiles:
        want = [model.quantiles.index(q) for q in levels]
        return out[..., want]
    lv = np.asarray(levels, np.float64)
    if model.distribution == "normal":
        return out[..., :1] + out[..., 1:2] * stats.norm.ppf(lv)
    if model.distribution == "negbin":
        r = 1.0 / out[..., 1:2]
        return stats.nbinom.ppf(lv, r, r / (r + out[..., :1]))
    return out[..., :1] + out[..., 1:2] * stats.t.ppf(lv, out[..., 2:3])


def point_of(model: Forecaster, out: np.ndarray) -> np.ndarray:
    """``(N, h, C)`` the point forecast: the median (the level nearest 0.5, or the location)."""
    if not model.probabilistic:
        return out
    if model.quantiles:
        mid = min(range(len(model.quantiles)), key=lambda j: abs(model.quantiles[j] - 0.5))
        return out[..., mid]
    return out[..., 0]


def masked_loss(kind: str):
    """``loss(output, y)``: mean of the element loss over the entries where ``y`` is finite
    (NaN marks steps with no target: padding, and teacher-forced steps at validation)."""
    if kind not in LOSSES:
        raise ValueError(f"loss: got {kind!r}, expected one of {', '.join(LOSSES)}")

    def loss(output: Tensor, y: Tensor) -> Tensor:
        mask = torch.isfinite(y)
        d = output[mask] - y[mask]
        if kind == "mse":
            return (d * d).mean()
        if kind == "mae":
            return d.abs().mean()
        return nn.functional.huber_loss(d, torch.zeros_like(d), delta=1.0)

    return loss


# -- windows -> Trainer items -------------------------------------------------------------------

class WindowData(torch.utils.data.Dataset):
    """Trainer items from :class:`Windows`: ``(x, y, length)`` float32 tensors.

    ``direct``: ``x`` the input steps ``(lookback, C)``, ``y`` ``(horizon, C_t)``; with
    ``future`` columns (known in advance) ``x`` is ``(lookback + horizon, C)``: after the inputs
    the ``horizon`` future steps, every other column zeroed there, so no target enters ``x``.
    ``recursive``: ``x`` the inputs then the targets but the last, ``(lookback + horizon - 1, C)``,
    and ``y`` the next step of every column, NaN where no target (padding; with ``teacher=False``
    everything but the ``horizon`` forecast steps, which is how validation and test score it).
    """

    def __init__(self, w: Windows, strategy: str, teacher: bool = True, future=()) -> None:
        h = w.y.shape[1]
        if strategy == "direct":
            if future:
                seq = w.seq.copy()
                steps = np.arange(seq.shape[1])
                after = steps[None] >= w.n_in[:, None]
                keep = np.zeros(seq.shape[2], bool)
                keep[list(future)] = True
                keep[-1] = True  # the series number (constant) when there is one
                seq[after[..., None] & ~keep[None, None]] = 0.0
                self.x = torch.as_tensor(seq, dtype=torch.float32)
            else:
                self.x = torch.as_tensor(w.inputs(), dtype=torch.float32)
            self.y = torch.as_tensor(w.y, dtype=torch.float32)
            self.lengths = torch.as_tensor(w.n_in, dtype=torch.int64)
        else:
            seq = torch.as_tensor(w.seq, dtype=torch.float32)
            self.x = seq[:, :-1].clone()
            y = seq[:, 1:].clone()
            self.lengths = torch.as_tensor(w.n_in + h - 1, dtype=torch.int64)
            steps = torch.arange(y.shape[1])
            lo = (self.lengths - h) if not teacher else torch.zeros_like(self.lengths)
            keep = (steps[None] >= lo[:, None]) & (steps[None] < self.lengths[:, None])
            y[~keep] = math.nan
            self.x[steps[None].expand(len(seq), -1) >= self.lengths[:, None]] = 0.0
            self.y = y
        self.strategy = strategy
        self.horizon = h

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.lengths[i]


def collate(items) -> dict[str, Tensor]:
    xs, ys, ls = zip(*items, strict=True)
    return {"x": torch.stack(xs), "y": torch.stack(ys), "lengths": torch.stack(ls)}


def forecast_windows(model: Forecaster, w: Windows, batch_size: int = 512, run=None) -> np.ndarray:
    """Scaled outputs for the windows' inputs (their targets unused): ``(N, horizon, C_t)``
    forecasts, or a probabilistic model's ``(N, horizon, C_t, Q or P)``. ``run``: what computes
    ``model``'s forward (default ``model`` itself; e.g. an :class:`gyre.export.OnnxModel` of
    its exported file)."""
    data = WindowData(w, model.strategy, teacher=False, future=model.future)
    model.eval()
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            b = collate([data[i] for i in range(s, min(s + batch_size, len(data)))])
            x, lengths = b["x"].to(device), b["lengths"]
            if model.strategy == "recursive":
                # the future part of x must not be seen: zero it (the model never reads it)
                steps = torch.arange(x.shape[1])
                future = steps[None] >= (lengths - model.horizon + 1)[:, None]
                x = x.masked_fill(future[..., None].to(device), 0.0)
            out, _ = (run or model)(x, lengths=lengths)
            out = out.float().cpu()
            if model.strategy == "recursive":
                n_in = lengths - (model.horizon - 1)
                idx = (n_in - 1)[:, None] + torch.arange(model.horizon)[None]
                out = torch.gather(out, 1, idx[..., None].expand(-1, -1, out.shape[2]))
                out = out[:, :, model.target]
            outs.append(out)
    return torch.cat(outs).numpy().astype(np.float64)


def interval_offsets(quantiles: np.ndarray, y: np.ndarray, levels, *,
                     median: bool = False) -> list[float]:
    """Per level, how far to move that quantile outwards (negative: inwards) so that, on these
    forecasts (``quantiles`` ``(N, h, C, Q)`` of targets ``y`` ``(N, h, C)``, in the model's
    scaled units), the share of ``y`` beyond it is the level's tail ``a = min(q, 1 - q)``.

    Conformalized quantile regression (Romano et al. 2019), one level at a time: with the
    exceedance ``e = y - q`` above the median (``q - y`` below), the offset is the ``1 - a``
    empirical quantile of ``e`` over the ``n`` finite entries (not the conservative
    ``(n + 1)``-corrected rank: the aim is nominal coverage, not a lower bound on it); for the
    median 0, or with ``median`` the median of ``y - q`` (a shift that removes the forecasts'
    median bias); all 0 where fewer than 50 entries are given (too few to calibrate on)."""
    lv = [float(q) for q in levels]
    mid = min(range(len(lv)), key=lambda j: abs(lv[j] - 0.5))
    q = np.asarray(quantiles, np.float64)
    y = np.asarray(y, np.float64)
    out = []
    for j, level in enumerate(lv):
        ok = np.isfinite(y)
        n = int(ok.sum())
        if n < 50 or (j == mid and not median):
            out.append(0.0)
            continue
        if j == mid:
            out.append(float(np.median(y[ok] - q[..., j][ok])))
            continue
        e = (y - q[..., j]) if j > mid else (q[..., j] - y)
        a = min(level, 1.0 - level)
        out.append(float(np.quantile(e[ok], 1.0 - a)))
    return out


def calibrated(quantiles: np.ndarray, offsets, levels) -> np.ndarray:
    """``quantiles`` ``(..., Q)`` with each level moved outwards by its offset
    (:func:`interval_offsets`: up above the median, down below it; the median shifted by its
    own), sorted again along the levels so they stay increasing."""
    lv = [float(q) for q in levels]
    mid = min(range(len(lv)), key=lambda j: abs(lv[j] - 0.5))
    side = np.array([-1.0 if j < mid else 1.0 for j in range(len(lv))])
    return np.sort(quantiles + side * np.asarray(offsets, np.float64), axis=-1)


def ensemble_forecast(models, w: Windows, levels, run=None, factors=None):
    """``(point (N, h, C_t), quantiles (N, h, C_t, Q) or None)`` in the scaled space: each
    model's median (or point) forecast and quantiles at ``levels``, averaged over the models
    (quantile averaging; the members share one scaler), then moved by the per-level
    ``factors`` (offsets, :func:`calibrated`) when given. ``run``: what computes the one
    model's forward (see :func:`forecast_windows`)."""
    if run is not None and len(models) != 1:
        raise ValueError(f"run: computes one model's forward; got {len(models)} models")
    points, qs = [], []
    for model in models:
        out = forecast_windows(model, w, run=run)
        points.append(point_of(model, out))
        if model.probabilistic:
            qs.append(output_quantiles(model, out, levels))
    q = np.mean(qs, axis=0) if qs else None
    point = np.mean(points, axis=0)
    if q is not None and factors is not None:
        mid = min(range(len(levels)), key=lambda j: abs(float(levels[j]) - 0.5))
        point = point + factors[mid]  # the median's shift (0 unless debiased)
        q = calibrated(q, factors, levels)
        if models[0].distribution == "negbin":
            q = np.maximum(q, 0.0)  # counts
    return point, q


def prepare(ss: SeriesSet, horizon: int, lookback: int, min_lookback: int, scaler: Scaler,
            val_fraction: float, backtest: int = 1, extra=None):
    """Split, fit the scaler on each series' training part, and cut the windows.

    The test part is the last ``backtest * horizon`` points; its windows are the ``backtest``
    origins ``horizon`` apart (each reading only the points before it). ``extra``: per series
    ``(T_i, E)`` columns appended unscaled after the scaled ones (calendar features, series
    number). Returns ``(scaled_series, train_windows, val_windows | None, test_windows,
    val_start, test_start)``.
    """
    val_start, test_start = split_points(ss.lengths, horizon, val_fraction, backtest)
    scaler.fit(ss.series, val_start)
    scaled = [scaler.transform(s, i) for i, s in enumerate(ss.series)]
    if extra is not None:
        scaled = [np.concatenate([z, e], axis=1) for z, e in zip(scaled, extra, strict=True)]
    train_w = make_windows(scaled, lookback, horizon, [(0, v) for v in val_start],
                           target=ss.target, min_lookback=min_lookback)
    val_w = None
    if val_fraction > 0:
        val_w = make_windows(scaled, lookback, horizon, list(zip(val_start, test_start,
                                                                 strict=True)),
                             target=ss.target, min_lookback=1)
    test_w = make_windows(scaled, lookback, horizon, [(t, t + backtest * horizon)
                                                      for t in test_start],
                          target=ss.target, min_lookback=1, stride=horizon)
    return scaled, train_w, val_w, test_w, val_start, test_start


# -- the task -----------------------------------------------------------------------------------

@dataclass
class Config(TaskConfig):
    """``gyre train forecast`` options, beside the common ones (:class:`TaskConfig`).

    The defaults are the recipe chosen on validation origins over the development series
    (airline, M1 yearly, co2, sunspots, uschange; RESULTS.md): a direct LSTM 1x64 on windows
    relative to their last value, logs of positive data, per-series ``diff`` scaling, quantiles
    0.1/0.5/0.9 calibrated on the validation origins, an ensemble of 3 seeds, each retrained at
    the test origin on all the points before it for the epochs its validation chose; its
    forecast combined with the statistical models as validation guards it (``combine``).

    Attributes:
        data: a built-in data set (``airline``, ``m1_yearly``, ``co2``, ``sunspots``,
            ``uschange``) or a CSV path (see :func:`gyre.data.forecasting.load_series`: a date
            column found by content, long panels ``unique_id, ds, y, ...``, wide tables).
        target: the column(s) to forecast (empty: ``y`` for a panel, else the data set's, all
            columns for a CSV); the other columns are inputs only (past covariates).
        date_column: the CSV column holding time stamps ("" = found by content).
        id_column: the series id column of a long panel ("" = ``unique_id`` and the like).
        layout: ``auto``, ``long`` (a panel with an id column) or ``wide`` (a series per column).
        horizon: steps to forecast (0 = the data set's or the frequency's: yearly 6, quarterly
            8, monthly 12, weekly 13, daily 14, hourly 48, finer: one day).
        season: the seasonal period ``m`` for seasonal naive, Holt-Winters, SARIMA and MASE
            (0 = the data set's: 12 monthly, 4 quarterly, 52 weekly, 7 daily, 24 hourly, 48
            half-hourly, 1 yearly; from the dates for a CSV).
        lookback: input steps per window (0 = ``2 * max(horizon, season)``, shortened to half
            the room before the validation part when a single series is too short for 8
            windows of it).
        min_lookback: the fewest input steps a training window may have when a series'
            history is shorter than ``lookback`` (0 = ``lookback`` for one series, ``horizon`` for
            many, so short series still give windows).
        strategy: ``direct`` (all ``horizon`` steps at once) or ``recursive`` (one step, fed
            back; forecasts every column).
        residual: what the model's output is added to: ``last`` (the last observed value),
            ``seasonal`` (the value one season back, i.e. seasonal naive) or ``none``.
        center: the recurrent stack reads each window relative to its last observed value.
        scaler: ``standard``, ``minmax``, ``mean``, ``diff`` (mean absolute one-step change) or
            ``none``, per series and column, fitted on the training part only.
        transform: ``none``, ``log`` (positive data), ``log1p`` (zeros, counts) or ``auto``
            (``log`` when every value of every series is positive, else ``none``) before
            scaling.
        log: take logs of the data before scaling (positive data only); the same as
            ``transform="log"``.
        loss: ``mse``, ``mae`` or ``huber`` on the scaled values (point forecasts).
        quantiles: levels to forecast, e.g. ``0.1,0.5,0.9`` (pinball loss, increasing by
            construction; 0.5 is added when missing: it is the point forecast); ``auto``:
            0.1, 0.5, 0.9 for a direct model without a distribution, a point forecast
            otherwise; ``none``: a point forecast (``loss``).
        distribution: ``normal``, ``studentt`` or ``negbin`` (counts >= 0, read as they
            are: ``scaler`` does not apply and ``transform`` must be ``none`` or ``auto``; the
            model scales each window by its level itself): forecast a distribution
            (likelihood loss), scored at ``quantiles`` (default 0.1, 0.5, 0.9).
        backtest: test origins (rolling origin, expanding window, ``horizon`` apart): the test
            part is the last ``backtest * horizon`` points; every baseline is refitted at every
            origin on the points before it; the model is trained once before the validation
            part (each origin forecasts from the actual points before it), or with ``refit``
            retrained at every origin.
        refit: retrain the model (every ensemble member, its scaler too) at every test origin
            on all the points before that origin, for the epochs its validation run chose, and
            score the test part with these models; the saved model (evaluate, predict, export)
            stays the one trained before the validation part.
        calibrate: move each quantile (in the scaled units) by the offset that makes the
            validation origins' share of actuals beyond it nominal (conformalized quantile
            regression; saved in ``calibration.json`` and used by evaluate and predict); needs
            a validation part and a probabilistic model.
        debias: with ``calibrate``, shift the median (the point forecast) by the median of
            the validation origins' errors too.
        ensemble: train this many seeds (``seed``, ``seed + 1``, ...) and average their
            forecasts and quantiles (1: one model, which export and serving need).
        calendar: feed calendar features of the dates (month, quarter, week, day of week, hour:
            sine and cosine), known for the forecast steps too (direct strategy).
        future_covariates: input columns whose future values are known and read for the
            forecast steps; ``gyre predict`` then needs the next ``horizon`` rows of the
            series in its CSV, with those columns filled and the targets blank.
        id_embedding: > 0 embeds each series' id in this many numbers (a static covariate of a
            panel; 0 = off).
        baselines: which of naive, seasonal_naive, holt_winters, arima, auto_ets, auto_arima,
            auto_theta to fit ("none": none).
        combine: the forecast is ``w * network + (1 - w) * statistical``, a forecast
            combination: ``mean`` (the statistical side is the mean of statsforecast's AutoETS,
            AutoARIMA and AutoTheta, each fitted per series at every origin on the points before
            it), ``best`` (the one of them with the lowest validation MASE) or ``none`` (the
            network alone), ``best_all`` (the one with the lowest validation MASE of every
            baseline gyre fits: naive, seasonal naive, Holt-Winters, SARIMA and the three),
            ``guarded`` (the default: ``best_all``'s choice where it beats the equal-weight
            combination, half the network and half the mean of the three, by one standard
            error over the validation windows, else that equal-weight combination), ``inverse``
            (every model weighted by 1 / its validation MASE), ``top3`` (the mean of the three
            models best on validation). With ``calibrate``, the combination's quantiles are
            widened by split-conformal offsets on its validation residuals in MASE units
            (:func:`combination_offsets`; saved in combination.json).
            The network's quantiles are moved with its median. ``w`` is chosen
            per run on the validation origins (lowest MASE; needs a validation part, else the
            network alone); metrics.json's ``network`` holds the network alone, ``combination``
            the choice. Needs the ``forecast`` extra (statsforecast).
        combine_weights: the network weights ``w`` the combination may take.
        combine_origins: the combination is chosen on (and its baselines fitted at) the latest
            this many validation origins of each series (0: all). Every baseline is refitted at
            each origin it forecasts from: on long daily series (20 validation origins) that,
            not the network, was ~97% of a run's CPU time.
        val_fraction: > 0 holds out, before the test part, the last
            ``max(horizon, round(val_fraction * n))`` points of each series for validation
            (early stopping, best epoch; ``validation`` in metrics.json scores the origins
            ``horizon`` apart in it); 0 = none. Dropped (and said so) where it leaves no
            training window.
    """

    data: str = "airline"
    epochs: int = 60
    patience: int = 15
    lr: float = 3e-3
    target: list[str] = field(default_factory=list)
    date_column: str = ""
    id_column: str = ""
    layout: str = "auto"
    horizon: int = 0
    season: int = 0
    lookback: int = 0
    min_lookback: int = 0
    strategy: str = "direct"
    residual: str = "last"
    center: bool = True
    scaler: str = "diff"
    log: bool = False
    transform: str = "auto"
    loss: str = "mse"
    quantiles: list[str] = field(default_factory=lambda: ["auto"])
    distribution: str = "none"
    backtest: int = 1
    refit: bool = True
    calibrate: bool = True
    debias: bool = False
    ensemble: int = 3
    calendar: bool = True
    future_covariates: list[str] = field(default_factory=list)
    id_embedding: int = 0
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    combine: str = "guarded"
    combine_weights: list[str] = field(default_factory=lambda: ["0.25", "0.5", "0.75", "1"])
    combine_origins: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: got {self.strategy!r}, expected one of "
                             f"{', '.join(STRATEGIES)}")
        if self.strategy == "recursive" and self.bidirectional:
            raise ValueError("bidirectional: a recursive forecaster feeds back one step at a "
                             "time, which a reverse direction cannot do; use strategy='direct'")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual: got {self.residual!r}, expected one of "
                             f"{', '.join(RESIDUALS)}")
        if self.scaler not in SCALERS:
            raise ValueError(f"scaler: got {self.scaler!r}, expected one of {', '.join(SCALERS)}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform: got {self.transform!r}, expected one of "
                             f"{', '.join(TRANSFORMS)}")
        if self.log and self.transform not in ("none", "log", "auto"):
            raise ValueError(f"log: --log means transform 'log'; got transform "
                             f"{self.transform!r} too")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: got {self.loss!r}, expected one of {', '.join(LOSSES)}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution: got {self.distribution!r}, expected one of "
                             f"{', '.join(DISTRIBUTIONS)}")
        if self.distribution == "negbin" and self.value_transform() not in ("none", "auto"):
            raise ValueError(f"distribution: negbin models counts on their own scale (each "
                             f"window is scaled by its level inside the model); got transform "
                             f"{self.value_transform()!r}, expected 'none' (or 'auto')")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: got {self.layout!r}, expected one of {', '.join(LAYOUTS)}")
        self.levels()  # validates quantiles
        if self._given_quantiles() and self.distribution != "none":
            raise ValueError("quantiles: give quantiles or a distribution, not both (a "
                             "distribution is scored at quantiles 0.1, 0.5, 0.9)")
        if (self._given_quantiles() or self.distribution != "none" or self.future_covariates
                or self.id_embedding) and self.strategy == "recursive":
            raise ValueError("strategy: quantiles, distributions, future_covariates and "
                             "id_embedding need strategy 'direct'")
        for name in ("horizon", "season", "lookback", "min_lookback", "id_embedding"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= 0 "
                                 "(0 = the default)")
        for name in ("backtest", "ensemble"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= 1")
        if self.lookback and self.min_lookback > self.lookback:
            raise ValueError(f"min_lookback: got {self.min_lookback}, expected at most "
                             f"lookback={self.lookback}")
        bl = [b for b in self.baselines if b != "none"]
        bad = [b for b in bl if b not in BASELINES]
        if bad:
            raise ValueError(f"baselines: got {bad[0]!r}, expected names from "
                             f"{', '.join(BASELINES)} (or 'none')")
        if not self.data:
            raise ValueError("data: empty; expected a data set name or a CSV path")
        if self.combine not in COMBINES:
            raise ValueError(f"combine: got {self.combine!r}, expected one of "
                             f"{', '.join(COMBINES)}")
        self.weights()  # validates combine_weights
        if not isinstance(self.combine_origins, int) or self.combine_origins < 0:
            raise ValueError(f"combine_origins: got {self.combine_origins!r}, expected a whole "
                             "number >= 0 (0: every validation origin)")

    def weights(self) -> list[float]:
        """The network weights a combination may take (chosen on the validation origins)."""
        try:
            w = sorted({float(x) for x in self.combine_weights})
        except ValueError:
            w = []
        if not w or not all(0 <= x <= 1 for x in w):
            raise ValueError(f"combine_weights: got {self.combine_weights!r}, expected numbers "
                             "in [0, 1], e.g. 0.25,0.5,0.75,1")
        return w

    def value_transform(self) -> str:
        return "log" if self.log else self.transform

    def data_scaler(self) -> Scaler:
        """The unfitted per-series scaler (negbin reads counts as they are: none, no
        transform)."""
        if self.distribution == "negbin":
            return Scaler("none")
        return Scaler(self.scaler, value_transform=self.value_transform())

    def _given_quantiles(self) -> list[str]:
        """The levels given as numbers (not ``auto`` / ``none`` / empty)."""
        q = [str(v).strip().lower() for v in self.quantiles]
        return [] if q in ([], ["auto"], ["none"]) else list(self.quantiles)

    def quantile_head(self) -> bool:
        """Whether the model forecasts quantiles: levels given, or ``auto`` for a direct model
        without a distribution."""
        auto = [str(v).strip().lower() for v in self.quantiles] == ["auto"]
        return bool(self._given_quantiles()) or (auto and self.strategy == "direct"
                                                 and self.distribution == "none")

    def levels(self) -> list[float]:
        """The quantile levels forecast (sorted, 0.5 included): the given ones, 0.1, 0.5, 0.9
        for ``auto`` (a direct model) or a distribution; empty for a point forecaster."""
        if not self._given_quantiles():
            return [0.1, 0.5, 0.9] if (self.quantile_head() or
                                       self.distribution != "none") else []
        try:
            lv = sorted({float(q) for q in self.quantiles} | {0.5})
        except ValueError:
            raise ValueError(f"quantiles: got {self.quantiles!r}, expected numbers in (0, 1), "
                             "e.g. 0.1,0.5,0.9") from None
        if not all(0 < q < 1 for q in lv):
            raise ValueError(f"quantiles: got {self.quantiles!r}, expected numbers in (0, 1)")
        return lv


#: the quantile levels every run scores the baselines' intervals at when the model has none
DEFAULT_LEVELS = [0.1, 0.5, 0.9]


class _Setup:
    """Everything derived from a config and its data: the numbers a model is rebuilt from."""

    def __init__(self, config: Config, ss: SeriesSet, saved: dict | None = None) -> None:
        self.ss = ss
        self.notes: list[str] = []
        self.horizon = int(saved["horizon"]) if saved else (config.horizon or ss.horizon)
        self.season = int(saved["season"]) if saved else (config.season or ss.season)
        self.backtest = config.backtest
        self.val_fraction = float(saved.get("val_fraction", config.val_fraction)) if saved \
            else config.val_fraction
        h, K = self.horizon, self.backtest
        many = len(ss.series) > 1
        short = int(ss.lengths.min())
        if not saved:
            need = K * h + 2 if many else (K + 1) * h + 1
            if short < need:
                what = "the shortest series" if many else "the series"
                raise ValueError(
                    f"horizon: {what} has {short} points; a horizon of {h} with {K} test "
                    f"origin(s) needs at least {need} ({K} x {h} test points and "
                    + ("2 before them" if many else f"one training window of 1 input and {h} "
                       "targets before them") + "); use a smaller --horizon or --backtest")
        default = 2 * max(h, self.season)
        if saved:
            self.lookback, self.min_lookback = int(saved["lookback"]), int(saved["min_lookback"])
        else:
            v, _ = split_points(ss.lengths, h, self.val_fraction, K)
            room = int(v.max()) - h  # input steps the longest series has before its validation
            if self.val_fraction > 0 and room < 1:
                self.val_fraction = 0.0
                v, _ = split_points(ss.lengths, h, 0.0, K)
                room = int(v.max()) - h
                self.notes.append(f"no validation part: {short} points leave no training window "
                                  "before one (fixed epochs, last epoch kept)")
            self.lookback = config.lookback or default
            if not config.lookback and not many and room < default + 7:
                self.lookback = max(1, min(default, room // 2))
                self.notes.append(f"lookback {self.lookback}: the series is too short for 8 "
                                  f"training windows of {default} inputs")
            self.min_lookback = config.min_lookback or (min(h, self.lookback) if many
                                                        else self.lookback)
            self.min_lookback = min(self.min_lookback, self.lookback)
        # a recursive model forecasts every column, and is scored on the target ones
        self.model_target = (list(range(ss.num_columns)) if config.strategy == "recursive"
                             else list(ss.target))
        if short < h + 2:
            raise ValueError(f"horizon: {h} leaves the shortest series ({short} points) "
                             f"fewer than 2 points before its test part; use a smaller horizon")
        self.freq = saved.get("freq", ss.freq) if saved else ss.freq
        self.n_calendar = (calendar_width(self.freq) if config.calendar and
                           config.strategy == "direct" else 0)
        missing = [c for c in config.future_covariates if c not in ss.columns]
        if missing:
            raise ValueError(f"future_covariates: {missing[0]!r} is not a column of "
                             f"{ss.name}; columns are {list(ss.columns)}")
        user_future = [ss.columns.index(c) for c in config.future_covariates]
        clash = [ss.columns[c] for c in user_future if c in ss.target]
        if clash:
            raise ValueError(f"future_covariates: {clash[0]!r} is a target column; a column "
                             "whose future is known is not forecast")
        C = ss.num_columns
        self.future = user_future + list(range(C, C + self.n_calendar))
        self.n_inputs = C + self.n_calendar
        self.train_ids = list(saved.get("ids", ss.ids)) if saved else list(ss.ids)
        self.n_ids = (len(self.train_ids) if config.id_embedding and
                      (len(self.train_ids) > 1) else 0)
        self.levels = config.levels()
        if config.distribution == "negbin":
            for sid, x in zip(ss.ids, ss.series, strict=True):
                if (x[:, list(ss.target)] < 0).any():
                    raise ValueError(f"distribution: negbin models counts >= 0; series {sid!r} "
                                     f"of {ss.name} has a negative target value")
        self.extra_state: dict | None = None  # what train saves in every checkpoint

    def extra(self, ss: SeriesSet, future_steps: int = 0):
        """Per series the unscaled columns after the data's: calendar features of its dates
        (and of ``future_steps`` dates after them) and its series number (-1: an id the model
        was not trained on)."""
        if not self.n_calendar and not self.n_ids:
            return None
        out = []
        for i, idx in enumerate(ss.index):
            cols = []
            if self.n_calendar:
                dates = idx
                if future_steps:
                    fut = (ss.future_index[i] if ss.future_index else
                           future_index(idx, self.freq, future_steps))
                    dates = np.concatenate([idx, fut])
                cols.append(calendar_features(dates, self.freq))
            if self.n_ids:
                sid = self.train_ids.index(ss.ids[i]) if ss.ids[i] in self.train_ids else -1
                cols.append(np.full((len(idx) + future_steps, 1), float(sid)))
            out.append(np.concatenate(cols, axis=1))
        return out

    def model(self, config: Config) -> Forecaster:
        return Forecaster(config.cell, self.n_inputs, self.model_target, self.horizon,
                          config.hidden, config.layers, config.dropout, config.bidirectional,
                          config.strategy, config.residual, self.season, config.center,
                          future=self.future, n_ids=self.n_ids, id_dim=config.id_embedding,
                          quantiles=self.levels if config.quantile_head() else (),
                          distribution=config.distribution)

    def loss(self, config: Config):
        if config.quantile_head():
            return pinball_loss(self.levels)
        if config.distribution != "none":
            return nll_loss(config.distribution)
        return masked_loss(config.loss)

    def saved(self) -> dict:
        return {"horizon": self.horizon, "season": self.season, "lookback": self.lookback,
                "min_lookback": self.min_lookback, "val_fraction": self.val_fraction,
                "freq": self.freq, "ids": self.train_ids}

    def describe(self, config: Config) -> str:
        extras = []
        if config.quantile_head():
            extras.append("quantiles " + ",".join(f"{q:g}" for q in self.levels))
        elif config.distribution != "none":
            extras.append(config.distribution)
        if self.n_calendar:
            extras.append("calendar")
        if self.n_ids:
            extras.append(f"id embedding {config.id_embedding}")
        if config.ensemble > 1:
            extras.append(f"ensemble of {config.ensemble}")
        return (f"{config.cell} x{config.layers} h{config.hidden} "
                f"{'bi ' if config.bidirectional else ''}{config.strategy} lookback "
                f"{self.lookback} horizon {self.horizon}"
                + ("".join(f", {e}" for e in extras)))


def _load(config: Config, data: str | None = None, future_rows: int = 0) -> SeriesSet:
    return load_series(data or config.data, target=config.target or None,
                       date_column=config.date_column or None,
                       id_column=config.id_column or None, layout=config.layout,
                       future_rows=future_rows)


def _original(setup: _Setup, models, scaler: Scaler, w: Windows, levels=(), factors=None,
              run=None):
    """``(forecasts, quantiles or None)`` of the windows on the original scale, one per window
    (series ``w.series``, origin ``w.start``). ``run``: see :func:`ensemble_forecast`."""
    z, zq = ensemble_forecast(models, w, levels, run=run, factors=factors)
    cols = list(setup.ss.target)
    pos = [models[0].target.index(c) for c in cols]
    forecasts = [scaler.inverse(z[k][:, pos], i, cols) for k, i in enumerate(w.series)]
    quantiles = (None if zq is None else
                 [scaler.inverse(zq[k][:, pos], i, cols) for k, i in enumerate(w.series)])
    return forecasts, quantiles


def _score_windows(setup: _Setup, w: Windows, forecasts, quantiles, levels=()):
    """``(actuals, in-samples (everything before each origin), metrics)`` of forecasts of the
    windows (plus the probabilistic metrics when ``quantiles`` is not None)."""
    ss, cols = setup.ss, list(setup.ss.target)
    actuals, insamples = [], []
    for k, i in enumerate(w.series):
        t = int(w.start[k])
        actuals.append(ss.series[i][t:t + setup.horizon][:, cols])
        insamples.append(ss.series[i][:t][:, cols])
    metrics = score(actuals, forecasts, insamples, setup.season)
    if quantiles is not None:
        metrics.update(prob_score(actuals, quantiles, insamples, setup.season, levels))
    return actuals, insamples, metrics


def _scored(setup: _Setup, models, scaler: Scaler, w: Windows, levels=(), factors=None,
            run=None):
    """Forecasts of the windows on the original scale (one per series and origin ``w.start``),
    their quantiles (or None), actuals, in-samples (everything before each origin) and the
    metrics (plus the probabilistic ones for a probabilistic model)."""
    forecasts, quantiles = _original(setup, models, scaler, w, levels, factors, run)
    actuals, insamples, metrics = _score_windows(setup, w, forecasts, quantiles, levels)
    return forecasts, quantiles, actuals, insamples, metrics


def _calibration(out: Path):
    """The saved per-level interval offsets of a run (None: not calibrated)."""
    path = Path(out) / "calibration.json"
    if not path.is_file():
        return None
    import json
    return json.loads(path.read_text())["offsets"]


def _fit_members(config: Config, setup: _Setup, train_data, val_data, epochs=None, *,
                 out: Path | None = None, resume: bool = False):
    """Train ``config.ensemble`` members (seeds ``seed``, ``seed + 1``, ...): with ``out``
    each in its member directory with checkpoints (member 0 writing config.toml at its start);
    without, in memory for ``epochs[k]`` epochs each, no validation. Returns ``(models, fits)``,
    or None when training was interrupted."""
    from ..train import Trainer, seed_everything

    models, fits = [], []
    for k in range(config.ensemble):
        seed = config.seed + k
        seed_everything(seed)
        model = setup.model(config)
        if out is None:
            tconf = config.train_config(seed=seed, epochs=max(1, int(epochs[k])), patience=0,
                                        progress=False, tensorboard=False)
            # rank 0 alone (the other processes of a distributed run have returned by now)
            trainer = Trainer(model, setup.loss(config), tconf, collate=collate,
                              distributed=False)
            fit = trainer.fit(train_data, None)
        else:
            tconf = config.train_config(seed=seed, **({} if val_data is not None
                                                     else {"patience": 0}))
            member = _member_dir(out, k)
            member.mkdir(parents=True, exist_ok=True)
            # member 0's start writes config.toml (a resumed run: once its checkpoint was checked)
            trainer = Trainer(model, setup.loss(config), tconf, collate=collate,
                              out_dir=member, extra=setup.extra_state,
                              callback=base.config_writer(config, out) if k == 0 else None)
            again = resume and (k == 0 or trainer.checkpoint_path.is_file())
            fit = trainer.fit(train_data, val_data, resume=again)
        if fit["interrupted"]:
            return None
        models.append(trainer.model)
        fits.append(fit)
    return models, fits


def refit_forecasts(config: Config, setup: _Setup, test_w: Windows, test_start, epochs,
                    transform: str, factors=None):
    """Forecasts of the test windows (``(forecasts, quantiles or None)``, original scale, in
    ``test_w``'s order) from models retrained at each origin: for the ``k``-th origin of every
    series, a scaler fitted on and a fresh ensemble trained for ``epochs[m]`` epochs on the
    points before it (targets before it; nothing at or after the origin is read), which then
    forecast from it."""
    ss, h = setup.ss, setup.horizon
    done = {}
    for k in range(setup.backtest):
        ends = np.asarray(test_start) + k * h
        scaler = Scaler(config.data_scaler().kind, value_transform=transform)
        scaler.fit(ss.series, ends)
        scaled = [scaler.transform(s[:e + h], i) for i, (s, e) in enumerate(zip(ss.series, ends,
                                                                            strict=True))]
        extra = setup.extra(ss)
        if extra is not None:
            scaled = [np.concatenate([z, e[:len(z)]], axis=1) for z, e in zip(scaled, extra,
                                                                              strict=True)]
        # the targets at and after the origin are not read: NaN there fails loudly if they were
        cut = [np.where(np.arange(len(z))[:, None] >= e, np.nan, z) for z, e in zip(scaled, ends,
                                                                                    strict=True)]
        tr = make_windows(cut, setup.lookback, h, [(0, int(e)) for e in ends], target=ss.target,
                          min_lookback=setup.min_lookback)
        te = make_windows(scaled, setup.lookback, h, [(int(e), int(e) + h) for e in ends],
                          target=ss.target, min_lookback=1)
        models, _ = _fit_members(config, setup, WindowData(tr, config.strategy, teacher=True,
                                                          future=setup.future), None, epochs)
        f, q = _original(setup, models, scaler, te, setup.levels, factors)
        for j, i in enumerate(te.series):
            done[(int(i), int(te.start[j]))] = (f[j], None if q is None else q[j])
    keys = [(int(i), int(t)) for i, t in zip(test_w.series, test_w.start, strict=True)]
    forecasts = [done[key][0] for key in keys]
    quantiles = None if setup.levels == [] else [done[key][1] for key in keys]
    return forecasts, quantiles


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


def _member_dir(out: Path, k: int) -> Path:
    return out if k == 0 else out / f"member-{k}"


def train(config: Config, *, resume: bool = False) -> dict:
    """Train a forecaster on ``config.data`` and score it beside the baselines; see the
    :mod:`gyre.tasks` contract for what lands in ``config.out`` (an ensemble's further members
    in ``member-1``, ``member-2``... below it)."""
    import time

    if not isinstance(config, Config):
        raise TypeError(f"config: got {type(config).__name__}, expected forecast.Config")
    ss = _load(config)
    setup = _Setup(config, ss)
    if resume:
        base.check_resume(config, config.out)
    scaler = config.data_scaler()
    scaled, train_w, val_w, test_w, val_start, test_start = prepare(
        ss, setup.horizon, setup.lookback, setup.min_lookback, scaler, setup.val_fraction,
        setup.backtest, setup.extra(ss))
    if len(train_w) == 0:
        raise ValueError(f"lookback: no series is long enough for one training window of "
                         f"min_lookback={setup.min_lookback} inputs and horizon={setup.horizon} "
                         f"targets before its validation/test part; lower lookback, "
                         f"min_lookback, horizon or val_fraction")
    out = base.resolve_out(config, "forecast")
    has_val = val_w is not None and len(val_w) > 0
    setup.extra_state = {"scaler": scaler.state(), "data": ss.name, **setup.saved()}
    train_data = WindowData(train_w, config.strategy, teacher=True, future=setup.future)
    val_data = (WindowData(val_w, config.strategy, teacher=False, future=setup.future)
                if has_val else None)
    t0 = time.perf_counter()
    fitted = _fit_members(config, setup, train_data, val_data, out=out, resume=resume)
    if fitted is None:
        return {"interrupted": True, "out": str(out)}
    models, fits = fitted
    if base.other_rank(out) is not None:
        return base.other_rank(out)
    levels = setup.levels or DEFAULT_LEVELS
    validation, factors, comb, validation_network = None, None, None, None
    if has_val:
        # forecasts from the validation part's origins, horizon apart (counted back from its
        # end): comparable across configurations, for choosing one without the test part
        val_origins = make_windows(scaled, setup.lookback, setup.horizon,
                                   list(zip(val_start, test_start, strict=True)),
                                   target=ss.target, min_lookback=1, stride=setup.horizon)
        if config.calibrate and setup.levels:
            _, vq = ensemble_forecast(models, val_origins, setup.levels)
            factors = interval_offsets(vq, val_origins.y, setup.levels,
                                       median=config.debias)
        vf, vq, vact, vins, validation = _scored(setup, models, scaler, val_origins,
                                                 setup.levels, factors)
        if config.combine != "none":
            keep = last_origins(val_origins, config.combine_origins)
            vw = Windows(*(getattr(val_origins, a)[keep] for a in ("seq", "n_in", "y", "series",
                                                                    "start")))
            vf, vact, vins = ([v[k] for k in keep] for v in (vf, vact, vins))
            vq = None if vq is None else [vq[k] for k in keep]
            vauto = auto_forecasts(vins, setup.horizon, setup.season, BASELINES)
            comb = choose_combination(config.combine, config.weights(), vf, vauto, vact, vins,
                                      setup.season)
            validation_network = _score_windows(setup, vw, vf, vq, setup.levels)[2]
            cf, cq = combined(vf, vq, _statistical(comb["kind"], vauto, comb["models"],
                                                   comb.get("model_weights")), comb["weight"])
            if config.calibrate and cq is not None:
                # the combination's interval, calibrated on these origins' residuals (in-sample
                # for the combination's own choice, as the network's calibration is for its
                # early stopping)
                comb["levels"] = setup.levels
                comb["interval_offsets"] = combination_offsets(
                    cf, cq, vact, vins, setup.season, setup.levels,
                    conservative=COMBINE_CONSERVATIVE, widen_only=COMBINE_WIDEN_ONLY)
                cq = widened(cf, cq, vins, setup.season, comb["interval_offsets"], setup.levels)
            validation = _score_windows(setup, vw, cf, cq, setup.levels)[2]
    elif config.combine != "none":
        setup.notes.append("combine: no validation part to choose the weight on; the network "
                           "alone")
    _write_combination(out, comb)
    calibration = out / "calibration.json"
    if factors is not None:
        base.write_json({"levels": setup.levels, "offsets": factors}, calibration)
    elif calibration.is_file():
        calibration.unlink()
    if config.refit:
        forecasts, quantiles = refit_forecasts(config, setup, test_w, test_start,
                                               [f["best_epoch"] or f["epochs_run"] for f in fits],
                                               scaler.value_transform, factors)
    else:
        forecasts, quantiles = _original(setup, models, scaler, test_w, setup.levels, factors)
    seconds = time.perf_counter() - t0
    actuals, insamples, test = _score_windows(setup, test_w, forecasts, quantiles, setup.levels)
    names = [b for b in config.baselines if b != "none"]
    bl = baseline_forecasts(insamples, setup.horizon, setup.season, names, levels=levels)
    baselines = {}
    for name, (fcs, failures, qfcs) in bl.items():
        baselines[name] = score(actuals, fcs, insamples, setup.season)
        if qfcs is not None:
            baselines[name].update(prob_score(actuals, qfcs, insamples, setup.season, levels))
        if failures:
            baselines[name]["fallbacks"] = failures
    network = None
    if comb is not None:
        network = test
        auto = {n: bl[n][0] for n in bl}
        auto.update(auto_forecasts(insamples, setup.horizon, setup.season,
                                   [n for n in BASELINES if n not in bl]))
        # every side and weight on the test part too, for the record (chosen on validation)
        comb["test_grid"] = {
            k: {f"{w:g}": {m: v for m, v in _score_windows(
                setup, test_w, *combined(forecasts, quantiles, _statistical(k, auto, names), w),
                setup.levels)[2].items() if m in ("mase", "coverage_80")}
                for w in COMBINE_GRID}
            for k, names in (("mean", list(AUTO_BASELINES)), ("best", [comb["best_model"]]),
                             ("best_all", [comb["best_all_model"]]))}
        forecasts, quantiles = combined(forecasts, quantiles,
                                        _statistical(comb["kind"], auto, comb["models"],
                                                     comb.get("model_weights")),
                                        comb["weight"])
        if quantiles is not None and comb.get("interval_offsets") is not None:
            quantiles = widened(forecasts, quantiles, insamples, setup.season,
                                comb["interval_offsets"], setup.levels)
        test = _score_windows(setup, test_w, forecasts, quantiles, setup.levels)[2]
    fit = fits[0]
    metrics = {
        "task": "forecast", "data": ss.name, "out": str(out),
        "model": setup.describe(config) + (f"; forecast {combination_describe(comb)}"
                                           if combination_describe(comb) else ""),
        "test": test, "validation": validation, "baselines": baselines,
        "network": None if comb is None else {"test": network, "validation": validation_network},
        "combination": None if comb is None else {**comb,
                                                  "forecast": combination_describe(comb)
                                                  or "the network alone (weight 1)"},
        "train": {"epochs_run": fit["epochs_run"], "best_epoch": fit["best_epoch"],
                  "stopped_early": fit["stopped_early"], "seconds": round(seconds, 2),
                  "train_windows": len(train_w), "val_windows": len(val_w) if has_val else 0,
                  "series": len(ss.series), "horizon": setup.horizon, "season": setup.season,
                  "frequency": ss.freq or "unknown", "lookback": setup.lookback,
                  "transform": scaler.value_transform,
                  "test_origins": setup.backtest, "test_forecasts": len(test_w),
                  "refit": config.refit,
                  "val_origins": len(val_origins) if has_val else 0,
                  "ensemble": config.ensemble,
                  "best_epochs": [f["best_epoch"] for f in fits],
                  "interval_offsets": factors,
                  "parameters": sum(p.numel() for p in models[0].parameters())},
        "note": "; ".join([n for n in [ss.note, *setup.notes] if n]),
    }
    if ss.name in PUBLISHED and setup.horizon == ss.horizon:
        metrics["published"] = PUBLISHED[ss.name]
    metrics = _jsonable(metrics)
    base.write_json(metrics, out / "metrics.json")
    base.plot_history(fit["history"], out / "loss.png", f"forecast {ss.name}: loss")
    last = _last_origin(test_w)
    plot_forecasts(ss, [forecasts[k] for k in last],
                   {n: [v[0][k] for k in last] for n, v in bl.items()},
                   [int(test_w.start[k]) for k in last], out / "forecast.png",
                   setup.describe(config),
                   quantiles=None if quantiles is None else [quantiles[k] for k in last],
                   levels=setup.levels, series=[int(test_w.series[k]) for k in last])
    return metrics


def _write_combination(out: Path, comb: dict | None) -> None:
    path = Path(out) / "combination.json"
    if comb is not None:
        base.write_json({k: comb.get(k) for k in ("kind", "models", "weight", "model_weights",
                                                  "interval_offsets", "levels")}, path)
    elif path.is_file():
        path.unlink()


def _combination(out_dir) -> dict | None:
    """A run's saved combination (None: the network alone)."""
    path = Path(out_dir) / "combination.json"
    if not path.is_file():
        return None
    import json
    comb = json.loads(path.read_text())
    return (None if comb["weight"] >= 1.0 and comb.get("interval_offsets") is None
            else comb)


def _combine_saved(comb, forecasts, quantiles, insamples, horizon: int, season: int):
    """Forecasts (and quantiles) of windows whose in-samples are ``insamples`` combined as a
    run's saved ``comb`` says (its statistical models fitted on each in-sample)."""
    if comb is None:
        return forecasts, quantiles
    stat = _statistical(comb["kind"], auto_forecasts(insamples, horizon, season, comb["models"]),
                        comb["models"], comb.get("model_weights"))
    forecasts, quantiles = combined(forecasts, quantiles, stat, comb["weight"])
    if quantiles is not None and comb.get("interval_offsets") is not None:
        quantiles = widened(forecasts, quantiles, insamples, season, comb["interval_offsets"],
                            comb["levels"])
    return forecasts, quantiles


def _last_origin(w: Windows) -> list[int]:
    """Per series, the index of its latest window."""
    last: dict[int, int] = {}
    for k, i in enumerate(w.series):
        if int(i) not in last or w.start[k] > w.start[last[int(i)]]:
            last[int(i)] = k
    return [last[i] for i in sorted(last)]


def _rebuild(out_dir):
    from ..train import load_checkpoint

    out = Path(out_dir)
    config = base.load_config(Config, out / "config.toml")
    ckpts = [load_checkpoint(_member_dir(out, k) / "checkpoint") for k in range(config.ensemble)]
    return config, ckpts


def _restored_model(config: Config, setup: _Setup, ckpt: dict) -> Forecaster:
    model = setup.model(config)
    best = ckpt.get("best") or {}
    state = best.get("model") if best.get("model") is not None else ckpt["model"]
    model.load_state_dict(state)
    model.eval()
    return model


def _saved(ckpt: dict) -> dict:
    extra = dict(ckpt["extra"])
    # runs written before these keys existed: what their _Setup derived
    extra.setdefault("min_lookback", extra["lookback"])
    return extra


def _check_columns(setup: _Setup, ckpt: dict, data: str, name: str = "data") -> None:
    trained = len(ckpt["extra"]["scaler"]["loc"][0])
    if setup.ss.num_columns != trained:
        raise ValueError(f"{name}: the model reads {trained} column(s), {data} has "
                         f"{setup.ss.num_columns}")


def evaluate(out_dir, data: str | None = None) -> dict:
    """The test metrics of the run in ``out_dir`` (its own data, or ``data``: the test part is
    the last ``backtest * horizon`` points of each series there; the run's scaler is kept for
    its own data, refitted on the new data's training part otherwise). The saved model is
    scored: the one trained before the validation part (a ``refit`` run's per-origin models
    are not kept, so its metrics.json test figures can differ)."""
    config, ckpts = _rebuild(out_dir)
    ss = _load(config, data)
    setup = _Setup(config, ss, saved=_saved(ckpts[0]))
    _check_columns(setup, ckpts[0], data or config.data)
    models = [_restored_model(config, setup, c) for c in ckpts]
    scaler = _fresh_scaler(ckpts[0]["extra"])
    _, _, _, test_w, _, _ = prepare(ss, setup.horizon, setup.lookback, setup.min_lookback,
                                    scaler, setup.val_fraction, setup.backtest, setup.extra(ss))
    if data is None:
        scaler = Scaler.from_state(ckpts[0]["extra"]["scaler"])
    f, q, _, insamples, test = _scored(setup, models, scaler, test_w, setup.levels,
                                       _calibration(out_dir))
    comb = _combination(out_dir)
    if comb is not None:
        f, q = _combine_saved(comb, f, q, insamples, setup.horizon, setup.season)
        test = _score_windows(setup, test_w, f, q, setup.levels)[2]
    return {"test": _jsonable(test)}


def _fresh_scaler(extra: dict) -> Scaler:
    """An unfitted scaler of the run's kind with the value transform the run used (what
    ``transform="auto"`` chose on its own data, not chosen again on new data)."""
    saved = Scaler.from_state(extra["scaler"])
    return Scaler(saved.kind, value_transform=saved.value_transform)


def score_test(out_dir, run=None) -> tuple[dict, float]:
    """``(test metrics, seconds of the forward over the test windows)`` of a one-model run's
    network (``gyre quantize``; a combined run's statistical side left out: what quantization
    changes is the network); ``run``: what computes the model's forward instead (e.g. an
    :class:`gyre.export.OnnxModel` of its export)."""
    config, model, extra = load_run(out_dir)
    setup = _Setup(config, _load(config), saved=extra)
    scaler = _fresh_scaler(extra)
    _, _, _, test_w, _, _ = prepare(setup.ss, setup.horizon, setup.lookback, setup.min_lookback,
                                    scaler, setup.val_fraction, setup.backtest,
                                    setup.extra(setup.ss))
    forecast_windows(model, test_w, run=run)  # warm-up (a compiled kernel's first call)
    start = time.perf_counter()
    forecast_windows(model, test_w, run=run)
    seconds = time.perf_counter() - start
    *_, test = _scored(setup, [model], Scaler.from_state(extra["scaler"]), test_w, setup.levels,
                       _calibration(Path(out_dir)), run)
    return _jsonable(test), seconds


def build_like(config: Config, extra: dict) -> Forecaster:
    """The model of a run with checkpoint ``extra`` as ``config`` describes it (e.g. a smaller
    ``hidden`` for structured pruning), untrained."""
    return _Setup(config, _load(config), saved=extra).model(config)


def finetune(model: Forecaster, config: Config, extra: dict) -> None:
    """Train ``model`` (e.g. a pruned one) for ``config.epochs`` on the run's training windows
    into the new run directory ``config.out`` (config.toml and checkpoint, as gyre train writes
    them), keeping ``extra`` (scaler, shapes); validation as the run had it."""
    from ..train import Trainer, seed_everything
    ss = _load(config)
    setup = _Setup(config, ss, saved=extra)
    scaler = _fresh_scaler(extra)
    _, train_w, val_w, *_ = prepare(ss, setup.horizon, setup.lookback, setup.min_lookback,
                                    scaler, setup.val_fraction, setup.backtest, setup.extra(ss))
    has_val = val_w is not None and len(val_w) > 0
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base.write_config(config, out / "config.toml")
    seed_everything(config.seed)
    trainer = Trainer(model, setup.loss(config),
                      config.train_config(seed=config.seed, **({} if has_val else {"patience": 0})),
                      collate=collate, out_dir=out, extra=extra)
    fit = trainer.fit(WindowData(train_w, config.strategy, teacher=True, future=setup.future),
                      WindowData(val_w, config.strategy, teacher=False, future=setup.future)
                      if has_val else None)
    if fit["interrupted"]:
        raise KeyboardInterrupt


def load_run(out_dir) -> tuple[Config, Forecaster, dict]:
    """``(config, model with the restored weights, checkpoint extra)`` from a run directory
    (export and serving take one model: an ensemble run is refused)."""
    out = Path(out_dir)
    if not (out / "config.toml").is_file():
        raise FileNotFoundError(f"out_dir: {str(out)!r} has no config.toml; expected a directory "
                                "written by gyre train forecast")
    config, ckpts = _rebuild(out_dir)
    extra = _saved(ckpts[0])
    setup = _Setup(config, _load(config), saved=extra)
    model = _restored_model(config, setup, ckpts[0])
    if len(ckpts) > 1:
        stream = model.stream_unsupported()
        raise ValueError(f"out_dir: {str(out)!r} is an ensemble of {len(ckpts)} models, which "
                         "export and serving (one model) do not cover; train with ensemble=1 "
                         "(--ensemble 1)" + (f"; gyre serve also needs a model it can step: "
                                             f"{stream}" if stream else ""))
    return config, model, extra


def stream_io(model: Forecaster, extra: dict):
    """``(input, output)`` transforms for serving a run step by step. A run on one series
    takes and gives values in that series' units (its fitted scaler both ways; quantiles
    each mapped back); a run on many series, each with its own scale, takes and gives the
    model's scaled units (None, None)."""
    scaler = Scaler.from_state(extra["scaler"])
    if len(scaler.loc) != 1:
        return None, None
    if model.distribution != "none":
        raise ValueError(f"serve: a {model.distribution} distribution's parameters are not "
                         "values in the series' units; serve a point or quantile run, or a "
                         "run on many series (scaled units)")
    loc = torch.as_tensor(scaler.loc[0], dtype=torch.float64)
    scale = torch.as_tensor(scaler.scale[0], dtype=torch.float64)
    cols = list(model.target)
    q = bool(model.quantiles)

    def inp(x):  # (B, C) raw -> scaled
        v = torch.as_tensor(scaler._pre(x.double().numpy()))
        return ((v - loc) / scale).float()

    def out(z):  # (B, horizon, C_t[, Q]) scaled -> raw
        s_, l_ = (scale[cols][:, None], loc[cols][:, None]) if q else (scale[cols], loc[cols])
        v = z.double() * s_ + l_
        return torch.as_tensor(scaler._post(v.numpy())).float()

    return inp, out


def predict(out_dir, data_path: str | None = None, *, runtime: str = "torch") -> list[dict]:
    """Forecasts of the next ``horizon`` steps after the end of every series in ``data_path``
    (default: the run's data): ``{"series", "step", "column", "forecast"}`` rows, plus ``date``
    when the series has dates and ``q<level>`` per quantile level of a probabilistic model.
    A model with ``future_covariates`` reads their values from the last ``horizon`` rows of each
    series in ``data_path`` (targets blank there). ``runtime="onnxruntime"`` runs the run's
    exported ``model.onnx`` (``gyre export``)."""
    run = base.runtime_model(out_dir, runtime)
    config, ckpts = _rebuild(out_dir)
    if run is not None and len(ckpts) > 1:
        raise ValueError(f"runtime: {runtime!r} runs one exported model; this run is an "
                         f"ensemble of {len(ckpts)}; use runtime='torch'")
    saved = _saved(ckpts[0])
    h = int(saved["horizon"])
    if config.future_covariates:
        if data_path is None:
            raise ValueError(f"data_path: this model reads future values of "
                             f"{', '.join(config.future_covariates)}; give a CSV whose last {h} "
                             "rows per series hold them (targets blank)")
        ss = _load(config, data_path, future_rows=h)
    else:
        ss = _load(config, data_path)
    setup = _Setup(config, ss, saved=saved)
    _check_columns(setup, ckpts[0], data_path or config.data, "data_path")
    models = [_restored_model(config, setup, c) for c in ckpts]
    if data_path is None:
        scaler = Scaler.from_state(ckpts[0]["extra"]["scaler"])
    else:
        scaler = _fresh_scaler(ckpts[0]["extra"]).fit(ss.series, ss.lengths)
    padded = []
    for i, s in enumerate(ss.series):
        fut = np.zeros((h, ss.num_columns))
        if ss.future:
            fut = np.asarray(ss.future[i], np.float64).copy()
            cols = [ss.columns.index(c) for c in config.future_covariates]
            if not np.isfinite(fut[:, cols]).all():
                raise ValueError(f"data_path: series {ss.ids[i]!r} leaves a future value of "
                                 f"{', '.join(config.future_covariates)} blank in its last {h} "
                                 "rows")
            fut[~np.isfinite(fut)] = 1.0  # blank targets: never read (zeroed in the windows)
            fut = scaler.transform(np.where(np.isfinite(fut), fut, 1.0), i)
        padded.append(np.concatenate([scaler.transform(s, i), fut]))
    extra = setup.extra(ss, future_steps=h)
    if extra is not None:
        padded = [np.concatenate([z, e], axis=1) for z, e in zip(padded, extra, strict=True)]
    w = make_windows(padded, setup.lookback, h, [(len(s), len(s) + h) for s in ss.series],
                     target=models[0].target, min_lookback=1)
    z, zq = ensemble_forecast(models, w, setup.levels, run=run, factors=_calibration(out_dir))
    pos = [models[0].target.index(c) for c in ss.target]
    fs = [scaler.inverse(z[k][:, pos], i, ss.target) for k, i in enumerate(w.series)]
    qs = (None if zq is None else
          [scaler.inverse(zq[k][:, pos], i, ss.target) for k, i in enumerate(w.series)])
    fs, qs = _combine_saved(_combination(out_dir), fs, qs,
                            [ss.series[i][:, list(ss.target)] for i in w.series], h, setup.season)
    rows = []
    for k, i in enumerate(w.series):
        f = fs[k]
        q = None if qs is None else qs[k]
        idx = ss.index[i]
        dates = None
        if np.issubdtype(np.asarray(idx).dtype, np.datetime64):
            dates = (ss.future_index[i] if ss.future_index else
                     future_index(idx, setup.freq, h))
        for step in range(h):
            for j, c in enumerate(ss.target):
                row = {"series": ss.ids[i], "step": step + 1, "column": ss.columns[c]}
                if dates is not None:
                    row["date"] = str(np.datetime_as_string(np.asarray(dates)[step], unit="s"))
                row["forecast"] = float(f[step, j])
                if q is not None:
                    for lv, v in zip(setup.levels, q[step, j], strict=True):
                        row[f"q{lv:g}"] = float(v)
                rows.append(row)
    return rows


def explain_inputs(out_dir, data: str | None = None, samples: int = 8):
    """The explain seam (:mod:`gyre.explain`): the input windows of the first ``samples`` test
    forecasts (scaled as in training), and the mean scaled (point) forecast of the first target
    column over the horizon to explain (member 0 of an ensemble)."""
    from ..explain import Inputs
    config, ckpts = _rebuild(out_dir)
    if config.strategy != "direct":
        raise ValueError("explain: forecast runs with strategy='direct' are supported (a "
                         "recursive forecast feeds its own outputs back, which attributions "
                         "over the inputs do not cover)")
    ss = _load(config, data)
    setup = _Setup(config, ss, saved=_saved(ckpts[0]))
    _check_columns(setup, ckpts[0], data or config.data)
    model = _restored_model(config, setup, ckpts[0])
    scaler = _fresh_scaler(ckpts[0]["extra"])
    *_, test_w, _, _ = prepare(ss, setup.horizon, setup.lookback, setup.min_lookback, scaler,
                               setup.val_fraction, setup.backtest, setup.extra(ss))
    wd = WindowData(test_w, "direct", teacher=False, future=setup.future)
    n = min(samples, len(wd))
    batch = collate([wd[i] for i in range(n)])
    col = model.target.index(ss.target[0])
    if model.quantiles:
        mid = min(range(len(model.quantiles)), key=lambda j: abs(model.quantiles[j] - 0.5))

    def forward(x, lengths):
        y = model(x, lengths=lengths)[0]
        if model.probabilistic:  # the median level, or the location
            y = y[..., mid] if model.quantiles else y[..., 0]
        return y[:, :, col].mean(1)

    names = [ss.columns[c] for c in range(ss.num_columns)]
    names += [f"calendar{j}" for j in range(setup.n_calendar)]
    if setup.n_ids:
        names.append("series_id")
    title = f"forecast {ss.name}: {setup.describe(config)}"
    return Inputs(model, forward, batch["x"], batch["lengths"], title, names,
                  meta={"explained": f"mean scaled forecast of {ss.columns[ss.target[0]]!r} "
                        f"over {setup.horizon} steps", "data": ss.name})


def plot_forecasts(ss: SeriesSet, forecasts, baselines: dict, test_start, path, title: str,
                   max_series: int = 6, *, quantiles=None, levels=(), series=None) -> None:
    """Forecast against actuals: the history before the test part, the actual test part, the
    model's forecast (its central intervals shaded) and each baseline's, for the first target
    column of up to ``max_series`` series (``series[k]``: which series forecast ``k`` is of)."""
    plt = base.pyplot()
    n = min(len(forecasts), max_series)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.8 * n), squeeze=False)
    c = ss.target[0]
    pairs = interval_pairs(levels) if quantiles is not None else []
    for k in range(n):
        ax = axes[k, 0]
        i = k if series is None else series[k]
        t = int(test_start[k])
        h = len(forecasts[k])
        idx, y = ss.index[i], ss.series[i][:, c]
        lo = max(0, t - 4 * h)
        ax.plot(idx[lo:t + h], y[lo:t + h], color="black", lw=1.2, label="actual")
        for lo_i, hi_i, L in sorted(pairs, key=lambda p: -p[2]):
            ax.fill_between(idx[t:t + h], quantiles[k][:, 0, lo_i], quantiles[k][:, 0, hi_i],
                            color="C3", alpha=0.15 + 0.15 * (L < 80), lw=0, label=f"{L}%")
        ax.plot(idx[t:t + h], forecasts[k][:, 0], color="C3", lw=1.8, label="model")
        for j, (name, fcs) in enumerate(baselines.items()):
            ax.plot(idx[t:t + h], fcs[k][:, 0], lw=1, ls="--", color=f"C{j}", label=name)
        ax.axvline(idx[t], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{ss.ids[i]} - {ss.columns[c]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
