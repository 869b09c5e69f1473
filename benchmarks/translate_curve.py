"""Learning curve of gyre's translation model on gettext_fr: greedy BLEU/chrF on the first
validation sentences every few steps, beside copy-source and the TF-IDF translation memory
scored on the same sentences (validation only; the test split is not read). One thread.

    OMP_NUM_THREADS=1 python benchmarks/translate_curve.py '{"steps": 600}'

JSON options: steps, bs, lr, vocab, embed, hidden, cell, attn, copy, dropout, every (keep every
k-th training pair), nval, every_eval.
"""

import json
import random
import sys
import time

import torch

from gyre import text as gt
from gyre.data import text as td
from gyre.tasks import translate as T


def main(a: dict) -> None:
    torch.set_num_threads(1)
    p = td.load_pairs("gettext_fr")
    pairs = p.train[::a.get("every", 1)]
    V = a.get("vocab", 1000)
    tok = gt.fit_tokenizer("sentencepiece", [s for s, _ in pairs] + [t for _, t in pairs],
                           vocab_size=V)
    train = [(tok.encode(s), tok.encode(t)) for s, t in pairs]
    val = p.val[:a.get("nval", 60)]
    sources, refs = [s for s, _ in val], [r for _, r in val]
    print("n", len(train), "copy", T.score(sources, refs)[0],
          "tm", T.score(T.translation_memory(pairs, sources), refs)[0], flush=True)
    torch.manual_seed(0)
    m = T.Seq2Seq(tok.vocab_size, tok.vocab_size, a.get("cell", "gru"), a.get("embed", 64),
                  a.get("hidden", 64), 1, True, a.get("dropout", 0.1), a.get("attn", "bahdanau"),
                  True, a.get("copy", True))
    opt = torch.optim.Adam(m.parameters(), lr=a.get("lr", 3e-3))
    rng = random.Random(0)
    t0 = time.process_time()
    for step in range(1, a.get("steps", 400) + 1):
        b = T.collate(rng.sample(train, a.get("bs", 16)))
        logits, _ = m(b["x"], lengths=b["lengths"])
        loss = T.loss_fn(logits, b["y"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if step % a.get("every_eval", 100) == 0:
            m.eval()
            hyps = [tok.decode(T.greedy(m, tok.encode(s))[0]) for s in sources]
            m.train()
            print(step, round(float(loss.detach()), 3), T.score(hyps, refs)[0], "cpu s",
                  round(time.process_time() - t0, 1), repr(hyps[0]), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
