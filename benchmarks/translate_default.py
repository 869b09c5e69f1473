"""The default ``gyre train translate --data gettext_fr`` run, one thread, once per seed: test
BLEU/chrF with beam 1 and beam 5 beside copy-source and the TF-IDF translation memory (both
scored in the same run), process CPU seconds and wall seconds per seed, the mean and spread
over the seeds. Writes ``benchmarks/results/translate_gettext_fr.json``.

With ``"val": N`` (N > 0) each trained run also decodes its first N validation sentences greedily
(N = -1: all of them), scored beside both baselines on the same sentences and, separately, on
the first 200 (``translate_curve.py``'s subset): the figures a recipe is chosen by. The
validation decoding runs after the training and is not in ``cpu_s``/``wall_s``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/translate_default.py '{"seeds": [0]}'

JSON options: seeds (default [0]), out (the JSON path), val (default 0), and any ``translate.Config`` field
(``{"data": "pairs.tsv", "epochs": 1}`` for a quick check of the script itself).
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gyre.data import text as td
from gyre.tasks import translate as T


def val_scores(out: str, data: str, seed: int, n: int) -> dict:
    """Greedy BLEU/chrF of the run on its first ``n`` validation sentences (-1: all) and on the
    first 200, beside copy-source and the TF-IDF memory on the same sentences."""
    pairs = td.load_pairs(data, seed)
    val = pairs.val if n < 0 else pairs.val[:n]
    hyps = T.translate(out, [s for s, _ in val], beam=1)
    tm = T.TranslationMemory(pairs.train)
    res = {}
    for name, k in (("all", len(val)), ("first200", min(200, len(val)))):
        src, ref = [s for s, _ in val[:k]], [t for _, t in val[:k]]
        res[name] = {"n": k, "greedy": T.score(hyps[:k], ref)[0],
                     "copy_source": T.score(src, ref)[0],
                     "tfidf_memory": T.score(tm.targets(src), ref)[0]}
    return res


def main(a: dict) -> None:
    torch.set_num_threads(1)
    seeds = a.pop("seeds", [0])
    nval = a.pop("val", 0)
    path = Path(a.pop("out", "benchmarks/results/translate_gettext_fr.json"))
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as d:
            cpu, wall = time.process_time(), time.perf_counter()
            m = T.train(T.Config(**{"progress": False, "tensorboard": False, "device": "cpu",
                                    **a, "seed": seed, "out": d}))
            runs.append({"seed": seed, "by_beam": m["by_beam"], "baselines": m["baselines"],
                         "signature": m["signature"], "model": m["model"],
                         "cpu_s": round(time.process_time() - cpu, 1),
                         "wall_s": round(time.perf_counter() - wall, 1), "train": m["train"]})
            runs[-1]["log"] = (Path(d) / "log.csv").read_text().splitlines()
            if nval:
                runs[-1]["val"] = val_scores(d, a.get("data", "gettext_fr"), seed, nval)
        print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for k in sorted({k for r in runs for k in r["by_beam"]}):
        for metric in ("bleu", "chrf"):
            v = [r["by_beam"][k][metric] for r in runs]
            summary[f"beam{k}_{metric}"] = {"mean": statistics.fmean(v), "min": min(v),
                                             "max": max(v)}
    for b in ("copy_source", "tfidf_memory"):
        for metric in ("bleu", "chrf"):
            summary[f"{b}_{metric}"] = statistics.fmean(r["baselines"][b][metric] for r in runs)
    summary["max_wall_s"] = max(r["wall_s"] for r in runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": a, "seeds": seeds, "summary": summary, "runs": runs},
                               indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
