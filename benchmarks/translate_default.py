"""The default ``gyre train translate --data gettext_fr`` run, one thread, once per seed: test
BLEU/chrF with beam 1 and beam 5 beside copy-source and the TF-IDF translation memory (both
scored in the same run), process CPU seconds and wall seconds per seed, the mean and spread
over the seeds. Writes ``benchmarks/results/translate_gettext_fr.json``.

With ``"val": N`` (N > 0) each trained run also decodes its first N validation sentences greedily
(N = -1: all of them), scored beside both baselines on the same sentences and, separately, on
the first 200 (``translate_curve.py``'s subset): the figures a recipe is chosen by. The
validation decoding runs after the training and is not in ``cpu_s``/``wall_s``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/translate_default.py '{"seeds": [0]}'

``"keep": DIR`` keeps each seed's run in ``DIR/seed<N>``. With ``val`` the validation scores
are also given for each beam and each ``memory_copy`` threshold of :data:`TAUS` (the retrieved
target in place of the network's translation where its cosine reaches it), and the sentences;
the threshold with the best greedy margin over the memory on validation is chosen and the test
split scored with it (``memory_copy`` in the run's record; the run itself has it off).

JSON options: seeds (default [0]), out (the JSON path), val (default 0), val_beams (default
[1, beam]: the beams decoded on validation), keep, and any
``translate.Config`` field
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

#: the ``memory_copy`` thresholds scored on validation (those ``memory_copy=0`` chooses from)
TAUS = T.MEMORY_COPY_TAUS


def val_scores(out: str, data: str, seed: int, n: int, beams=(1,)) -> dict:
    """BLEU/chrF of the run's network (``memory_copy`` off) on its first ``n`` validation
    sentences (-1: all) and on the first 200, beside copy-source and the TF-IDF memory on the
    same sentences; on all ``n``, each beam's score with the retrieved target in place of the
    network's where the cosine reaches each of :data:`TAUS` (``by_tau``), and the sentences
    (source, reference, cosine, retrieved target, each beam's translation)."""
    pairs = td.load_pairs(data, seed)
    val = pairs.val if n < 0 else pairs.val[:n]
    config, model, src_tok, tgt_tok, memory = T._load(out)
    srcs, refs = [s for s, _ in val], [t for _, t in val]
    hyps = {k: T._decode_all(model, src_tok, tgt_tok, memory, srcs, config, k, memory_copy=2.0)
            for k in beams}
    tm = T.TranslationMemory(pairs.train)
    near, cos = tm.lookup(srcs)
    mem = [tm.pairs[j][1] for j in near]
    res = {}
    for name, k in (("all", len(val)), ("first200", min(200, len(val)))):
        res[name] = {"n": k, "greedy": T.score(hyps[1][:k], refs[:k])[0] if 1 in hyps else None,
                     "copy_source": T.score(srcs[:k], refs[:k])[0],
                     "tfidf_memory": T.score(mem[:k], refs[:k])[0]}
    res["by_tau"] = {str(b): {str(r.pop("tau")): r
                              for r in T.memory_copy_table(hyps[b], refs, mem, cos, TAUS)}
                     for b in beams}
    res["sentences"] = [{"src": s, "ref": r, "cos": c, "memory": m,
                         **{f"beam{b}": hyps[b][i] for b in beams}}
                        for i, (s, r, c, m) in enumerate(zip(srcs, refs, cos, mem, strict=True))]
    return res


def choose_tau(val: dict, beam: str = "1") -> tuple[float, list[dict]]:
    """The threshold of ``val["by_tau"][beam]`` that ``memory_copy=0`` would choose
    (:func:`gyre.tasks.translate.choose_memory_copy`), and the table of every threshold."""
    rows = [{"tau": float(t), **v} for t, v in val["by_tau"][beam].items()]
    return T.choose_memory_copy(rows), rows


def memory_copy_test(run: dict, d: str, data: str) -> dict:
    """The test split scored with the ``memory_copy`` threshold chosen on the run's validation
    (:func:`choose_tau`, greedy), for every beam the run decoded (``d/translations.jsonl``, the
    network's translations of a run with ``memory_copy`` off): the retrieved target where the
    nearest training source's cosine reaches the threshold, the network's translation elsewhere.
    This is what ``--memory-copy TAU`` reports, which decodes the same network on the rest."""
    tau, _ = choose_tau(run["val"])
    pairs = td.load_pairs(data, run["seed"])
    lines = [json.loads(x) for x in (Path(d) / "translations.jsonl").read_text().splitlines()]
    srcs, refs = [x["source"] for x in lines], [x["reference"] for x in lines]
    if srcs != [s for s, _ in pairs.test]:
        raise ValueError(f"d: {d!r}'s translations.jsonl is not the test split of {data!r} "
                         f"with seed {run['seed']}")
    tm = T.TranslationMemory(pairs.train)
    near, cos = tm.lookup(srcs)
    mem = [tm.pairs[j][1] for j in near]
    out = {"tau": tau, "n_copied": sum(c >= tau for c in cos), "n": len(srcs)}
    for b in run["by_beam"]:
        out[f"beam{b}"] = T.score([m if c >= tau else x[f"beam{b}"]
                                   for x, m, c in zip(lines, mem, cos, strict=True)], refs)[0]
    return out


def main(a: dict) -> None:
    torch.set_num_threads(1)
    seeds = a.pop("seeds", [0])
    nval = a.pop("val", 0)
    keep = a.pop("keep", None)
    val_beams = a.pop("val_beams", sorted({1, a.get("beam", 5)}))
    path = Path(a.pop("out", "benchmarks/results/translate_gettext_fr.json"))
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            d = f"{keep}/seed{seed}" if keep else tmp
            cpu, wall = time.process_time(), time.perf_counter()
            m = T.train(T.Config(**{"progress": False, "tensorboard": False, "device": "cpu",
                                    **a, "seed": seed, "out": d}))
            runs.append({"seed": seed, "by_beam": m["by_beam"], "baselines": m["baselines"],
                         "signature": m["signature"], "model": m["model"],
                         "cpu_s": round(time.process_time() - cpu, 1),
                         "wall_s": round(time.perf_counter() - wall, 1), "train": m["train"]})
            runs[-1]["log"] = (Path(d) / "log.csv").read_text().splitlines()
            if nval:
                runs[-1]["val"] = val_scores(d, a.get("data", "gettext_fr"), seed, nval,
                                             val_beams)
                if a.get("memory_copy", T.Config.memory_copy) > 1 and \
                        a.get("memory", "nearest") != "none":
                    runs[-1]["memory_copy"] = memory_copy_test(runs[-1], d,
                                                               a.get("data", "gettext_fr"))
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
