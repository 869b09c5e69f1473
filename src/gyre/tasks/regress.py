"""Time-series extrinsic regression (one number per series): the sequence models of
:mod:`gyre.tasks.classify` (any ``--model``, any ``--cell``) with one output trained on the
standardised target by mean squared error, beside predicting the training mean and MiniRocket
features with ridge regression (aeon's ``MiniRocketRegressor``), all on the same split.

Follows the task contract in :mod:`gyre.tasks`. Data: :mod:`gyre.data.regression`; metrics
RMSE, MAE and R^2 on the original scale of the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from ..data import classification as cdata
from ..data import regression as rdata
from ..train import CHECKPOINT, load_checkpoint, save_checkpoint, seed_everything
from . import base
from . import classify as cls

TASK = "regress"


@dataclass
class Config(cls.SequenceModelConfig):
    """Regression run: the fields of :class:`gyre.tasks.classify.SequenceModelConfig` (the
    same models and recipe as classify); ``data`` is an aeon regression set
    (``cardano_sentiment``, ``covid_3month``) or a CSV/NPZ file in the classify format whose
    labels are numbers. The training mean and (``minirocket``) MiniRocket + ridge always run
    as baselines.

    The default recipe, chosen by 3-fold cross-validation on the two offline sets' training
    splits (RESULTS.md, "Issue 15"), is the recurrent model (``model="rnn"``, 100 epochs) with
    20% of the training split held out, the epoch of lowest validation loss restored
    (``val_fraction=0.2``) and the predictions shrunk towards the training mean by the factor
    the validation share gives (``shrink``): on these small, noisy sets the full-length fit
    over-fits.

    Attributes:
        shrink: (with ``val_fraction > 0``) multiply the standardised predictions by the
            least-squares factor on the validation share, clipped to [0, 1]: predictions are
            pulled towards the training mean as far as the validation share says the model's
            deviations from it are noise. The factor is stored with the run (``shrink`` in
            metrics.json's ``train``) and applied by ``evaluate`` and ``predict``.
    """

    data: str = "covid_3month"
    val_fraction: float = 0.2
    shrink: bool = True


def mse_loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(out[:, 0], y)


def scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R^2 (1 - residual / total sum of squares about the mean of ``y``)."""
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    err = pred - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"rmse": float(np.sqrt((err ** 2).mean())), "mae": float(np.abs(err).mean()),
            "r2": float(1 - (err ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")}


def _rmse_metric(scale: float):
    def metric(out: Tensor, y: Tensor) -> dict[str, float]:
        return {"rmse": float(((out[:, 0] - y) ** 2).mean().sqrt()) * scale}
    return metric


def minirocket_baseline(data: rdata.RegressionData, seed: int = 0) -> dict[str, float]:
    """aeon's ``MiniRocketRegressor`` (MiniRocket features, ``RidgeCV``); series zero-padded."""
    from aeon.regression.convolution_based import MiniRocketRegressor
    T = max(9, max(len(x) for x in data.X_train + data.X_test))
    reg = MiniRocketRegressor(random_state=seed, n_jobs=1)
    reg.fit(cls.to_aeon_array(data.X_train, T), data.y_train)
    return scores(reg.predict(cls.to_aeon_array(data.X_test, T)), data.y_test)


def train(config: Config, *, resume: bool = False, data: rdata.RegressionData | None = None
          ) -> dict:
    """Train, evaluate beside the baselines, write config.toml, checkpoint, metrics.json and
    plots into ``config.out``; returns the metrics (see :mod:`gyre.tasks`). ``data``: train and
    score on these splits instead of loading ``config.data`` (cross-validation folds)."""
    if not isinstance(config, Config):
        raise TypeError(f"config: got {type(config).__name__}, expected gyre.tasks.regress.Config")
    if data is None:
        data = rdata.load(config.data, seed=config.seed)  # before the run directory exists
    if resume:
        base.check_resume(config, config.out)
    out = base.resolve_out(config, TASK)
    # the target standardised on the training part (the one validation_split keeps)
    tr, _ = cdata.validation_split(data.y_train, config.val_fraction, config.seed)
    y_mean, y_std = float(data.y_train[tr].mean()), float(data.y_train[tr].std()) or 1.0
    norm = lambda y: (np.asarray(y) - y_mean) / y_std  # noqa: E731
    train_ds, val_ds, test_ds, scaler = cls._prepare(config, data, norm, np.float32)
    beside = cls.run_beside({"minirocket_ridge": (minirocket_baseline, (data, config.seed))}
                            if config.minirocket else {})
    seed_everything(config.seed)
    k, stride = cls.resolve_shape(config, data.X_train)
    model = cls.build_model(config, data.n_channels, 1, frame=k, stride=stride)
    extra = {"n_channels": data.n_channels, "scaler": scaler.state(), "frame": k,
             "stride": stride, "y_mean": y_mean, "y_std": y_std}
    trainer, result, seconds, early = cls.fit_beside(
        beside, model, config, out, train_ds, val_ds, extra, resume, loss=mse_loss,
        metrics=_rmse_metric(y_std))
    if early is not None:
        return early
    alpha = 1.0
    if config.shrink and len(val_ds):
        alpha = shrink_factor(*trainer.predict(val_ds))
        ckpt = load_checkpoint(out / CHECKPOINT)
        ckpt["extra"]["shrink"] = alpha
        save_checkpoint(ckpt, out / CHECKPOINT)
    pred = alpha * trainer.predict(test_ds)[0][:, 0].numpy().astype(np.float64) * y_std + y_mean
    test = scores(pred, data.y_test)
    name = cls.describe(config, k, stride)
    base.plot_history(result["history"], out / "loss.png", f"{name} on {data.name}")
    plot_predictions(data.y_test, pred, out / "predictions.png",
                     f"{name}: RMSE {test['rmse']:.4g}")
    baselines = {"train_mean": scores(np.full(len(data.y_test), data.y_train[tr].mean()),
                                      data.y_test)}
    baselines.update(beside())
    metrics = {
        "task": TASK, "data": data.name, "out": str(out), "model": name, "test": test,
        "baselines": baselines,
        "train": cls.train_summary(result, seconds, model, (train_ds, val_ds, test_ds), k,
                                   stride),
    }
    metrics["train"]["shrink"] = alpha
    base.write_json(metrics, out / "metrics.json")
    return metrics


def shrink_factor(out, y) -> float:
    """The factor ``a`` in [0, 1] that minimises ``sum((a * out - y)^2)`` over standardised
    outputs ``out`` ``(n, 1)`` and targets ``y`` (0 when every output is 0)."""
    p, t = out[:, 0].double(), y.double()
    den = float((p * p).sum())
    return 0.0 if den == 0 else min(1.0, max(0.0, float((p * t).sum()) / den))


def plot_predictions(y: np.ndarray, pred: np.ndarray, path, title: str) -> None:
    plt = base.pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y, pred, s=12, alpha=0.7)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
    ax.set_xlabel("target")
    ax.set_ylabel("prediction")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- reloading ------------------------------------------------------------------------------------
def load_run(out_dir) -> tuple[Config, nn.Module, dict]:
    """``(config, model with the final weights, checkpoint extra)`` from a run directory."""
    return cls.restore(out_dir, Config, TASK, lambda extra: 1)


def _predict(model: nn.Module, extra: dict, X: list[np.ndarray]) -> np.ndarray:
    scaler = cdata.Standardizer.from_state(extra["scaler"])
    out = cls._logits(model, scaler(X))[:, 0].numpy().astype(np.float64)
    return extra.get("shrink", 1.0) * out * extra["y_std"] + extra["y_mean"]


def build_like(config: Config, extra: dict) -> nn.Module:
    """The model of a run with checkpoint ``extra`` as ``config`` describes it (e.g. a smaller
    ``hidden`` for structured pruning), untrained."""
    return cls.build_like(config, extra, 1)


def finetune(model: nn.Module, config: Config, extra: dict) -> None:
    """Train ``model`` (e.g. a pruned one) for ``config.epochs`` on the run's training split
    into the new run directory ``config.out`` (config.toml and checkpoint, as gyre train
    writes them), on the target standardised as the run had it (``extra``)."""
    data = rdata.load(config.data, seed=config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base.write_config(config, out / "config.toml")
    norm = lambda y: (np.asarray(y) - extra["y_mean"]) / extra["y_std"]  # noqa: E731
    train_ds, val_ds, _, _ = cls._prepare(config, data, norm, np.float32)
    seed_everything(config.seed)
    _, result = cls._fit(model, config, out, train_ds, val_ds, extra, resume=False,
                         progress=False, loss=mse_loss, metrics=_rmse_metric(extra["y_std"]))
    if result["interrupted"]:
        raise KeyboardInterrupt


def score_test(out_dir, run=None) -> tuple[dict, float]:
    """``(test scores, seconds of the model's forward over the test split)`` of a run; ``run``:
    what computes the forward instead of the run's model."""
    config, model, extra = load_run(out_dir)
    ds = rdata.load(config.data, seed=config.seed)
    X = cdata.Standardizer.from_state(extra["scaler"])(ds.X_test)
    cls._logits(run or model, X)  # warm-up (a compiled kernel's first call)
    start = time.perf_counter()
    out = cls._logits(run or model, X)[:, 0].numpy().astype(np.float64)
    seconds = time.perf_counter() - start
    return scores(out * extra["y_std"] + extra["y_mean"], ds.y_test), seconds


def evaluate(out_dir, data: str | None = None) -> dict:
    """Test metrics of a trained run on its own test split, or on ``data``'s."""
    config, model, extra = load_run(out_dir)
    ds = rdata.load(data or config.data, seed=config.seed)
    return {"test": scores(_predict(model, extra, ds.X_test), ds.y_test), "data": ds.name,
            "n_test": len(ds.y_test)}


def predict(out_dir, data_path: str) -> list[dict]:
    """The predicted target of every sequence in ``data_path`` (labels and splits ignored)."""
    _, model, extra = load_run(out_dir)
    pred = _predict(model, extra, cdata.read_sequences(data_path))
    return [{"index": i, "prediction": float(v)} for i, v in enumerate(pred)]


__all__ = ["Config", "TASK", "train", "evaluate", "predict", "load_run", "scores",
           "minirocket_baseline"]
