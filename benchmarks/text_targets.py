"""The text targets' table: ``gyre train sentiment`` or ``gyre train lm`` with its defaults
(plus any flags after ``--``), seeds 0..N-1, every run in this process through the CLI's own
parser, each timed (wall and this process's CPU seconds, per epoch too), beside the baselines
the same run computes (sentiment: majority, TF-IDF + logistic regression; lm: unigram,
Kneser-Ney 5-gram). The validation score of the kept epoch is recorded beside the test score.

Results go to ``--jsonl`` line by line (an interrupted table resumes: a (task, seed, flags) row
already there is not rerun); ``--table`` prints the Markdown table of what is there.

    python benchmarks/text_targets.py --task sentiment --seeds 3
    python benchmarks/text_targets.py --task lm --seeds 1
    python benchmarks/text_targets.py --task sentiment --seeds 3 -- --ensemble 3
    python benchmarks/text_targets.py --table
    python benchmarks/text_targets.py --task lm --seeds 3 --from-seed 2   # seed 2 only
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JSONL = Path(__file__).parent / "results" / "issue12" / "text_targets.jsonl"
#: (test metric, baselines, validation column of log.csv) per task
KEYS = {"sentiment": ("accuracy", ("majority", "tfidf_logreg"), "val_accuracy"),
        "lm": ("bits_per_char", ("unigram", "kneser_ney_5gram_char"), "val_bits_per_char")}


def run(task: str, seeds: int, jsonl: Path, extra: list[str], threads: int,
        first: int = 0) -> None:
    import torch

    from gyre import cli
    torch.set_num_threads(threads)
    done = set()
    if jsonl.is_file():
        done = {(r["task"], r["seed"], tuple(r["flags"])) for r in map(json.loads, jsonl.open())}
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    metric, _, val_key = KEYS[task]
    for seed in range(first, seeds):
        if (task, seed, tuple(extra)) in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            args = ["train", task, *extra, "--seed", str(seed), "--out", str(out),
                    "--no-progress", "--no-tensorboard"]
            t0, c0 = time.perf_counter(), time.process_time()
            rc = cli.main(args)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if rc != 0:
                raise SystemExit(f"gyre {' '.join(args)} exited {rc}")
            m = json.loads((out / "metrics.json").read_text())
            log = list(csv.DictReader((out / "log.csv").open()))
        best = m["train"]["best_epoch"]
        row = {"task": task, "seed": seed, "flags": extra, "model": m["model"],
               "test": m["test"], "baselines": m["baselines"],
               **({"dynamic": m["dynamic"]} if "dynamic" in m else {}),
               "val_kept_epoch": float(log[best - 1][val_key]) if best else None,
               "val_by_epoch": [round(float(r[val_key]), 4) for r in log],
               "epoch_times": m["train"]["epoch_times"], "wall_s": round(wall, 1),
               "cpu_s": round(cpu, 1), "threads": threads}
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{task} seed {seed}: test {metric} {m['test'][metric]:.4f}, val "
              f"{row['val_kept_epoch']}, cpu {cpu:.0f} s", flush=True)


def table(jsonl: Path) -> str:
    rows = [json.loads(ln) for ln in jsonl.open()] if jsonl.is_file() else []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], tuple(r["flags"])), []).append(r)
    lines = ["| task | flags | seeds | val (kept epoch) | test | dynamic eval (lm) | "
             "baselines (same runs) | CPU s a run | CPU s an epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (task, flags), rs in groups.items():
        metric, base, _ = KEYS[task]
        ms = lambda xs: f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.4f}"  # noqa: E731
        bl = ", ".join(f"{b} {ms([r['baselines'][b][metric] for r in rs])}" for b in base)
        ep = [e["cpu_s"] for r in rs for e in r["epoch_times"]]
        dyn = [r["dynamic"] for r in rs if (r.get("dynamic") or {}).get("test")]
        lrs = ", ".join(sorted({f"{d['lr']:g}" for d in dyn}))
        dyn_cell = (f"{metric} {ms([d['test'][metric] for d in dyn])} (lr {lrs}; "
                    f"{len(dyn)} runs)") if dyn else "-"
        lines.append(f"| {task} | {' '.join(flags) or '(defaults)'} | {len(rs)} | "
                     f"{ms([r['val_kept_epoch'] for r in rs])} | "
                     f"{metric} {ms([r['test'][metric] for r in rs])} | {dyn_cell} | {bl} | "
                     f"{np.mean([r['cpu_s'] for r in rs]):.0f} | {np.mean(ep):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(KEYS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--from-seed", type=int, default=0,
                   help="the first seed (two processes can share --seeds N between them)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", type=Path, default=JSONL)
    p.add_argument("--table", action="store_true", help="print the table of --jsonl and stop")
    a = p.parse_args(argv)
    if a.table or not a.task:
        print(table(a.jsonl))
        return 0
    run(a.task, a.seeds, a.jsonl, extra, a.threads, a.from_seed)
    print(table(a.jsonl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
