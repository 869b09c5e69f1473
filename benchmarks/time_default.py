"""Time the default command ``gyre train classify --data NAME`` (nothing else but a scratch
``--out`` and ``--no-progress``) end to end, each in its own process, as a user runs it: wall
seconds from start to exit, and the user + system CPU seconds of that process and its children
(the baseline worker). The issue's target: at most 60 s wall on every offline set.

Writes ``benchmarks/results/issue15/time_default.json`` (one entry per run, with the test
accuracy and baselines from the run's metrics.json). Each run is bounded by ``--timeout``.

    .venv/bin/python benchmarks/time_default.py --datasets acsf1,osuleaf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "issue15" / "time_default.json"


def time_one(name: str, timeout: float, extra: list[str]) -> dict:
    gyre = Path(sys.executable).with_name("gyre")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [str(gyre), "train", "classify", "--data", name, "--out", str(run),
               "--no-progress", *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rec = {"data": name, "command": " ".join(["gyre", *cmd[1:5], *extra]),
               "returncode": rc, "wall_seconds": round(wall, 1),
               "cpu_seconds": round(after.ru_utime - before.ru_utime
                                    + after.ru_stime - before.ru_stime, 1),
               "cpus": os.cpu_count(), "load_average_before": None}
        metrics = run / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            rec.update(model=m["model"], accuracy=m["test"]["accuracy"],
                       train_seconds=m["train"]["seconds"],
                       baselines={k: v["accuracy"] for k, v in m["baselines"].items()})
        return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="acsf1,osuleaf")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per run")
    p.add_argument("--out", type=Path, default=OUT)
    a, extra = p.parse_known_args(argv)
    recs = []
    for name in a.datasets.split(","):
        load = os.getloadavg()[0]
        rec = time_one(name, a.timeout, extra)
        rec["load_average_before"] = round(load, 2)
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(recs, indent=1) + "\n")
    return 0 if all(r["returncode"] == 0 for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
