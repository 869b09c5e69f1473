"""Choosing a forecasting recipe on validation origins only (RESULTS.md, issue 16).

    .venv/bin/python benchmarks/forecast_selection.py TAG 'field=value;field=value' DATA...

Every series of each data set is cut before its test part (its last ``horizon`` points are
dropped before anything reads them) and the whole ``gyre train forecast`` pipeline runs on
the rest with the given ``forecast.Config`` fields (the defaults otherwise, seed 0). The
"test" score of that run is the forecast from the validation origin just before the real test
part: what a recipe is chosen on. One JSON line per data set is printed and appended to
``forecast_selection.jsonl``: the validation MASE and 80% coverage and the baselines' MASE at
the same origin. Runs go to ``runs/selection-TAG-DATA``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

from gyre.tasks import forecast as F


def _cut(load):
    def cut_load(config, data=None, future_rows=0):
        ss = load(config, data, future_rows)
        h = config.horizon or ss.horizon
        return dataclasses.replace(ss, series=tuple(s[:-h] for s in ss.series),
                                   index=tuple(i[:-h] for i in ss.index))
    return cut_load


def _fields(spec: str) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(F.Config)}
    kw = {}
    for part in filter(None, spec.split(";")):
        k, v = part.split("=", 1)
        t = types[k]
        kw[k] = (int(v) if t == "int" else float(v) if t == "float" else v in ("1", "true")
                 if t == "bool" else v.split(",") if t.startswith("list") else v)
    return kw


def main(argv) -> None:
    torch.set_num_threads(1)
    tag, spec, *datasets = argv
    F._load = _cut(F._load)
    kw = _fields(spec)
    for data in datasets:
        t = time.time()
        name = os.path.splitext(os.path.basename(data))[0]
        m = F.train(F.Config(data=data, seed=0, out=f"runs/selection-{tag}-{name}",
                             progress=False, tensorboard=False, **kw))
        rec = {"tag": tag, "spec": spec, "data": name, "sec": round(time.time() - t),
               "val_mase": m["test"]["mase"], "val_coverage_80": m["test"].get("coverage_80"),
               "baselines": {k: v["mase"] for k, v in m["baselines"].items()}}
        print(json.dumps(rec), flush=True)
        with open("forecast_selection.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
