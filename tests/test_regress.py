"""regress: real-data training beats the training-mean baseline; metrics, reload, predict,
user files with numeric targets, bad targets."""

import numpy as np
import pytest

from gyre.data import regression as rd
from gyre.tasks import base, regress


def _quick(tmp_path, **kw):
    opts = dict(out=str(tmp_path / "run"), epochs=30, hidden=16, minirocket=False,
                progress=False, tensorboard=False, device="cpu", weight_decay=0.0)
    opts.update(kw)
    return regress.Config(**opts)


def test_scores_match_sklearn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    rng = np.random.default_rng(0)
    y, p = rng.standard_normal(20), rng.standard_normal(20)
    s = regress.scores(p, y)
    assert s["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)))
    assert s["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert s["r2"] == pytest.approx(r2_score(y, p))


def test_covid_3month_beats_the_mean_baseline_and_reloads(tmp_path):
    m = regress.train(_quick(tmp_path, data="covid_3month"))
    assert m["task"] == "regress" and m["train"]["n_test"] == 61
    assert m["test"]["rmse"] < m["baselines"]["train_mean"]["rmse"], m
    assert set(m["test"]) == {"rmse", "mae", "r2"}
    assert 0 < m["train"]["shrink"] <= 1  # the validation share's factor, applied on reload too
    for f in ("config.toml", "checkpoint", "metrics.json", "loss.png", "predictions.png"):
        assert (tmp_path / "run" / f).is_file(), f
    assert base.task_of_run(tmp_path / "run") == "regress"
    again = regress.evaluate(tmp_path / "run")
    assert again["test"] == pytest.approx(m["test"], rel=1e-6)


def test_user_npz_with_numeric_targets_conv_rnn_and_predict(tmp_path):
    """Variable-length NaN-padded series whose target is their amplitude."""
    rng = np.random.default_rng(0)
    n, T = 60, 80
    X = np.full((n, T), np.nan, np.float32)
    y = rng.uniform(0.5, 3.0, n)
    for i in range(n):
        L = rng.integers(20, T + 1)
        X[i, :L] = y[i] * np.sin(np.arange(L) / 4 + rng.uniform(0, 6))
    path = tmp_path / "amp.npz"
    np.savez(path, X=X, y=y)
    m = regress.train(_quick(tmp_path, data=str(path), model="conv-rnn", conv_channels=8))
    assert m["test"]["rmse"] < m["baselines"]["train_mean"]["rmse"]
    rows = regress.predict(tmp_path / "run", str(path))
    assert len(rows) == n and all(np.isfinite(r["prediction"]) for r in rows)


def test_non_numeric_target_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("label,t0,t1\n1.5,0,1\nhigh,1,2\n2,3,4\n0.5,1,1\n")
    with pytest.raises(ValueError, match="target of sequence 1 is 'high', expected a number"):
        rd.load(str(path))
    with pytest.raises(ValueError, match="neither a known regression dataset"):
        rd.load("nope")


def test_minirocket_regressor_baseline(tmp_path):
    m = regress.train(_quick(tmp_path, data="cardano_sentiment", epochs=1, minirocket=True))
    assert set(m["baselines"]) == {"train_mean", "minirocket_ridge"}
    assert m["baselines"]["minirocket_ridge"]["rmse"] > 0


def test_shrink_factor_is_the_clipped_least_squares_factor():
    import torch
    rng = np.random.default_rng(0)
    p = rng.standard_normal(30)
    y = 0.4 * p + 0.1 * rng.standard_normal(30)
    a = regress.shrink_factor(torch.tensor(p)[:, None], torch.tensor(y))
    assert a == pytest.approx(float(np.linalg.lstsq(p[:, None], y, rcond=None)[0][0]))
    assert regress.shrink_factor(torch.tensor(p)[:, None], torch.tensor(-y)) == 0.0
    assert regress.shrink_factor(torch.tensor(p)[:, None], torch.tensor(3 * p)) == 1.0
    assert regress.shrink_factor(torch.zeros(4, 1), torch.ones(4)) == 0.0


def test_log_input_is_stored_with_the_run_and_applied_on_reload(tmp_path):
    # shrink off: a factor 0 would hide what the inputs do
    m = regress.train(_quick(tmp_path, data="cardano_sentiment", epochs=3, log_input=True,
                             shrink=False))
    _, model, extra = regress.load_run(tmp_path / "run")
    assert extra["scaler"]["log"] is True
    assert regress.evaluate(tmp_path / "run")["test"] == pytest.approx(m["test"], rel=1e-6)
    X = rd.load("cardano_sentiment").X_test  # volumes of 1e3-1e5: the map changes the inputs
    raw = dict(extra, scaler={**extra["scaler"], "log": False})
    assert not np.allclose(regress._predict(model, extra, X), regress._predict(model, raw, X))
