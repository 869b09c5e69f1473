"""Choosing the combination rule and the interval calibration out of sample, on the development
series' validation origins only (RESULTS.md, issue 16, fifth day).

A default run picks its combination (the statistical side and the network's weight) and its
interval width on its validation origins and is scored there in sample, so a rule with more
choices always looks better. Here each rule is scored out of sample: the validation windows
(one per series and origin) are split into folds, the rule chooses on the other folds and is
scored on the held-out one (a single series: one fold per origin; a panel: up to 5 folds of
whole series), and the held-out MASE / 80% coverage are averaged over windows.

    # 1. one default run per development series, stopped after the validation part: its
    #    validation forecasts (network, quantiles, every baseline) dumped, no test point read
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/combination_cv.py --dump DIR
    # 2. every rule, out of sample
    .venv/bin/python benchmarks/combination_cv.py --rules DIR
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

DEV = ("airline", "m1_yearly", "co2", "sunspots", "uschange")


class _Stop(Exception):
    pass


def dump(out: Path, names, seed: int) -> None:
    import torch

    from gyre.tasks import forecast as F

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = out / f"{name}-{seed}.pkl"
        if path.exists():
            continue
        rec = {}
        scored, choose = F._scored, F.choose_combination

        def _scored(setup, models, scaler, w, levels=(), factors=None, run=None, rec=rec,
                    scored=scored):
            res = scored(setup, models, scaler, w, levels, factors, run)
            if "net" not in rec:
                rec.update(net=res[0], quantiles=res[1], actuals=res[2], insamples=res[3],
                           series=np.asarray(w.series), start=np.asarray(w.start),
                           levels=list(levels), factors=factors, season=setup.season,
                           horizon=setup.horizon)
            return res

        def choose_combination(kind, weights, net, auto, actuals, insamples, season, rec=rec,
                               choose=choose):
            rec["auto"] = auto
            rec["choice"] = choose(kind, weights, net, auto, actuals, insamples, season)
            raise _Stop

        F._scored, F.choose_combination = _scored, choose_combination
        t0 = time.process_time()
        try:
            # every validation origin (combine_origins 0): the rules below may use fewer
            F.train(F.Config(data=name, seed=seed, progress=False, tensorboard=False,
                             combine_origins=0,
                             out=str(out / f"run-{name}-{seed}")))
        except _Stop:
            pass
        finally:
            F._scored, F.choose_combination = scored, choose
        rec["cpu_s"] = time.process_time() - t0
        with open(path, "wb") as f:
            pickle.dump(rec, f)
        print(f"{name}: {len(rec['net'])} validation windows, {rec['cpu_s']:.1f} CPU-s",
              flush=True)


# -- rules -------------------------------------------------------------------------------------

def _scale(x, m):
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    m = m if len(x) > m else 1
    return np.mean(np.abs(x[m:] - x[:-m]), axis=0)  # (C,)


def _folds(series, start):
    """Fold number per window: one fold per origin for a single series, else up to 5 folds of
    whole series."""
    if len(np.unique(series)) == 1:
        return np.unique(start, return_inverse=True)[1]
    ids = np.unique(series)
    k = min(5, len(ids))
    return np.searchsorted(ids, series) % k


def _arrays(rec):
    """``Y (K, h, C)``, ``{model: F (K, h, C)}`` (the network under ``"network"``), the MASE
    scale ``(K, C)`` and the network's quantiles ``(K, h, C, Q)`` of a dump's windows."""
    def st(v):
        a = np.stack([np.asarray(x, np.float64) for x in v])
        return a[..., None] if a.ndim == 2 else a
    y = st(rec["actuals"])
    fc = {"network": st(rec["net"]), **{m: st(v) for m, v in rec["auto"].items()}}
    scale = np.stack([_scale(x, rec["season"]) for x in rec["insamples"]])
    q = np.stack([np.asarray(x, np.float64) for x in rec["quantiles"]])
    if q.ndim == 3:
        q = q[:, :, None, :]
    return y, fc, scale, q


AUTO = ("auto_ets", "auto_arima", "auto_theta")


def _err(y, f, scale):
    """Per window, the MASE averaged over its columns (columns with no scale left out)."""
    e = np.mean(np.abs(y - f), axis=1) / np.where(scale > 0, scale, np.nan)  # (K, C)
    return np.nanmean(e, axis=1)


def _mix(fc, weights: dict):
    return sum(w * fc[m] for m, w in weights.items() if w)


def rule_weights(name, y, fc, scale, idx):
    """The combination (``{model: weight}``, weights summing to 1) that rule ``name`` picks on
    the windows ``idx``."""
    err = {m: float(np.nanmean(_err(y[idx], f[idx], scale[idx]))) for m, f in fc.items()}
    stats = [m for m in fc if m != "network"]
    best_all = min(stats, key=lambda m: (not np.isfinite(err[m]), err[m]))
    if name == "network":
        return {"network": 1.0}
    if name == "equal_auto":
        return {"network": 0.5, **{m: 0.5 / 3 for m in AUTO}}
    if name == "best_single":
        return {min(fc, key=lambda m: err[m]): 1.0}
    if name.startswith("grid"):  # the current rule: best_all, network weight from a grid
        grid = (0.0, 0.25, 0.5, 0.75, 1.0) if name == "grid0" else (0.25, 0.5, 0.75, 1.0)
        sc = {w: float(np.nanmean(_err(y[idx], w * fc["network"][idx] + (1 - w) *
                                       fc[best_all][idx], scale[idx]))) for w in grid}
        w = min(grid, key=lambda w: (sc[w], -w))
        return {"network": w, best_all: 1 - w}
    if name.startswith("inv"):  # inverse-error weights over the network and the baselines
        power = 2.0 if name.startswith("inv2") else 1.0
        pool = list(fc) if "all" in name else ["network", *AUTO]
        inv = {m: err[m] ** -power for m in pool if np.isfinite(err[m]) and err[m] > 0}
        tot = sum(inv.values())
        return {m: v / tot for m, v in inv.items()}
    if name.startswith("top"):  # equal weights of the k best on validation
        k = int(name[3])
        pool = sorted((m for m in fc if np.isfinite(err[m])), key=lambda m: err[m])[:k]
        return {m: 1.0 / len(pool) for m in pool}
    if name.startswith("se_"):  # the grid's choice only where it beats the fallback by 1 s.e.
        pick = rule_weights("grid", y, fc, scale, idx)
        fall = rule_weights(name[3:], y, fc, scale, idx)
        d = (_err(y[idx], _mix(fc, pick)[idx], scale[idx]) -
             _err(y[idx], _mix(fc, fall)[idx], scale[idx]))
        d = d[np.isfinite(d)]
        se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
        return pick if np.mean(d) < -se else fall
    raise ValueError(name)


RULES = ("network", "best_single", "equal_auto", "grid", "grid0", "inv_auto", "inv_all",
         "inv2_auto", "inv2_all", "top2", "top3", "top4", "se_network", "se_equal_auto",
         "se_inv_all", "se_top3")


def _coverage(y, lo, hi):
    inside = ((y >= lo) & (y <= hi)).mean(axis=1)  # (K, C)
    return np.nanmean(inside, axis=1)


def evaluate(rec, rule, calib):
    """Out-of-sample mean MASE and 80% coverage of ``rule`` with interval rule ``calib`` over
    the folds of a dump's validation windows."""
    y, fc, scale, q = _arrays(rec)
    folds = _folds(rec["series"], rec["start"])
    lv = [float(v) for v in rec["levels"]]
    i10, i90 = lv.index(0.1), lv.index(0.9)
    mase, cover = np.full(len(y), np.nan), np.full(len(y), np.nan)
    for f in np.unique(folds):
        test, fit = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        if len(np.unique(folds)) == 1:
            fit = test  # one fold only: in sample (said in the table)
        wts = rule_weights(rule, y, fc, scale, fit)
        comb = _mix(fc, wts)
        shift = comb - fc["network"]
        lo, hi = q[..., i10] + shift, q[..., i90] + shift
        if calib != "none":
            from gyre.tasks import forecast as F

            cl = [comb[k] for k in range(len(y))]
            cq = [q[k] + shift[k][..., None] for k in range(len(y))]
            off = F.combination_offsets([cl[k] for k in fit], [cq[k] for k in fit],
                                        [y[k] for k in fit], [rec["insamples"][k] for k in fit],
                                        rec["season"], lv, conservative=calib.startswith("n+1"))
            if calib.endswith("widen"):  # offsets never narrow the interval
                off = [max(0.0, o) for o in off]
            wq = np.stack(F.widened(cl, cq, rec["insamples"], rec["season"], off, lv))
            lo, hi = wq[..., i10], wq[..., i90]
        mase[test] = _err(y[test], comb[test], scale[test])
        cover[test] = _coverage(y[test], lo[test], hi[test])
    return float(np.nanmean(mase)), float(np.nanmean(cover)), len(np.unique(folds))


def report(d: Path, names, seed: int) -> None:
    recs = {}
    for n in names:
        path = d / f"{n}-{seed}.pkl"
        if path.exists():
            with open(path, "rb") as f:
                recs[n] = pickle.load(f)
    names = list(recs)
    print("windows / folds: " + ", ".join(
        f"{n} {len(r['net'])}/{len(np.unique(_folds(r['series'], r['start'])))}"
        for n, r in recs.items()))
    print("| rule | " + " | ".join(names) + " | mean MASE |")
    print("|---" * (len(names) + 2) + "|")
    for rule in RULES:
        row = [evaluate(recs[n], rule, "none")[0] for n in names]
        print(f"| {rule} | " + " | ".join(f"{v:.3f}" for v in row) +
              f" | {np.mean(row):.3f} |")
    print()
    print("80% coverage, out of sample (interval rules: none = the network's width around the "
          "combination; plain / n+1 = conformal offsets on the choosing folds' residuals)")
    print("| rule, interval | " + " | ".join(names) + " | mean |")
    print("|---" * (len(names) + 2) + "|")
    for rule in ("grid", "network", "inv_all", "top3", "se_network", "se_equal_auto"):
        for calib in ("none", "plain", "n+1", "plain widen", "n+1 widen"):
            row = [evaluate(recs[n], rule, calib)[1] for n in names]
            print(f"| {rule}, {calib} | " + " | ".join(f"{v:.3f}" for v in row) +
                  f" | {np.mean(row):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dump", type=Path)
    p.add_argument("--rules", type=Path)
    p.add_argument("--only", default=",".join(DEV))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    names = a.only.split(",")
    if a.dump:
        dump(a.dump, names, a.seed)
    if a.rules:
        report(a.rules, names, a.seed)
    if not (a.dump or a.rules):
        p.error("give --dump DIR and/or --rules DIR")


if __name__ == "__main__":
    sys.exit(main())
