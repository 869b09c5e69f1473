"""Rank sentiment recipes on one validation share of fine_food's training split (split seed
0; the test split is not read for the ranking): each recipe trained with the given init seeds,
printing, one JSON line each, the validation accuracy of the kept epoch, every epoch's, the CPU
seconds, and for each recipe the mean and spread over seeds and the accuracy of the seeds'
averaged logits (an ensemble of seeds). Runs go to /tmp/gyre-sentiment-select.

    OMP_NUM_THREADS=1 python benchmarks/sentiment_select.py '[{"name": "default"}, \
        {"name": "E128H128", "embed": 128, "hidden": 128}]' '[0, 1, 2]' t1

``gyre train sentiment`` splits with ``--seed``; here the split is held at seed 0 (by
replacing the task module's ``validation_split``) so that the seeds vary the initialisation
only and share one validation share."""

import csv
import dataclasses
import json
import sys
import time

import numpy as np
import torch

from gyre import text as gtext
from gyre.data import text as tdata
from gyre.tasks import sentiment as S

OUT = "/tmp/gyre-sentiment-select"


def val_logits(run: str, texts: list[str]) -> torch.Tensor:
    cfg, model, tok, _ = S.load_run(run)
    ids = S.encode(tok, texts, cfg.max_tokens, True, "data")
    with torch.no_grad():
        return torch.cat([model(x, lengths=n)[0] for x, n in
                          (gtext.pad_batch(ids[s:s + 128]) for s in range(0, len(ids), 128))])


def main() -> None:
    torch.set_num_threads(1)
    orig = S.validation_split
    S.validation_split = lambda y, f, seed: orig(y, f, 0)  # one validation share for all seeds
    data = tdata.load_sentiment("fine_food")
    tr, va = orig(data.y_train, 0.1, 0)
    yv, texts = data.y_train[va], [data.train_texts[i] for i in va]
    specs, seeds, tag = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    # the baseline on the same share, for scale (the task's own TF-IDF + LR, scored on it)
    fit = [data.train_texts[i] for i in tr]
    shared = dataclasses.replace(data, test_texts=texts, y_test=yv)
    print(json.dumps({"tag": tag, "baselines_on_validation": {
        k: v["accuracy"] for k, v in S.baselines(shared, data.y_train[tr], fit).items()}}),
        flush=True)
    for spec in specs:
        name = spec.pop("name")
        logits, accs = [], []
        for seed in seeds:
            cfg = S.Config(seed=seed, out=f"{OUT}/{tag}-{name}-{seed}", progress=False,
                           tensorboard=False, **spec)
            t0 = time.process_time()
            m = S.train(cfg)
            cpu = time.process_time() - t0
            rows = list(csv.DictReader(open(f"{cfg.out}/log.csv")))
            z = val_logits(cfg.out, texts)
            logits.append(z)
            acc = float(((z > 0).long().numpy() == yv).mean())  # two classes: one logit
            accs.append(acc)
            best = m["train"]["best_epoch"]
            print(json.dumps({"tag": tag, "name": name, "seed": seed, "best_epoch": best,
                              "val_acc": acc, "val_loss": float(rows[best - 1]["val_loss"]),
                              "cpu_s": round(cpu, 1),
                              "epoch_cpu_s": [e["cpu_s"] for e in m["train"]["epoch_times"]],
                              "epoch_accs": [round(float(r["val_accuracy"]), 4) for r in rows]}),
                  flush=True)
        ens = torch.stack(logits).mean(0)
        print(json.dumps({"tag": tag, "name": name, "SUMMARY": True,
                          "single_mean": round(float(np.mean(accs)), 4),
                          "single_sd": round(float(np.std(accs, ddof=1)), 4) if len(accs) > 1 else 0,
                          f"ens{len(seeds)}_of_seeds": float(((ens > 0).long().numpy() == yv).mean())}),
              flush=True)


if __name__ == "__main__":
    main()
