"""What the TF-IDF translation memory is worth by retrieval cosine, with no network: the
validation sentences of ``gettext_fr`` (split seed ``seed``) in each band of their nearest
training source's cosine, scored with the memory's target and with the source copied, and how
many retrieved targets equal the reference. Seconds of CPU.

    .venv/bin/python benchmarks/translate_memory_bands.py '{"seed": 0}'
"""

import json
import sys

from gyre.data import text as td
from gyre.tasks import translate as T

EDGES = (0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1 - 1e-9, 2)


def main(a: dict) -> list[dict]:
    p = td.load_pairs(a.get("data", "gettext_fr"), a.get("seed", 0))
    tm = T.TranslationMemory(p.train)
    srcs, refs = [s for s, _ in p.val], [t for _, t in p.val]
    near, cos = tm.lookup(srcs)
    mem = [tm.pairs[j][1] for j in near]
    rows = []
    for lo, hi in [*zip(EDGES, EDGES[1:], strict=False), (0, 2)]:
        idx = [i for i, c in enumerate(cos) if lo <= c < hi]
        if idx:
            rows.append({"cos": [lo, hi], "n": len(idx),
                         "memory": T.score([mem[i] for i in idx], [refs[i] for i in idx])[0],
                         "copy_source": T.score([srcs[i] for i in idx], [refs[i] for i in idx])[0],
                         "memory_is_reference": sum(mem[i] == refs[i] for i in idx)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
