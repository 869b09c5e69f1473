"""Choose gyre's default classification recipe by stratified k-fold cross-validation on the
training splits of the offline sets (the test splits are never read).

Each candidate is a set of ``gyre.tasks.classify.Config`` overrides. For every dataset, the
training split is cut into ``--folds`` stratified folds (sklearn ``StratifiedKFold``,
shuffled with ``--seed``); every candidate trains on each fold's rest and is scored on the
fold, and aeon's MiniRocket runs on the same folds. Each result is appended as one JSON line
to ``--jsonl`` as soon as it is known, so an interrupted selection resumes where it stopped;
``--table`` prints the mean over folds per dataset and candidate as a Markdown table.

``--fit`` trains on the whole training split instead and reports the final training loss and
the training accuracy (does a candidate fit its training split at all).

    OMP_NUM_THREADS=1 python benchmarks/select_classify.py --candidates conv,rnn
    python benchmarks/select_classify.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: name -> Config overrides; every other field keeps classify's default
CANDIDATES: dict[str, dict] = {
    "rnn": {"model": "rnn"},
    "conv": {"model": "conv-rnn"},
    "conv_b8": {"model": "conv-rnn", "batch_size": 8},
    "conv_b8_lr3": {"model": "conv-rnn", "batch_size": 8, "lr": 3e-3},
    "conv128": {"model": "conv-rnn", "conv_channels": 128},
    "conv_s128": {"model": "conv-rnn", "conv_steps": 128},
    "conv_s128_e200": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200},
    # aimed at generalisation, each one change from conv_s128_e200 (the default)
    "ls1": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200, "label_smoothing": 0.1},
    "crop9": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200, "crop": 0.9},
    "aug": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200, "crop": 0.9,
            "jitter": 0.05, "scale": 0.1},
    "wd": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200, "optimizer": "adamw",
           "weight_decay": 0.05},
    "mean_head": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200, "head": "mean"},
    "aug_ls1": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200, "crop": 0.9,
                "jitter": 0.05, "scale": 0.1, "label_smoothing": 0.1},
    "aug_ens3_e70": {"model": "conv-rnn", "conv_steps": 128, "epochs": 70, "ensemble": 3,
                     "crop": 0.9, "jitter": 0.05, "scale": 0.1},
    "ens3_e70": {"model": "conv-rnn", "conv_steps": 128, "epochs": 70, "ensemble": 3},
    # receptive field (fourth day): the default with a multi-scale (and dilated) front-end
    "ms": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200, "front": "multiscale"},
    "msd": {"model": "conv-rnn", "conv_steps": 128, "epochs": 200,
            "front": "multiscale-dilated"},
    # resolution (seventh day): the front-end on about 512 steps (first-block stride 1 on
    # ArrowHead and OSULeaf, 3 on ACSF1) instead of 128
    "s512": {"model": "conv-rnn", "conv_steps": 512, "epochs": 200},
}
#: regression candidates (``gyre train regress``)
REGRESS: dict[str, dict] = {
    "rnn": {"model": "rnn"},
    "rnn_val": {"model": "rnn", "val_fraction": 0.2},
    "rnn_val_ens3": {"model": "rnn", "val_fraction": 0.2, "ensemble": 3},
    "rnn_val_shrink": {"model": "rnn", "val_fraction": 0.2, "shrink": True},
    "rnn_val_ens5_shrink": {"model": "rnn", "val_fraction": 0.2, "ensemble": 5, "shrink": True},
    "rnn_val_wd_shrink": {"model": "rnn", "val_fraction": 0.2, "optimizer": "adamw",
                          "weight_decay": 0.5, "shrink": True},
    "conv_val_shrink": {"model": "conv-rnn", "conv_steps": 128, "val_fraction": 0.2,
                        "shrink": True},
    # fifth day: heavy-tailed inputs (Covid3Month's counts, CardanoSentiment's volumes)
    "rnn_val_shrink_log": {"model": "rnn", "val_fraction": 0.2, "shrink": True,
                           "log_input": True},
    "rnn_val_ens5_shrink_log": {"model": "rnn", "val_fraction": 0.2, "ensemble": 5,
                                "shrink": True, "log_input": True},
    "rnn_val_wd_shrink_log": {"model": "rnn", "val_fraction": 0.2, "optimizer": "adamw",
                              "weight_decay": 0.5, "shrink": True, "log_input": True},
}
#: the CLI flags of each regression candidate (for the test table of the chosen one)
REGRESS_FLAGS = {"rnn": [], "rnn_val": ["--val-fraction", "0.2"],
                 "rnn_val_ens3": ["--val-fraction", "0.2", "--ensemble", "3"],
                 "rnn_val_shrink": ["--val-fraction", "0.2", "--shrink"],
                 "rnn_val_ens5_shrink": ["--val-fraction", "0.2", "--ensemble", "5", "--shrink"],
                 "rnn_val_wd_shrink": ["--val-fraction", "0.2", "--optimizer", "adamw",
                                       "--weight-decay", "0.5", "--shrink"],
                 "conv_val_shrink": ["--model", "conv-rnn", "--conv-steps", "128",
                                     "--val-fraction", "0.2", "--shrink"],
                 "rnn_val_shrink_log": ["--val-fraction", "0.2", "--shrink", "--log-input"],
                 "rnn_val_ens5_shrink_log": ["--val-fraction", "0.2", "--ensemble", "5",
                                             "--shrink", "--log-input"],
                 "rnn_val_wd_shrink_log": ["--val-fraction", "0.2", "--optimizer", "adamw",
                                           "--weight-decay", "0.5", "--shrink", "--log-input"]}
REGRESS_DATASETS = ("covid_3month", "cardano_sentiment")
DATASETS = ("italy_power_demand", "gunpoint", "japanese_vowels", "basic_motions", "arrow_head",
            "pickup_gesture_wiimoteZ", "osuleaf", "acsf1")
JSONL = Path(__file__).parent / "results" / "issue15" / "select_classify.jsonl"


def folds(data, k: int, seed: int, fit: bool, regression: bool):
    """``(fold index, data)`` whose test split is the held-out fold (``fit``: one 'fold' whose
    test split is the training split itself); stratified for classification."""
    from dataclasses import replace

    from sklearn.model_selection import KFold, StratifiedKFold
    if fit:
        yield -1, replace(data, X_test=data.X_train, y_test=data.y_train)
        return
    if regression:
        cv = KFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (tr, te) in enumerate(cv.split(np.zeros(len(data.y_train)), data.y_train)):
        pick = lambda idx: [data.X_train[j] for j in idx]  # noqa: E731
        yield i, replace(data, X_train=pick(tr), y_train=data.y_train[tr], X_test=pick(te),
                         y_test=data.y_train[te])


def run(task: str, datasets, candidates, k: int, seed: int, fit: bool, jsonl: Path,
        epochs: int) -> None:
    import torch

    from gyre.data import classification as cdata
    from gyre.data import regression as rdata
    from gyre.tasks import classify, regress
    torch.set_num_threads(1)
    regression = task == "regress"
    mod = regress if regression else classify
    table_ = REGRESS if regression else CANDIDATES
    baselines = ("train_mean", "minirocket_ridge") if regression else ("minirocket",)
    score = "rmse" if regression else "accuracy"
    done = set()
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["data"], r["candidate"], r["fold"], r["seed"], r.get("epochs")))
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    for name in datasets:
        data = rdata.load_aeon(name) if regression else cdata.load_aeon(name)
        for i, fold in folds(data, k, seed, fit, regression):
            for cand in [*baselines, *candidates]:
                base_ = cand in baselines
                if base_ and fit:
                    continue
                key = (name, cand, i, seed, None if base_ else epochs)
                if key in done:
                    continue
                start = time.perf_counter()
                if cand == "minirocket":
                    rec = {score: classify.minirocket_baseline(fold, seed)[score]}
                elif cand == "minirocket_ridge":
                    rec = {score: regress.minirocket_baseline(fold, seed)[score]}
                elif cand == "train_mean":
                    pred = np.full(len(fold.y_test), fold.y_train.mean())
                    rec = {score: regress.scores(pred, fold.y_test)[score]}
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        opts = dict(table_[cand], data=name, out=tmp, seed=seed,
                                    minirocket=False, progress=False, tensorboard=False,
                                    device="cpu")
                        if not regression:
                            opts["dtw"] = False
                        if epochs:
                            opts["epochs"] = epochs
                        m = mod.train(mod.Config(**opts), data=fold)
                    rec = {score: m["test"][score],
                           "train_loss": m["train"]["final_train_loss"],
                           "train_seconds": m["train"]["seconds"]}
                rec.update(data=name, candidate=cand, fold=i, seed=seed,
                           epochs=None if base_ else epochs,
                           seconds=round(time.perf_counter() - start, 2),
                           n_train=len(fold.y_train), n_test=len(fold.y_test))
                with jsonl.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)


def table(jsonl: Path, seed: int, only=()) -> str:
    """The Markdown table of ``jsonl``'s results for ``seed`` (``only``: these candidates and
    the baselines)."""
    rows: dict[tuple, list] = {}
    last = {}  # two selections run side by side may both score a baseline's fold
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        last[(r["data"], r["candidate"], r["fold"], r["seed"], r.get("epochs"))] = r
    for r in last.values():
        if r["seed"] != seed:
            continue
        cand = r["candidate"] + ("" if not r.get("epochs") else f"@{r['epochs']}")
        rows.setdefault((r["data"], cand, r["fold"] < 0), []).append(r)
    first = ("minirocket", "train_mean", "minirocket_ridge")
    cands = sorted({c for _, c, _ in rows if not only or c in only or c in first},
                   key=lambda c: (c not in first, c))
    names = [d for d in (*DATASETS, *REGRESS_DATASETS) if any(k[0] == d for k in rows)]
    out = []
    for fit in (False, True):
        present = [c for c in cands if any((d, c, fit) in rows for d in names)]
        if not present:
            continue
        out.append("fit: score on the whole training split / its final training loss"
                   if fit else "cross-validation: accuracy (%) or RMSE, mean over folds "
                   "(folds done; seconds per fold)")
        out.append("| dataset | " + " | ".join(present) + " |")
        out.append("|---|" + "---|" * len(present))
        means = {c: [] for c in present}
        for d in names:
            cells = []
            for c in present:
                rs = rows.get((d, c, fit), [])
                if not rs:
                    cells.append("-")
                    continue
                if "rmse" in rs[0]:
                    v, txt = float(np.mean([r["rmse"] for r in rs])), "{:.4f}"
                else:
                    v, txt = 100 * float(np.mean([r["accuracy"] for r in rs])), "{:.1f}"
                loss = max((r.get("train_loss") or 0.0) for r in rs)
                sec = float(np.mean([r["seconds"] for r in rs]))
                if fit:
                    cells.append(f"{txt.format(v)} / {loss:.3f} ({sec:.0f} s)")
                else:
                    if d in DATASETS:
                        means[c].append(v)
                    cells.append(f"{txt.format(v)} ({len(rs)}; {sec:.0f} s)")
            out.append(f"| {d} | " + " | ".join(cells) + " |")
        n_cls = len([d for d in names if d in DATASETS])
        if not fit and n_cls:
            out.append(f"| mean accuracy over the {n_cls} classification sets | " + " | ".join(
                f"{np.mean(v):.1f}" if len(v) == n_cls else "-" for v in means.values()) + " |")
        out.append("")
    return "\n".join(out)


def best_regress(jsonl: Path, seed: int) -> str:
    """The regression candidate whose CV RMSE relative to the training mean's on the same
    folds, averaged over the regression sets, is lowest (candidates scored on every fold)."""
    rs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rs = [r for r in rs if r["seed"] == seed and r["data"] in REGRESS_DATASETS and "rmse" in r]
    mean = {(r["data"], r["fold"]): r["rmse"] for r in rs if r["candidate"] == "train_mean"}
    rel: dict[str, dict] = {}
    for r in rs:
        if r["candidate"] in REGRESS and (r["data"], r["fold"]) in mean:
            rel.setdefault(r["candidate"], {})[(r["data"], r["fold"])] = (
                r["rmse"] / mean[(r["data"], r["fold"])])
    full = {c: float(np.mean(list(v.values()))) for c, v in rel.items() if len(v) == len(mean)}
    if not full:
        raise SystemExit("no regression candidate has been scored on every fold")
    return min(full, key=full.get)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("classify", "regress"), default="classify")
    p.add_argument("--datasets", default="", help="default: every offline set of the task")
    p.add_argument("--candidates", default="", help="default: every candidate of the task")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0, help="override every candidate's epochs")
    p.add_argument("--fit", action="store_true")
    p.add_argument("--jsonl", type=Path, default=JSONL)
    p.add_argument("--table", action="store_true")
    p.add_argument("--best-regress", action="store_true",
                   help="print the CLI flags of the regression candidate with the lowest mean "
                   "over datasets of its CV RMSE relative to the training mean's")
    a = p.parse_args(argv)
    if a.table:
        print(table(a.jsonl, a.seed, [c for c in a.candidates.split(",") if c]))
        return 0
    if a.best_regress:
        print(" ".join(REGRESS_FLAGS[best_regress(a.jsonl, a.seed)]))
        return 0
    known = REGRESS if a.task == "regress" else CANDIDATES
    cands = [c for c in a.candidates.split(",") if c] or list(known)
    bad = [c for c in cands if c not in known]
    if bad:
        p.error(f"--candidates: unknown {bad}, expected any of {', '.join(known)}")
    sets = [d for d in a.datasets.split(",") if d] or list(
        REGRESS_DATASETS if a.task == "regress" else DATASETS)
    run(a.task, sets, cands, a.folds, a.seed, a.fit, a.jsonl, a.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
