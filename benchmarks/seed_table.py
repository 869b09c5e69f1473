"""The test table of the default recipe: ``gyre train classify`` (or ``regress``) with its
defaults on every offline set, seeds 0..N-1 (configs built by the CLI's own parser, runs in this
process), each run timed (wall and this process's CPU seconds), with the baselines every run
computes (classify: MiniRocket, 1-NN DTW, majority; regress: training
mean, MiniRocket + ridge).

1-NN DTW is deterministic, so only the seed-0 run computes it (``--no-dtw`` for the other seeds,
to spare the shared machine); the wall time column is the seed-0 run's, the default command.
Results go to ``--jsonl`` line by line (an interrupted table resumes); ``--table`` prints the
Markdown table of what is there.

    python benchmarks/seed_table.py --task classify --seeds 3
    python benchmarks/seed_table.py --task classify --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import runlog

#: config fields that do not change the recipe (where, which set, which seed, what is printed)
NOT_RECIPE = ("data", "out", "seed", "progress", "tensorboard", "dtw", "device")
#: fields added after runs were recorded, left out at the value that reproduces those runs
#: (so earlier tables keep their recipe key)
ADDED = {"log_input": False}


def recipe(config) -> str:
    """The run's recipe as compact JSON: every config field but :data:`NOT_RECIPE`, so a
    table keeps apart runs of different defaults made with the same flags."""
    from dataclasses import asdict
    return json.dumps({k: v for k, v in sorted(asdict(config).items())
                       if k not in NOT_RECIPE and not (k in ADDED and v == ADDED[k])},
                      separators=(",", ":"))


def default_recipe(task: str, extra: list[str]) -> str:
    """The recipe the flags ``extra`` give with today's defaults."""
    from gyre import cli
    from gyre.tasks import classify, regress
    mod = classify if task == "classify" else regress
    return recipe(cli._build_config(task, mod, ["--data", CLASSIFY[0] if task == "classify"
                                                else REGRESS[0], *extra])[0])


CLASSIFY = ("italy_power_demand", "gunpoint", "japanese_vowels", "basic_motions", "arrow_head",
            "pickup_gesture_wiimoteZ", "osuleaf", "acsf1")
REGRESS = ("covid_3month", "cardano_sentiment")
JSONL = Path(__file__).parent / "results" / "issue15" / "seed_table.jsonl"


def run(task: str, datasets, seeds: int, jsonl: Path, extra: list[str]) -> None:
    """Every run in this process (``gyre train``'s own code path, config from the CLI's
    parser), so the shared machine is spared a start-up per run."""
    import torch

    from gyre import cli
    from gyre.tasks import classify, regress
    torch.set_num_threads(1)
    mod = classify if task == "classify" else regress
    done = runlog.done(jsonl, lambda r: (r["task"], r["data"], r["seed"], r.get("recipe")))
    for name in datasets:
        for seed in range(seeds):
            args = list(extra) + (["--no-dtw"] if task == "classify" and seed else [])
            argv = ["--data", name, "--seed", str(seed), "--no-progress", "--threads", "1",
                    *args]
            config, _ = cli._build_config(task, mod, argv)
            rec_ = recipe(config)
            if (task, name, seed, rec_) in done:
                continue
            # a claim per run, so two tables run side by side (--reverse) never repeat one
            tag = hashlib.sha1(rec_.encode()).hexdigest()[:12]
            if not runlog.claim(jsonl, f"{task}-{name}-{seed}-{tag}"):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                config, _ = cli._build_config(task, mod, [*argv, "--out", str(Path(tmp) / "run")])
                start, cpu = time.perf_counter(), time.process_time()
                m = mod.train(config)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            rec = {"task": task, "data": name, "seed": seed, "args": args, "recipe": rec_,
                   "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                   "train_seconds": m["train"]["seconds"],
                   "final_train_loss": m["train"]["final_train_loss"], "model": m["model"],
                   "test": m["test"], "baselines": m["baselines"]}
            runlog.append(jsonl, rec)
            print(json.dumps(rec), flush=True)


def _ms(values, scale=1.0, fmt="{:.1f}"):
    v = np.asarray(values, float) * scale
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def _times(s0: list) -> str:
    return f"{s0[0]['cpu_seconds']:.0f} / {s0[0]['wall_seconds']:.0f}" if s0 else "-"


def table(jsonl: Path, task: str, extra: list[str], old: bool = False) -> str:
    """The Markdown table of the runs of the recipe ``extra`` gives with today's defaults
    (``old``: of the runs recorded before recipes were, made with the flags ``extra``)."""
    rows: dict[str, list] = {}
    want = None if old else default_recipe(task, extra)
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        same = ([a for a in r["args"] if a != "--no-dtw"] == extra) if old else True
        if r["task"] == task and r.get("recipe") == want and same:
            rows.setdefault(r["data"], []).append(r)
    out = []
    if task == "classify":
        out.append("| dataset | gyre default (seeds) | MiniRocket | 1-NN DTW | majority | "
                   "max final train loss | CPU s / wall s (seed 0) |")
        out.append("|---|---|---|---|---|---|---|")
        for d in CLASSIFY:
            rs = sorted(rows.get(d, []), key=lambda r: r["seed"])
            if not rs:
                continue
            acc = [r["test"]["accuracy"] for r in rs]
            mr = [r["baselines"]["minirocket"]["accuracy"] for r in rs]
            dtw = [r["baselines"]["1nn_dtw"]["accuracy"] for r in rs
                   if "1nn_dtw" in r["baselines"]]
            s0 = [r for r in rs if r["seed"] == 0]
            out.append(
                f"| {d} | {_ms(acc, 100)} ({len(rs)}) | {_ms(mr, 100)} | "
                f"{_ms(dtw, 100) if dtw else '-'} | "
                f"{100 * rs[0]['baselines']['majority']['accuracy']:.1f} | "
                f"{max(r['final_train_loss'] for r in rs):.3f} | "
                f"{_times(s0)} |")
    else:
        out.append("| dataset | gyre default RMSE (seeds) | training mean RMSE | "
                   "MiniRocket + ridge RMSE | gyre MAE | gyre R^2 | CPU s / wall s (seed 0) |")
        out.append("|---|---|---|---|---|---|---|")
        for d in REGRESS:
            rs = sorted(rows.get(d, []), key=lambda r: r["seed"])
            if not rs:
                continue
            f4 = "{:.4f}"
            s0 = [r for r in rs if r["seed"] == 0]
            out.append(
                f"| {d} | {_ms([r['test']['rmse'] for r in rs], fmt=f4)} ({len(rs)}) | "
                f"{_ms([r['baselines']['train_mean']['rmse'] for r in rs][:1], fmt=f4)} | "
                f"{_ms([r['baselines']['minirocket_ridge']['rmse'] for r in rs], fmt=f4)} | "
                f"{_ms([r['test']['mae'] for r in rs], fmt=f4)} | "
                f"{_ms([r['test']['r2'] for r in rs], fmt='{:.3f}')} | {_times(s0)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("classify", "regress"), default="classify")
    p.add_argument("--datasets", default="")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jsonl", type=Path, default=JSONL)
    p.add_argument("--table", action="store_true")
    p.add_argument("--reverse", action="store_true", help="datasets in reverse order")
    p.add_argument("--old", action="store_true", help="--table of the runs recorded before "
                   "the recipe was (earlier defaults)")
    a, extra = p.parse_known_args(argv)
    if a.table:
        print(table(a.jsonl, a.task, extra, a.old))
        return 0
    sets = [d for d in a.datasets.split(",") if d] or list(
        CLASSIFY if a.task == "classify" else REGRESS)
    run(a.task, sets[::-1] if a.reverse else sets, a.seeds, a.jsonl, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
