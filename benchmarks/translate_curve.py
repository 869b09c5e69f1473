"""Validation curve of a translation recipe on gettext_fr, one thread: the first ``nval``
validation sentences decoded greedily after every epoch, beside copy-source and the TF-IDF
translation memory scored on the same sentences (validation only; the test split is not read).
Batches bucketed by length as ``gyre train translate`` does; training CPU seconds exclude the
evaluations.

    OMP_NUM_THREADS=1 python benchmarks/translate_curve.py '{"epochs": 8, "hidden": 128,
        "embed": 128, "bs": 64, "onecycle": true, "lr": 3e-3}'

JSON options: epochs, bs, lr, onecycle, ls (label smoothing), vocab, embed, hidden, cell, attn,
copy, dropout, bucket, maxlen (drop longer training pairs), nval, seed, cpu (stop after the
epoch that passes this many training CPU seconds), memory (true: the task's ``--memory
nearest``, the source followed by EOS and the target of its TF-IDF nearest other training
source, :class:`gyre.tasks.translate.TranslationMemory`).
"""

import json
import math
import random
import sys
import time

import torch

from gyre import text as gt
from gyre.data import text as td
from gyre.tasks import translate as T


def batches_of(train, bs: int, bucket: bool, rng: random.Random) -> list[list[int]]:
    idx = list(range(len(train)))
    rng.shuffle(idx)
    if not bucket:
        return [idx[j:j + bs] for j in range(0, len(idx), bs)]
    out = []
    for c in range(0, len(idx), bs * 50):
        ch = sorted(idx[c:c + bs * 50], key=lambda i: (len(train[i][1]), len(train[i][0])))
        out += [ch[j:j + bs] for j in range(0, len(ch), bs)]
    rng.shuffle(out)
    return out


def main(a: dict) -> None:
    torch.set_num_threads(1)
    data = td.load_pairs("gettext_fr")
    pairs, val = data.train, data.val[:a.get("nval", 200)]
    tok = gt.fit_tokenizer("sentencepiece", [s for s, _ in pairs] + [t for _, t in pairs],
                           vocab_size=a.get("vocab", 1000))
    sources, refs = [s for s, _ in val], [r for _, r in val]
    tgt_ids = [tok.encode(t) for _, t in pairs]
    src_ids = [tok.encode(s) for s, _ in pairs]
    val_src = [tok.encode(s) for s in sources]
    if a.get("memory", False):
        cfg, tm = T.Config(memory="nearest"), T.TranslationMemory(pairs)
        src_ids = T.model_inputs(cfg, tok, tm, [s for s, _ in pairs], "data", exclude_self=True)
        val_src = T.model_inputs(cfg, tok, tm, sources, "data")
    ml = a.get("maxlen", 0)
    train = [(s, t) for s, t in zip(src_ids, tgt_ids, strict=True)
             if not ml or (len(s) <= ml and len(t) <= ml)]
    print(json.dumps(a), "n", len(train), "copy", T.score(sources, refs)[0],
          "tm", T.score(T.translation_memory(pairs, sources), refs)[0], flush=True)
    torch.manual_seed(a.get("seed", 0))
    m = T.Seq2Seq(tok.vocab_size, tok.vocab_size, a.get("cell", "gru"), a.get("embed", 64),
                  a.get("hidden", 64), 1, True, a.get("dropout", 0.1), a.get("attn", "bahdanau"),
                  True, a.get("copy", True))
    bs, epochs, lr = a.get("bs", 64), a.get("epochs", 10), a.get("lr", 3e-3)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, lr, total_steps=math.ceil(len(train) / bs) * epochs) if a.get("onecycle") else None
    rng = random.Random(0)
    t0, step, eval_cpu = time.process_time(), 0, 0.0
    for ep in range(epochs):
        batches, total = batches_of(train, bs, a.get("bucket", True), rng), 0.0
        for bi in batches:
            b = T.collate([train[i] for i in bi])
            logits, _ = m(b["x"], lengths=b["lengths"])
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), b["y"].reshape(-1),
                ignore_index=gt.PAD, label_smoothing=a.get("ls", 0.0))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            if sched is not None:
                sched.step()
            total, step = total + float(loss.detach()), step + 1
        te = time.process_time()
        m.eval()
        hyps = [tok.decode(T.greedy(m, s)[0]) for s in val_src]
        m.train()
        eval_cpu += time.process_time() - te
        cpu = time.process_time() - t0 - eval_cpu
        print("epoch", ep + 1, "step", step, "loss", round(total / len(batches), 3),
              T.score(hyps, refs)[0], "train cpu s", round(cpu, 1), repr(hyps[1]), flush=True)
        if cpu > a.get("cpu", math.inf):
            break


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
