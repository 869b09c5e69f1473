"""The ``memory_copy`` threshold of a translate run, chosen on validation, and its test score.

Reads what ``translate_default.py '{"val": -1, "keep": DIR, ...}'`` wrote for a run trained with
``memory_copy`` off (the network translates every sentence): the validation scores by threshold
(``by_tau``) and the run's test translations (``DIR/seed<N>/translations.jsonl``). Chooses, on
validation only, the threshold whose greedy translations are furthest above the TF-IDF memory on
the worse of the two metrics (``min(BLEU - memory BLEU, chrF - memory chrF)``), then scores the
test split with that threshold for every beam the run decoded: the retrieved target where the
nearest training source's cosine reaches it, the network's translation elsewhere; this equals
what ``gyre train translate --memory-copy TAU`` reports, which decodes the same network on the
remaining sentences. Baselines are rescored on the same sentences.

    .venv/bin/python benchmarks/translate_memory_copy.py RESULT.json KEEP_DIR [OUT.json]
"""

import json
import sys
from pathlib import Path

from gyre.data import text as td
from gyre.tasks import translate as T


def choose(val: dict, beam: str = "1") -> tuple[float, list[dict]]:
    """The threshold of ``val["by_tau"][beam]`` with the largest worse-metric margin over the
    memory, and the table of every threshold (ties: the first, i.e. the lowest, in the grid)."""
    mem = val["all"]["tfidf_memory"]
    rows = [{"tau": float(t), **s, "margin": min(s["bleu"] - mem["bleu"], s["chrf"] - mem["chrf"])}
            for t, s in val["by_tau"][beam].items()]
    return max(rows, key=lambda r: r["margin"])["tau"], rows


def main(result: str, keep: str, out: str | None = None) -> dict:
    report = []
    res = json.loads(Path(result).read_text())
    data = res["config"].get("data", "gettext_fr")
    for run in res["runs"]:
        seed = run["seed"]
        tau, table = choose(run["val"])
        pairs = td.load_pairs(data, seed)
        lines = [json.loads(x) for x in
                 (Path(keep) / f"seed{seed}" / "translations.jsonl").read_text().splitlines()]
        srcs, refs = [x["source"] for x in lines], [x["reference"] for x in lines]
        if srcs != [s for s, _ in pairs.test]:
            raise ValueError(f"keep: {keep!r}'s seed {seed} translations are not the test split "
                             f"of {data!r} with seed {seed}")
        tm = T.TranslationMemory(pairs.train)
        near, cos = tm.lookup(srcs)
        mem = [tm.pairs[j][1] for j in near]
        test = {"n_copied": sum(c >= tau for c in cos)}
        for b in sorted(k[4:] for k in lines[0] if k.startswith("beam")):
            test[f"beam{b}"] = T.score([m if c >= tau else x[f"beam{b}"]
                                        for x, m, c in zip(lines, mem, cos, strict=True)], refs)[0]
            test[f"beam{b}_network"] = run["by_beam"][b]
        test["copy_source"] = T.score(srcs, refs)[0]
        test["tfidf_memory"] = T.score(mem, refs)[0]
        report.append({"seed": seed, "tau": tau, "val_by_tau": table, "test": test})
        print(json.dumps(report[-1], indent=1), flush=True)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return {"runs": report}


if __name__ == "__main__":
    main(*sys.argv[1:])
