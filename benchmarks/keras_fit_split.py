"""Where a ``model.fit`` epoch of text 003's model (benchmarks/keras_fit.py) goes, beside the
plain torch.nn loop: the per-epoch fixed cost (``fit``'s epoch outside ``train_step``: the epoch
iterator, callbacks, ``train()``/``eval()``, the metrics' results) and, per step, the forward,
the loss, ``backward``, the optimizer update and the metric updates.

Each part is timed in place (process CPU time, one thread) by a wrapper around it, restored
afterwards: for ``gyre.keras`` (the lean fit with its torch forms, ``gyre.keras._fast``) and
``gyre.keras-ops`` (the lean fit with Keras's own Dense, loss, metrics and optimizer,
``GYRE_KERAS_FAST=0``) the pieces of the lean ``train_step``'s plan; for ``torch.nn`` the same
pieces of the plain loop. Per dataset each round runs ``--epochs`` epochs of every variant, in
an order rotated from round to round; figures are medians over rounds of ms per epoch. The
wrappers cost a few microseconds each, so the totals run slightly above keras_fit.py's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/keras_fit_split.py \
        [--data japanese_vowels,italy_power_demand] [--rounds 5] [--epochs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keras_fit import BATCH, TorchModel, data, keras_model  # noqa: E402

clock = time.process_time
PARTS = ("epoch", "fixed per epoch", "steps", "forward", "loss", "backward", "optimizer",
         "metrics", "rest of step")


def _timed(acc, name, fn):
    def wrapper(*a, **k):
        t0 = clock()
        try:
            return fn(*a, **k)
        finally:
            acc[name] = acc.get(name, 0.0) + clock() - t0
    return wrapper


def keras_epochs(m, X, y, epochs: int, fast: bool) -> dict[str, float]:
    """ms per epoch of each part, over ``epochs`` lean fit epochs of ``m``."""
    import keras

    from gyre.keras import training
    acc: dict[str, float] = {}

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = clock()

        def on_epoch_end(self, epoch, logs=None):
            acc["epoch"] = acc.get("epoch", 0.0) + clock() - self.t0

    plan_init = training._Plan.__init__

    def timed_plan(plan, loss_fn, model):
        plan_init(plan, loss_fn, model)
        plan.loss_fn = _timed(acc, "loss", plan.loss_fn)
        for name, part in (("loss", "loss"), ("metrics", "metrics"), ("apply", "optimizer")):
            if getattr(plan, name) is not None:
                setattr(plan, name, _timed(acc, part, getattr(plan, name)))

    lean_plan = training._LeanTrainer._gyre_lean_plan

    def timed_lean_plan(self):
        plan = lean_plan(self)
        if plan is not None and plan.calls is not None:
            plan.calls = [(_timed(acc, "forward", c), k) for c, k in plan.calls]
        return plan

    objs = [(m._loss_tracker, "update_state", "metrics"), (m.optimizer, "apply", "optimizer"),
            (m._compile_metrics, "update_state", "metrics")]
    saved_step = training._LeanTrainer.__dict__["train_step"]
    saved_backward = torch.Tensor.backward
    old = os.environ.get("GYRE_KERAS_FAST")
    os.environ["GYRE_KERAS_FAST"] = "1" if fast else "0"
    try:
        training._Plan.__init__ = timed_plan
        training._LeanTrainer._gyre_lean_plan = timed_lean_plan
        training._LeanTrainer.train_step = _timed(acc, "steps", saved_step)
        torch.Tensor.backward = _timed(acc, "backward", saved_backward)
        for o, n, label in objs:
            setattr(o, n, _timed(acc, label, getattr(o, n)))
        m.fit(X, y, epochs=epochs, batch_size=BATCH, verbose=0, callbacks=[Epochs()])
    finally:
        training._Plan.__init__ = plan_init
        training._LeanTrainer._gyre_lean_plan = lean_plan
        training._LeanTrainer.train_step = saved_step
        torch.Tensor.backward = saved_backward
        for o, n, _ in objs:
            o.__dict__.pop(n, None)
        if old is None:
            os.environ.pop("GYRE_KERAS_FAST", None)
        else:
            os.environ["GYRE_KERAS_FAST"] = old
    return _finish(acc, epochs)


def _finish(acc, epochs):
    out = {k: acc.get(k, 0.0) / epochs * 1e3 for k in PARTS if k not in ("fixed per epoch",
                                                                         "rest of step")}
    out["fixed per epoch"] = out["epoch"] - out["steps"]
    out["rest of step"] = out["steps"] - sum(out[k] for k in ("forward", "loss", "backward",
                                                                "optimizer", "metrics"))
    return out


def torch_epochs(model, opt, gen, X, yi, epochs: int) -> dict[str, float]:
    """benchmarks/keras_fit.py's torch_epoch, its parts timed in place."""
    acc: dict[str, float] = {}
    for _ in range(epochs):
        e0 = clock()
        model.train()
        order = torch.randperm(len(X), generator=gen)
        total, correct = 0.0, 0
        for i in range(0, len(X), BATCH):
            s0 = clock()
            idx = order[i:i + BATCH]
            xb, yb = X[idx], yi[idx]
            opt.zero_grad()
            t0 = clock()
            out = model(xb)
            t1 = clock()
            loss = torch.nn.functional.cross_entropy(out, yb)
            t2 = clock()
            loss.backward()
            t3 = clock()
            opt.step()
            t4 = clock()
            total += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            t5 = clock()
            for k, v in (("forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2),
                         ("optimizer", t4 - t3), ("metrics", t5 - t4), ("steps", t5 - s0)):
                acc[k] = acc.get(k, 0.0) + v
        acc["epoch"] = acc.get("epoch", 0.0) + clock() - e0
    return _finish(acc, epochs)


def run_dataset(name: str, rounds: int, epochs: int) -> dict:
    import gyre.keras.layers as gl
    import gyre.keras.models as gm
    X, y = data(name)
    N, T, dims = X.shape
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.argmax(1))
    torch.manual_seed(0)
    tm = TorchModel(dims, y.shape[1])
    loop = (tm, torch.optim.Adam(tm.parameters(), 1e-3), torch.Generator().manual_seed(0))
    models = {v: keras_model(gl, "relu", (T, dims), y.shape[1], gm.Sequential)
              for v in ("gyre.keras", "gyre.keras-ops")}
    runs = {"gyre.keras": lambda e: keras_epochs(models["gyre.keras"], X, y, e, True),
            "gyre.keras-ops": lambda e: keras_epochs(models["gyre.keras-ops"], X, y, e, False),
            "torch.nn": lambda e: torch_epochs(*loop, Xt, yt, e)}
    names = list(runs)
    for v in names:  # warm-up
        runs[v](1)
    got = {v: [] for v in names}
    for r in range(rounds):
        k = r % len(names)
        for v in names[k:] + names[:k]:
            got[v].append(runs[v](epochs))
    med = {v: {part: statistics.median(g[part] for g in got[v]) for part in PARTS}
           for v in names}
    print(f"\n{name}: (N, T, I) = ({N}, {T}, {dims}), {-(-N // BATCH)} steps/epoch; "
          "median CPU ms per epoch")
    print(f"  {'part':16s}" + "".join(f"{v:>16s}" for v in names))
    for part in PARTS:
        print(f"  {part:16s}" + "".join(f"{med[v][part]:16.2f}" for v in names))
    return {"data": name, "shape": [N, T, dims], "median_cpu_ms": med, "runs": got}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="japanese_vowels,italy_power_demand")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3, help="epochs of each variant per round")
    p.add_argument("--json", default="benchmarks/results/keras_fit_split.json")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.epochs < 1:
        p.error(f"--rounds {a.rounds}, --epochs {a.epochs}: expected both >= 1")
    torch.set_num_threads(1)
    results = [run_dataset(name.strip(), a.rounds, a.epochs)
               for name in a.data.split(",") if name.strip()]
    print(f"\n{a.rounds} rounds x {a.epochs} epochs, 1 thread, load average {os.getloadavg()}")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"command_args": argv if argv is not None else sys.argv[1:],
                       "load_average": os.getloadavg(), "results": results}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
