"""The test table of the forecast task's default recipe (RESULTS.md, issue 16): ``gyre train
forecast --threads 1 --data DATA --seed S`` (the defaults, nothing else) on the development and
held-out series, every run in this process, one JSON line per run appended to ``--jsonl``
(an interrupted table resumes; two processes side by side split the runs by claim files).

    .venv/bin/python benchmarks/forecast_table.py --seeds 3 [--only m1_yearly,airline]
    .venv/bin/python benchmarks/forecast_table.py --table

Each line holds the run's test MASE and 80% coverage (the recipe's forecast: the network
combined with the automatic models at the weight chosen on the validation origins), the
network alone's, the combination's choice and its validation/test MASE at every weight, and
every baseline's MASE and coverage (same split, same command).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import runlog
from heldout_data import HELD_OUT_4

_SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / \
    "site-packages"
#: development series (the recipe was chosen on their validation origins)
DEV = ("airline", "m1_yearly", "co2", "sunspots", "uschange")
#: held-out series, read exactly as their packages ship them
HELD_OUT = {
    "PBS_dataset": "aeon/datasets/data/PBS_dataset/PBS_dataset.csv",
    "elec_equip": "statsmodels/datasets/elec_equip/elec_equip.csv",
    "danish": "statsmodels/datasets/danish_data/data.csv",
    "Lynx": "aeon/datasets/data/Lynx/Lynx.csv",
    "ShampooSales": "aeon/datasets/data/ShampooSales/ShampooSales.csv",
    "solar": "aeon/datasets/data/solar/solar.csv",
}
JSONL = Path(__file__).parent / "results" / "issue16" / "forecast_table.jsonl"
AUTO = ("auto_ets", "auto_arima", "auto_theta")
#: the fourth day's held-out files (``benchmarks/heldout_data.py`` writes them to ``--heldout``)
HELD_OUT_4_NAMES = tuple(Path(f).stem for f, _, _ in HELD_OUT_4)
JSONL_4 = JSONL.parent / "heldout4.jsonl"


def _data(name: str) -> str:
    return str(_SITE / HELD_OUT[name]) if name in HELD_OUT else name


def _reuse_baselines(F) -> None:
    """Every baseline is deterministic (the same points before an origin give the same fit), so
    this process fits each one once: a later seed of a series reuses the earlier seed's fits,
    the same numbers at a fraction of the shared machine's time."""
    if getattr(F.baseline_forecasts, "reused", False):
        return
    fit, cache = F.baseline_forecasts, {}

    def baseline_forecasts(insamples, horizon, season, names=F.BASELINES, levels=None):
        key = (tuple((np.shape(x), hashlib.sha1(np.ascontiguousarray(x, np.float64).tobytes())
                      .hexdigest()) for x in insamples), horizon, season, tuple(names),
               None if levels is None else tuple(levels))
        if key not in cache:
            cache[key] = fit(insamples, horizon, season, names, levels)
        return copy.deepcopy(cache[key])

    baseline_forecasts.reused = True
    F.baseline_forecasts = baseline_forecasts


def run(names, seeds: int, jsonl: Path, paths: dict | None = None) -> None:
    """Seeds ``0..seeds-1`` of every series ``names`` (``paths``: a CSV path per name, else a
    built-in or :data:`HELD_OUT` name)."""
    paths = paths or {}
    import torch

    from gyre.tasks import forecast as F
    torch.set_num_threads(1)
    _reuse_baselines(F)
    done = runlog.done(jsonl, lambda r: (r["data"], r["seed"]))
    for seed in range(seeds):
        for name in names:
            if (name, seed) in done or not runlog.claim(jsonl, f"{jsonl.stem}-{name}-{seed}"):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                t, c = time.time(), time.process_time()
                m = F.train(F.Config(data=paths.get(name) or _data(name), seed=seed,
                                     out=str(Path(tmp) / "run"),
                                     progress=False, tensorboard=False))
                rec = {"data": name, "seed": seed, "wall_s": round(time.time() - t, 1),
                       "cpu_s": round(time.process_time() - c, 1), "model": m["model"],
                       "horizon": m["train"]["horizon"], "frequency": m["train"]["frequency"],
                       "test": m["test"], "validation": m["validation"],
                       "network": m["network"], "combination": m["combination"],
                       "baselines": m["baselines"], "note": m["note"]}
            runlog.append(jsonl, rec)
            print(json.dumps({k: rec[k] for k in ("data", "seed", "wall_s", "cpu_s")}
                             | {"mase": rec["test"]["mase"]}), flush=True)


def _fmt(v) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _pick(r: dict, kind: str, ws) -> tuple[str, dict]:
    """``(weight, test metrics)`` of a run under the combination rule ``kind`` / weights ``ws``
    (None: the run's own choice and test part):
    the weight its validation grid picks and the test grid's entry there (exactly what a run
    with that rule as its ``combine`` writes as ``test``: the network's and the statistical
    models' forecasts do not depend on the rule); the run's own test part without a
    combination."""
    c = r["combination"]
    if not c:
        return "1", r["test"]
    if kind is None:  # what the run itself chose and wrote
        return f"{c['weight']:g}", r["test"]
    w = _chosen(c["grid"][kind], ws)
    return w, c["test_grid"][kind][w]


def table(jsonl: Path, kind: str | None = None, ws=(0.25, 0.5, 0.75, 1.0)) -> str:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["data"], []).append(r)
    out = ["| series (freq, h) | seeds | gyre MASE mean (min-max) | network alone | weight "
           "(per seed) | gyre coverage_80 | network coverage_80 | auto_ets | auto_arima | "
           "auto_theta | holt_winters | arima | seasonal_naive | best auto | at or below? |",
           "|" + "---|" * 15]
    for name in [*DEV, *HELD_OUT, *HELD_OUT_4_NAMES]:
        rs = sorted(by.get(name, []), key=lambda r: r["seed"])
        if not rs:
            continue
        picks = [_pick(r, kind, ws) for r in rs]
        mase = [p[1]["mase"] for p in picks]
        net = [r["network"]["test"]["mase"] if r["network"] else r["test"]["mase"] for r in rs]
        w = [float(p[0]) for p in picks]
        cov = [p[1].get("coverage_80", np.nan) for p in picks]
        ncov = [(r["network"]["test"] if r["network"] else r["test"]).get("coverage_80", np.nan)
                for r in rs]
        b = rs[0]["baselines"]
        best = min(b[n]["mase"] for n in AUTO if n in b)
        mean = float(np.mean(mase))
        out.append(f"| {name} ({rs[0]['frequency']}, {rs[0]['horizon']}) | {len(rs)} | "
                   f"{mean:.3f} ({min(mase):.3f}-{max(mase):.3f}) | {np.mean(net):.3f} | "
                   f"{'/'.join(f'{x:g}' for x in w)} | {_fmt(np.mean(cov))} | "
                   f"{_fmt(np.mean(ncov))} | "
                   + " | ".join(_fmt(b.get(n, {}).get("mase")) for n in
                                (*AUTO, "holt_winters", "arima", "seasonal_naive"))
                   + f" | {best:.3f} | {'yes' if mean <= best else 'no'} |")
    return "\n".join(out)


RULES = [(k, ws) for k in ("mean", "best", "best_all")
         for ws in ((0.25, 0.5, 0.75, 1.0), (0.5,), (0.0, 0.25, 0.5, 0.75, 1.0))]


def _chosen(grid: dict, ws) -> str:
    return f"{min(ws, key=lambda w: (grid[f'{w:g}'], -w)):g}"


def selection(jsonl: Path) -> str:
    """The validation MASE (the development series' validation origins, seed 0) of every
    combination rule: the statistical side and the weights the per-run choice may take; and
    the same rule's test MASE beside it (not used for the choice)."""
    rows = {r["data"]: r for r in map(json.loads, jsonl.read_text().splitlines())
            if r["seed"] == 0 and r["data"] in DEV and r["combination"]}
    names = [n for n in DEV if n in rows]
    out = ["| rule (statistical side; network weights) | " + " | ".join(names)
           + " | mean validation MASE | test MASE (not used) |",
           "|" + "---|" * (len(names) + 3)]

    def line(label, pick):
        val = [pick(rows[n])[0] for n in names]
        test = [pick(rows[n])[1] for n in names]
        out.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in val)
                   + f" | {np.mean(val):.3f} | " + " / ".join(f"{v:.3f}" for v in test) + " |")

    line("the network alone", lambda r: (r["combination"]["grid"]["mean"]["1"],
                                         r["combination"]["test_grid"]["mean"]["1"]["mase"]))
    for k in ("mean", "best", "best_all"):
        line(f"{k} alone (weight 0)", lambda r, k=k: (r["combination"]["grid"][k]["0"],
                                                     r["combination"]["test_grid"][k]["0"]["mase"]))
    for k, ws in RULES:
        def pick(r, k=k, ws=ws):
            c = r["combination"]
            w = _chosen(c["grid"][k], ws)
            return c["grid"][k][w], c["test_grid"][k][w]["mase"]
        line(f"{k}; {','.join(f'{w:g}' for w in ws)}", pick)
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated series (default: all)")
    p.add_argument("--jsonl", type=Path, default=JSONL)
    p.add_argument("--table", action="store_true", help="print the Markdown table and exit")
    p.add_argument("--selection", action="store_true",
                   help="print the combination rules' validation table and exit")
    p.add_argument("--heldout", type=Path, default=None,
                   help="the fourth day's held-out files in this folder (benchmarks/"
                        "heldout_data.py writes them); runs go to heldout4.jsonl")
    a = p.parse_args(argv)
    if a.table:
        print(table(a.jsonl))
        return
    if a.selection:
        print(selection(a.jsonl))
        return
    if a.heldout:
        paths = {n: str(a.heldout / f"{n}.csv") for n in HELD_OUT_4_NAMES}
        names = a.only.split(",") if a.only else list(HELD_OUT_4_NAMES)
        run(names, a.seeds, a.jsonl if a.jsonl != JSONL else JSONL_4, paths)
        return
    names = a.only.split(",") if a.only else [*DEV, *HELD_OUT]
    run(names, a.seeds, a.jsonl)


if __name__ == "__main__":
    main()
