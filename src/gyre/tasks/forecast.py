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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.forecasting import (
    SCALERS,
    Scaler,
    SeriesSet,
    Windows,
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


# -- baselines (statsmodels, statsforecast) ----------------------------------------------------------------------

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


# -- the model ----------------------------------------------------------------------------------

DISTRIBUTIONS = ("none", "normal", "studentt")
_DIST_PARAMS = {"normal": 2, "studentt": 3}


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

    def _direct(self, x: Tensor, state, lengths: Tensor, ref):
        B = x.shape[0]
        rows = torch.arange(B)
        n_in = self.n_inputs
        xin = x[:, :, :n_in]
        steps = xin.shape[1] if not self.future else int(lengths.max())
        out, state = self.rnn((xin - ref)[:, :steps], state, lengths=lengths)
        O = self.rnn.output_size
        feat = out[rows, lengths - 1]
        if self.rnn.bidirectional:
            feat = torch.cat([feat[:, :O], out[:, 0, O:]], dim=1)
        parts = [feat]
        if self.future:
            idx = (lengths[:, None] + torch.arange(self.horizon)[None]).to(x.device)
            fut = x[rows[:, None], idx][:, :, self.future]  # (B, horizon, F)
            parts.append(fut.reshape(B, -1))
        if self.ids is not None:
            sid = x[:, 0, -1].round().long()
            known = (sid >= 0) & (sid < self.n_ids)
            emb = self.ids(sid.clamp(0, self.n_ids - 1))
            mean = self.ids.weight.mean(0, keepdim=True).expand_as(emb)
            parts.append(torch.where(known[:, None], emb, mean))
        h = self.head(torch.cat(parts, dim=1) if len(parts) > 1 else feat)
        C_t = len(self.target)
        base = (self._base(xin, lengths, self.horizon)[:, :, self.target]
                if self.residual != "none" else None)
        if not self.probabilistic:
            pred = h.view(B, self.horizon, C_t)
            return (pred + base if base is not None else pred), state
        raw = h.view(B, self.horizon, C_t, self.n_params)
        if self.quantiles:
            mid = min(range(len(self.quantiles)), key=lambda j: abs(self.quantiles[j] - 0.5))
            center = raw[..., mid:mid + 1]
            up = center + torch.cumsum(nn.functional.softplus(raw[..., mid + 1:]), dim=-1)
            down = center - torch.cumsum(nn.functional.softplus(raw[..., :mid]).flip(-1),
                                         dim=-1).flip(-1)
            q = torch.cat([down, center, up], dim=-1)
            return (q + base[..., None] if base is not None else q), state
        loc = raw[..., 0] + (base if base is not None else 0.0)
        scale = nn.functional.softplus(raw[..., 1]) + 1e-4
        params = [loc, scale]
        if self.distribution == "studentt":
            params.append(2.0 + nn.functional.softplus(raw[..., 2]))
        return torch.stack(params, dim=-1), state

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
        if self.center:
            ref = x[rows, n_last][:, None, :self.n_inputs] * self.center_mask  # (B, 1, C)
        else:
            ref = 0.0
        if self.strategy == "direct":
            return self._direct(x, state, lengths, ref)
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
    under the predicted normal or Student-t distributions."""
    def loss(output: Tensor, y: Tensor) -> Tensor:
        mask = torch.isfinite(y)
        p = output[mask]
        if distribution == "normal":
            d = torch.distributions.Normal(p[:, 0], p[:, 1])
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

    ``direct``: ``x`` the input steps ``(lookback, C)``, ``y`` ``(horizon, C_t)``.
    ``recursive``: ``x`` the inputs then the targets but the last, ``(lookback + horizon - 1, C)``,
    and ``y`` the next step of every column, NaN where no target (padding; with ``teacher=False``
    everything but the ``horizon`` forecast steps, which is how validation and test score it).
    """

    def __init__(self, w: Windows, strategy: str, teacher: bool = True) -> None:
        h = w.y.shape[1]
        if strategy == "direct":
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


def forecast_windows(model: Forecaster, w: Windows, batch_size: int = 512) -> np.ndarray:
    """Scaled forecasts ``(N, horizon, C_t)`` for the windows' inputs (their targets unused)."""
    data = WindowData(w, model.strategy, teacher=False)
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
            out, _ = model(x, lengths=lengths)
            out = out.float().cpu()
            if model.strategy == "recursive":
                n_in = lengths - (model.horizon - 1)
                idx = (n_in - 1)[:, None] + torch.arange(model.horizon)[None]
                out = torch.gather(out, 1, idx[..., None].expand(-1, -1, out.shape[2]))
                out = out[:, :, model.target]
            outs.append(out)
    return torch.cat(outs).numpy().astype(np.float64)


def prepare(ss: SeriesSet, horizon: int, lookback: int, min_lookback: int, scaler: Scaler,
            val_fraction: float):
    """Split, fit the scaler on each series' training part, and cut the windows.

    Returns ``(scaled_series, train_windows, val_windows | None, test_windows, val_start,
    test_start)``.
    """
    val_start, test_start = split_points(ss.lengths, horizon, val_fraction)
    scaler.fit(ss.series, val_start)
    scaled = [scaler.transform(s, i) for i, s in enumerate(ss.series)]
    train_w = make_windows(scaled, lookback, horizon, [(0, v) for v in val_start],
                           target=ss.target, min_lookback=min_lookback)
    val_w = None
    if val_fraction > 0:
        val_w = make_windows(scaled, lookback, horizon, list(zip(val_start, test_start,
                                                                 strict=True)),
                             target=ss.target, min_lookback=1)
    test_w = make_windows(scaled, lookback, horizon, [(t, t + horizon) for t in test_start],
                          target=ss.target, min_lookback=1)
    return scaled, train_w, val_w, test_w, val_start, test_start


# -- the task -----------------------------------------------------------------------------------

@dataclass
class Config(TaskConfig):
    """``gyre train forecast`` options, beside the common ones (:class:`TaskConfig`).

    Attributes:
        data: a built-in data set (``airline``, ``m1_yearly``, ``co2``, ``sunspots``,
            ``uschange``) or a CSV path (numeric columns, an optional date column).
        target: the column(s) to forecast (empty: the data set's, all columns for a CSV);
            the other columns are inputs only.
        date_column: the CSV column holding time stamps ("" = a first column made of dates).
        horizon: steps to forecast (0 = the data set's: airline 12, M1 yearly 6...).
        season: the seasonal period ``m`` for seasonal naive, Holt-Winters, SARIMA and MASE
            (0 = the data set's: 12 monthly, 4 quarterly, 1 yearly; from the dates for a CSV).
        lookback: input steps per window (0 = ``2 * max(horizon, season)``).
        min_lookback: the fewest input steps a training window may have when a series'
            history is shorter than ``lookback`` (0 = ``lookback`` for one series, ``horizon`` for
            many, so short series still give windows).
        strategy: ``direct`` (all ``horizon`` steps at once) or ``recursive`` (one step, fed
            back; forecasts every column).
        residual: what the model's output is added to: ``last`` (the last observed value),
            ``seasonal`` (the value one season back, i.e. seasonal naive) or ``none``.
        center: the recurrent stack reads each window relative to its last observed value.
        scaler: ``standard``, ``minmax``, ``mean``, ``diff`` (mean absolute one-step change) or
            ``none``, per series and column, fitted on the training part only; ``log``: take
            logs first (positive data only).
        loss: ``mse``, ``mae`` or ``huber`` on the scaled values.
        baselines: which of naive, seasonal_naive, holt_winters, arima to fit ("none": none).
        val_fraction: > 0 holds out, before the test part, the last
            ``max(horizon, round(val_fraction * n))`` points of each series for validation
            (early stopping, best epoch); 0 = none.
    """

    data: str = "airline"
    epochs: int = 150
    patience: int = 30
    lr: float = 3e-3
    target: list[str] = field(default_factory=list)
    date_column: str = ""
    horizon: int = 0
    season: int = 0
    lookback: int = 0
    min_lookback: int = 0
    strategy: str = "direct"
    residual: str = "last"
    center: bool = True
    scaler: str = "standard"
    log: bool = False
    loss: str = "mse"
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))

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
        if self.loss not in LOSSES:
            raise ValueError(f"loss: got {self.loss!r}, expected one of {', '.join(LOSSES)}")
        for name in ("horizon", "season", "lookback", "min_lookback"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= 0 "
                                 "(0 = the default)")
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


class _Setup:
    """Everything derived from a config and its data: the numbers a model is rebuilt from."""

    def __init__(self, config: Config, ss: SeriesSet) -> None:
        self.ss = ss
        self.horizon = config.horizon or ss.horizon
        self.season = config.season or ss.season
        self.lookback = config.lookback or 2 * max(self.horizon, self.season)
        many = len(ss.series) > 1
        self.min_lookback = config.min_lookback or (min(self.horizon, self.lookback) if many
                                                    else self.lookback)
        self.min_lookback = min(self.min_lookback, self.lookback)
        # a recursive model forecasts every column, and is scored on the target ones
        self.model_target = (list(range(ss.num_columns)) if config.strategy == "recursive"
                             else list(ss.target))
        short = int(ss.lengths.min())
        if short < self.horizon + 2:
            raise ValueError(f"horizon: {self.horizon} leaves the shortest series ({short} points) "
                             f"fewer than 2 points before its test part; use a smaller horizon")

    def model(self, config: Config) -> Forecaster:
        return Forecaster(config.cell, self.ss.num_columns, self.model_target, self.horizon,
                          config.hidden, config.layers, config.dropout, config.bidirectional,
                          config.strategy, config.residual, self.season, config.center)

    def describe(self, config: Config) -> str:
        return (f"{config.cell} x{config.layers} h{config.hidden} "
                f"{'bi ' if config.bidirectional else ''}{config.strategy} lookback "
                f"{self.lookback} horizon {self.horizon}")


def _load(config: Config, data: str | None = None) -> SeriesSet:
    return load_series(data or config.data, target=config.target or None,
                       date_column=config.date_column or None)


def _scored(setup: _Setup, model: Forecaster, scaler: Scaler, test_w: Windows, test_start):
    """Test forecasts on the original scale per series, and the metrics."""
    ss = setup.ss
    z = forecast_windows(model, test_w)
    cols = ss.target
    pos = [model.target.index(c) for c in cols]
    forecasts, actuals, insamples = [], [], []
    for k, i in enumerate(test_w.series):
        t = int(test_start[i])
        forecasts.append(scaler.inverse(z[k][:, pos], i, cols))
        actuals.append(ss.series[i][t:t + setup.horizon][:, cols])
        insamples.append(ss.series[i][:t][:, cols])
    return forecasts, actuals, insamples, score(actuals, forecasts, insamples, setup.season)


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


def train(config: Config, *, resume: bool = False) -> dict:
    """Train a forecaster on ``config.data`` and score it beside the baselines; see the
    :mod:`gyre.tasks` contract for what lands in ``config.out``."""
    import time

    from ..train import Trainer, seed_everything

    if not isinstance(config, Config):
        raise TypeError(f"config: got {type(config).__name__}, expected forecast.Config")
    ss = _load(config)
    setup = _Setup(config, ss)
    out = base.resolve_out(config, "forecast")
    base.write_config(config, out / "config.toml")

    scaler = Scaler(config.scaler, config.log)
    scaled, train_w, val_w, test_w, val_start, test_start = prepare(
        ss, setup.horizon, setup.lookback, setup.min_lookback, scaler, config.val_fraction)
    if len(train_w) == 0:
        raise ValueError(f"lookback: no series is long enough for one training window of "
                         f"min_lookback={setup.min_lookback} inputs and horizon={setup.horizon} "
                         f"targets before its validation/test part; lower lookback, "
                         f"min_lookback, horizon or val_fraction")
    seed_everything(config.seed)
    model = setup.model(config)
    tconf = config.train_config()
    if val_w is None or len(val_w) == 0:
        tconf = config.train_config(patience=0)
    extra = {"scaler": scaler.state(), "data": ss.name, "horizon": setup.horizon,
             "season": setup.season, "lookback": setup.lookback}
    trainer = Trainer(model, masked_loss(config.loss), tconf, collate=collate, out_dir=out,
                      extra=extra)
    t0 = time.perf_counter()
    train_data = WindowData(train_w, config.strategy, teacher=True)
    val_data = (WindowData(val_w, config.strategy, teacher=False)
                if val_w is not None and len(val_w) else None)
    fit = trainer.fit(train_data, val_data, resume=resume)
    seconds = time.perf_counter() - t0
    if fit["interrupted"]:
        return {"interrupted": True, "out": str(out)}

    forecasts, actuals, insamples, test = _scored(setup, trainer.model, scaler, test_w,
                                                  test_start)
    validation = None
    if val_w is not None and len(val_w):
        # the same forecast from the validation part's first point: comparable across
        # configurations (any scaler, loss or strategy), for choosing one without the test part
        val_origin = make_windows(scaled, setup.lookback, setup.horizon,
                                  [(v, v + setup.horizon) for v in val_start], target=ss.target,
                                  min_lookback=1)
        validation = _scored(setup, trainer.model, scaler, val_origin, val_start)[3]
    names = [b for b in config.baselines if b != "none"]
    bl = baseline_forecasts(insamples, setup.horizon, setup.season, names)
    baselines = {}
    for name, (fcs, failures) in bl.items():
        baselines[name] = score(actuals, fcs, insamples, setup.season)
        if failures:
            baselines[name]["fallbacks"] = failures
    metrics = {
        "task": "forecast", "data": ss.name, "out": str(out), "model": setup.describe(config),
        "test": test, "validation": validation, "baselines": baselines,
        "train": {"epochs_run": fit["epochs_run"], "best_epoch": fit["best_epoch"],
                  "stopped_early": fit["stopped_early"], "seconds": round(seconds, 2),
                  "train_windows": len(train_w), "val_windows": 0 if val_w is None else len(val_w),
                  "series": len(ss.series), "horizon": setup.horizon, "season": setup.season,
                  "lookback": setup.lookback, "parameters": sum(p.numel() for p in
                                                                 trainer.model.parameters())},
        "note": ss.note,
    }
    if ss.name in PUBLISHED and setup.horizon == ss.horizon:
        metrics["published"] = PUBLISHED[ss.name]
    metrics = _jsonable(metrics)
    base.write_json(metrics, out / "metrics.json")
    base.plot_history(fit["history"], out / "loss.png", f"forecast {ss.name}: loss")
    plot_forecasts(ss, forecasts, {n: f for n, (f, _) in bl.items()}, test_start,
                   out / "forecast.png", setup.describe(config))
    return metrics


def _rebuild(out_dir):
    from ..train import load_checkpoint

    out = Path(out_dir)
    config = base.load_config(Config, out / "config.toml")
    ckpt = load_checkpoint(out / "checkpoint")
    return config, ckpt


def _restored_model(config: Config, setup: _Setup, ckpt: dict) -> Forecaster:
    model = setup.model(config)
    best = ckpt.get("best") or {}
    state = best.get("model") if best.get("model") is not None else ckpt["model"]
    model.load_state_dict(state)
    model.eval()
    return model


def evaluate(out_dir, data: str | None = None) -> dict:
    """The test metrics of the run in ``out_dir`` (its own data, or ``data``: the test part is
    the last ``horizon`` points of each series there; the run's scaler is kept for its own data,
    refitted on the new data's training part otherwise)."""
    config, ckpt = _rebuild(out_dir)
    ss = _load(config, data)
    setup = _Setup(config, ss)
    setup.horizon, setup.season = ckpt["extra"]["horizon"], ckpt["extra"]["season"]
    model = _restored_model(config, setup, ckpt)
    if model.n_inputs != ss.num_columns:
        raise ValueError(f"data: the model reads {model.n_inputs} column(s), {data or config.data}"
                         f" has {ss.num_columns}")
    scaler = Scaler(config.scaler, config.log)
    _, _, _, test_w, _, test_start = prepare(ss, setup.horizon, setup.lookback,
                                             setup.min_lookback, scaler, config.val_fraction)
    if data is None:
        scaler = Scaler.from_state(ckpt["extra"]["scaler"])
    *_, test = _scored(setup, model, scaler, test_w, test_start)
    return {"test": _jsonable(test)}


def predict(out_dir, data_path: str | None = None) -> list[dict]:
    """Forecasts of the next ``horizon`` steps after the end of every series in ``data_path``
    (default: the run's data): ``{"series", "step", "column", "forecast"}`` rows."""
    config, ckpt = _rebuild(out_dir)
    ss = _load(config, data_path)
    setup = _Setup(config, ss)
    setup.horizon = ckpt["extra"]["horizon"]
    model = _restored_model(config, setup, ckpt)
    if model.n_inputs != ss.num_columns:
        raise ValueError(f"data_path: the model reads {model.n_inputs} column(s), "
                         f"{data_path or config.data} has {ss.num_columns}")
    if data_path is None:
        scaler = Scaler.from_state(ckpt["extra"]["scaler"])
    else:
        scaler = Scaler(config.scaler, config.log).fit(ss.series, ss.lengths)
    h = setup.horizon
    # windows whose (unknown) targets are the h steps after each series' end
    padded = [np.concatenate([scaler.transform(s, i), np.zeros((h, ss.num_columns))])
              for i, s in enumerate(ss.series)]
    w = make_windows(padded, setup.lookback, h, [(len(s), len(s) + h) for s in ss.series],
                     target=model.target, min_lookback=1)
    z = forecast_windows(model, w)
    rows = []
    for k, i in enumerate(w.series):
        pos = [model.target.index(c) for c in ss.target]
        f = scaler.inverse(z[k][:, pos], i, ss.target)
        for step in range(h):
            for j, c in enumerate(ss.target):
                rows.append({"series": ss.ids[i], "step": step + 1, "column": ss.columns[c],
                             "forecast": float(f[step, j])})
    return rows


def plot_forecasts(ss: SeriesSet, forecasts, baselines: dict, test_start, path, title: str,
                   max_series: int = 6) -> None:
    """Forecast against actuals: the history before the test part, the actual test part, the
    model's forecast and each baseline's, for the first target column of up to ``max_series``
    series."""
    plt = base.pyplot()
    n = min(len(forecasts), max_series)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.8 * n), squeeze=False)
    c = ss.target[0]
    for k in range(n):
        ax = axes[k, 0]
        t = int(test_start[k])
        idx, y = ss.index[k], ss.series[k][:, c]
        lo = max(0, t - 4 * len(forecasts[k]))
        ax.plot(idx[lo:], y[lo:], color="black", lw=1.2, label="actual")
        ax.plot(idx[t:], forecasts[k][:, 0], color="C3", lw=1.8, label="model")
        for j, (name, fcs) in enumerate(baselines.items()):
            ax.plot(idx[t:], fcs[k][:, 0], lw=1, ls="--", color=f"C{j}", label=name)
        ax.axvline(idx[t], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{ss.ids[k]} - {ss.columns[c]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
