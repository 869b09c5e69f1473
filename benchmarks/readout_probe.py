"""Would a linear read-out fitted on the trained network's pooled features generalise better
than the network's own output layer? One default ``gyre train classify`` run per stratified
fold of a training split (the folds of ``select_classify.py``; the test split is never read),
then ridge (``RidgeClassifierCV``, alphas 1e-3..1e3) and logistic regression (C = 0.1) fitted
on the training fold's features (standardised) and scored on the held-out fold: on all the
features the output layer sees, on the recurrent part only and on the fused front-end mean
only. Prints one JSON line per fold (accuracies).

    OMP_NUM_THREADS=1 python benchmarks/readout_probe.py --data arrow_head --folds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="arrow_head")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--max-folds", type=int, default=0, help="stop after this many (0: all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch
    from sklearn.linear_model import LogisticRegression, RidgeClassifierCV

    from gyre.data import classification as cd
    from gyre.tasks import classify
    sys.path.insert(0, str(Path(__file__).parent))
    from select_classify import folds
    torch.set_num_threads(1)
    data = cd.load_aeon(a.data)
    for i, fold in folds(data, a.folds, a.seed, False, False):
        if a.max_folds and i >= a.max_folds:
            break
        with tempfile.TemporaryDirectory() as tmp:
            m = classify.train(classify.Config(data=a.data, out=tmp, seed=a.seed,
                                               minirocket=False, dtw=False, progress=False,
                                               tensorboard=False, device="cpu"), data=fold)
            _, model, extra = classify.load_run(tmp)
        scaler = cd.Standardizer.from_state(extra["scaler"])
        seen: list = []
        hook = model.fc.register_forward_hook(
            lambda mod, inp, out, seen=seen: seen.append(inp[0]))
        with torch.no_grad():
            net = classify._logits(model, scaler(fold.X_test)).argmax(1).numpy()
            f_te = torch.cat(seen).numpy()
            seen.clear()
            classify._logits(model, scaler(fold.X_train))
            f_tr = torch.cat(seen).numpy()
        hook.remove()
        rec = {"data": a.data, "fold": i, "seed": a.seed, "n_test": len(fold.y_test),
               "net": float((net == fold.y_test).mean()), "reported": m["test"]["accuracy"]}
        split = f_tr.shape[1] - model.front.out_channels  # [recurrent | fused front-end mean]
        for part, cols in (("all", slice(None)), ("rnn", slice(0, split)),
                           ("conv", slice(split, None))):
            tr, te = f_tr[:, cols], f_te[:, cols]
            mu, sd = tr.mean(0), tr.std(0) + 1e-6
            tr, te = (tr - mu) / sd, (te - mu) / sd
            for name, clf in (("ridge", RidgeClassifierCV(alphas=np.logspace(-3, 3, 10))),
                              ("logreg", LogisticRegression(C=0.1, max_iter=2000))):
                pred = clf.fit(tr, fold.y_train).predict(te)
                rec[f"{name}_{part}"] = float((pred == fold.y_test).mean())
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
