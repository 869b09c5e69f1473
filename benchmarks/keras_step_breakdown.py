"""Where one training step's time goes: text 003's model (benchmarks/keras_fit.py) of
gyre.keras layers in Keras's stock ``model.fit`` and in gyre.keras's lean one, against the plain
torch.nn loop, in process CPU time on one thread.

Per dataset (a batch of the first 32 training series), each round measures, interleaved:

* gyre.keras layers in ``keras.Sequential`` (Keras's stock fit): one ``fit`` epoch over the
  whole batches of 32 (the first ``32 * (N // 32)`` series) divided by its steps (the whole
  step as ``fit`` runs it), and
  then the parts of Keras's ``TorchTrainer.train_step`` called one by one as it calls them
  (``model(x, training=True)``, ``zero_grad``, ``_compute_loss`` with the loss tracker,
  ``backward``, ``optimizer.apply``, ``compute_metrics``); ``fit - train_step`` is Keras's loop
  around the step (data slicing and conversion, callbacks, logs). The forward is split further
  by calling each LSTM four ways on the same tensors, interleaved call by call
  (``--layer-reps``), each reported as the median of its paired difference to ``engine.run``
  alone (gyre's engine): its ``call`` (the difference is gyre.keras's own Python around the
  engine), the same through Keras's ``RNN.call`` (the path gyre's ``call`` now takes only for
  initial states, stateful layers, dropout or mixed dtypes) and ``__call__`` (Keras's Layer
  machinery on top).
* gyre.keras's lean fit (``gyre.keras.models.Sequential``, :mod:`gyre.keras.training`, the
  model ``examples/keras`` and ``benchmarks/keras_fit.py``'s ``gyre.keras`` run) with Keras's
  own Dense, loss, metrics and optimizer in its step (``GYRE_KERAS_FAST=0``, so that each can
  be wrapped; the torch forms that replace them are split by ``keras_fit_split.py``): one ``fit``
  epoch over the whole batches divided by its steps, and the parts of its ``train_step`` timed
  inside that epoch by wrapping each (every layer's ``call``, the loss function, the loss
  tracker, ``backward``, ``optimizer.apply``, the metrics' update; ``fit loop around
  train_step`` is the epoch's remainder).
* the torch loop (benchmarks/keras_fit.py's ``torch.nn`` variant): each LSTM's forward, the
  head, the loss, ``backward``, ``opt.step`` and its ``.item()`` bookkeeping.

Each figure is the median over rounds of the median of ``--reps`` calls; the parts of one
column need not add to its total exactly (each is timed on its own).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/keras_step_breakdown.py \
        [--data japanese_vowels,gunpoint] [--rounds 3] [--reps 5] [--layer-reps 40] \
        [--flush-denormal] [--json PATH]
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


def _med(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return statistics.median(ts)


def keras_parts(m, X, y, xb, yb, reps: int, layer_reps: int) -> dict[str, float]:
    import keras

    from gyre import engine
    out = {}
    steps = max(1, len(X) // BATCH)

    class T(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = clock()

        def on_epoch_end(self, epoch, logs=None):
            self.s = clock() - self.t0

    t = T()
    full = steps * BATCH  # whole batches only, as the parts below are timed on one
    m.fit(X[:full], y[:full], epochs=1, batch_size=BATCH, verbose=0, callbacks=[t])
    out["fit step (epoch / steps)"] = t.s / steps
    parts = {k: [] for k in ("forward", "zero_grad", "loss + tracker", "backward", "optimizer",
                             "metrics", "train_step")}
    for _ in range(reps):
        t0 = clock()
        yp = m(xb, training=True)
        t1 = clock()
        m.zero_grad()
        t2 = clock()
        loss = m._compute_loss(x=xb, y=yb, y_pred=yp, sample_weight=None, training=True)
        m._loss_tracker.update_state(loss, sample_weight=xb.shape[0])
        loss = m.optimizer.scale_loss(loss)
        t3 = clock()
        loss.backward()
        t4 = clock()
        weights = m.trainable_weights[:]
        with torch.no_grad():
            m.optimizer.apply([v.value.grad for v in weights], weights)
        t5 = clock()
        m.compute_metrics(xb, yb, yp, sample_weight=None)
        t6 = clock()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0),
                        strict=True):
            parts[k].append(v)
    out.update({k: statistics.median(v) for k, v in parts.items()})
    out["fit loop around train_step"] = out["fit step (epoch / steps)"] - out["train_step"]
    l1, l2, dense = m.layers
    h1 = l1(xb, training=True)
    h2 = l2(h1, training=True)
    for name, layer, inp in (("lstm1", l1, xb), ("lstm2", l2, h1.detach())):
        z = [inp.new_zeros(inp.shape[0], layer.units) for _ in range(2)]
        xt = inp.transpose(0, 1)
        hx = tuple(s.unsqueeze(0) for s in z)
        fns = {  # each LSTM's forward, four ways, interleaved call by call
            "engine.run": lambda: engine.run(  # noqa: B023
                layer.gyre_cell, [[layer._gyre_params()]], xt, hx, training=True),  # noqa: B023
            "gyre call": lambda: layer.call(inp, training=True),  # noqa: B023
            "via Keras's RNN.call": lambda: keras.layers.RNN.call(  # what gyre's call skips
                layer, inp, training=True),  # noqa: B023
            "Layer.__call__": lambda: layer(inp, training=True),  # noqa: B023
        }
        ts = {k: [] for k in fns}
        for r in range(layer_reps):
            for k, f in (list(fns.items()) if r % 2 else list(fns.items())[::-1]):
                t0 = clock()
                f()
                ts[k].append(clock() - t0)
        out[f"{name} fwd: engine.run"] = statistics.median(ts["engine.run"])
        for k in list(fns)[1:]:  # paired: each call against the engine.run beside it
            out[f"{name} fwd: {k} - engine.run"] = statistics.median(
                a - b for a, b in zip(ts[k], ts["engine.run"], strict=True))
    out["dense fwd: Layer.__call__"] = _med(lambda: dense(h2, training=True), reps)
    return out


def lean_parts(m, X, y, epochs: int) -> dict[str, float]:
    """Per step of ``epochs`` lean ``fit`` epochs of ``m`` (a gyre.keras Sequential): the whole
    step, and each part timed in place by a wrapper around it (restored afterwards)."""
    import keras

    from gyre.keras import training
    full = (len(X) // BATCH) * BATCH
    steps = epochs * (full // BATCH)
    acc: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + clock() - t0
        return wrapper

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = clock()

        def on_epoch_end(self, epoch, logs=None):
            acc["fit step (epoch / steps)"] = acc.get("fit step (epoch / steps)", 0.0) + clock() - self.t0

    loss0 = m._compile_loss._flat_losses[0]
    patched = [(training._LeanTrainer, "train_step"), (torch.Tensor, "backward")]
    saved = [(o, n, o.__dict__[n]) for o, n in patched]
    objs = [(layer, "call", f"{type(layer).__name__.lower()} {i + 1}: call")
            for i, layer in enumerate(m.layers)] + [
        (m._loss_tracker, "update_state", "loss tracker"), (m.optimizer, "apply", "optimizer"),
        (m._compile_metrics, "update_state", "metrics")]
    fast = os.environ.get("GYRE_KERAS_FAST")
    os.environ["GYRE_KERAS_FAST"] = "0"  # Keras's own pieces, so each can be wrapped
    try:
        training._LeanTrainer.train_step = timed("train_step", saved[0][2])
        torch.Tensor.backward = timed("backward", saved[1][2])
        for o, n, label in objs:
            setattr(o, n, timed(label, getattr(o, n)))
        m._compile_loss._flat_losses[0] = loss0._replace(loss=timed("loss", loss0.loss))
        m.train_function = None
        m.fit(X[:full], y[:full], epochs=epochs, batch_size=BATCH, verbose=0, callbacks=[Epochs()])
    finally:
        for o, n, fn in saved:
            setattr(o, n, fn)
        for o, n, _ in objs:
            o.__dict__.pop(n, None)
        m._compile_loss._flat_losses[0] = loss0
        m.train_function = None
        if fast is None:
            os.environ.pop("GYRE_KERAS_FAST", None)
        else:
            os.environ["GYRE_KERAS_FAST"] = fast
    out = {k: v / steps for k, v in acc.items()}
    out["fit loop around train_step"] = out["fit step (epoch / steps)"] - out["train_step"]
    return out


def torch_parts(model, opt, xb, yi, reps: int) -> dict[str, float]:
    parts = {k: [] for k in ("lstm1 fwd", "lstm2 fwd", "head fwd", "loss", "backward",
                             "optimizer (zero_grad + step)", ".item() bookkeeping", "step")}
    model.train()
    for _ in range(reps):
        t0 = clock()
        opt.zero_grad()
        t1 = clock()
        h, _ = model.l1(xb)
        t2 = clock()
        _, (h, _) = model.l2(h)
        t3 = clock()
        out = model.head(h[0])
        t4 = clock()
        loss = torch.nn.functional.cross_entropy(out, yi)
        t5 = clock()
        loss.backward()
        t6 = clock()
        opt.step()
        t7 = clock()
        _ = loss.item() * len(yi), (out.argmax(1) == yi).sum().item()
        t8 = clock()
        for k, v in zip(parts, (t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, (t1 - t0) + (t7 - t6),
                                t8 - t7, t8 - t0), strict=True):
            parts[k].append(v)
    return {k: statistics.median(v) for k, v in parts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="japanese_vowels")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layer-reps", type=int, default=40,
                   help="interleaved calls per round for each LSTM's forward, four ways")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) (see benchmarks/keras_fit.py)")
    p.add_argument("--json", default="benchmarks/results/keras_step_breakdown.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.flush_denormal and not torch.set_flush_denormal(True):
        p.error("--flush-denormal: this CPU cannot flush denormals")
    import gyre.keras.layers as gl
    import gyre.keras.models as gm
    results = []
    for name in [d.strip() for d in a.data.split(",") if d.strip()]:
        X, y = data(name)
        N, T, dims = X.shape
        C = y.shape[1]
        m = keras_model(gl, "relu", (T, dims), C)
        lean = keras_model(gl, "relu", (T, dims), C, gm.Sequential)
        torch.manual_seed(0)
        tm = TorchModel(dims, C)
        opt = torch.optim.Adam(tm.parameters(), 1e-3)
        xb, yb = torch.from_numpy(X[:BATCH]), torch.from_numpy(y[:BATCH])
        yi = yb.argmax(1)
        m.fit(X, y, epochs=1, batch_size=BATCH, verbose=0)  # builds, compiles, warms
        lean.fit(X, y, epochs=1, batch_size=BATCH, verbose=0)
        torch_parts(tm, opt, xb, yi, 2)
        ks, ts, ls = [], [], []
        for r in range(a.rounds):
            run = [lambda: ts.append(torch_parts(tm, opt, xb, yi, a.reps)),  # noqa: B023
                   lambda: ks.append(keras_parts(m, X, y, xb, yb, a.reps, a.layer_reps)),  # noqa: B023
                   lambda: ls.append(lean_parts(lean, X, y, max(1, a.reps // 2)))]  # noqa: B023
            for f in run[r % 3:] + run[:r % 3]:
                f()
        k = {n: statistics.median(d[n] for d in ks) * 1e3 for n in ks[0]}
        t = {n: statistics.median(d[n] for d in ts) * 1e3 for n in ts[0]}
        g = {n: statistics.median(d[n] for d in ls) * 1e3 for n in ls[0]}
        print(f"\n{name}: (N, T, I) = ({N}, {T}, {dims}), batch {BATCH}; CPU ms per step, "
              f"median of {a.rounds} rounds")
        print("  gyre.keras (fit)")
        for n, v in k.items():
            print(f"    {n:34s} {v:9.2f}")
        print("  gyre.keras.models.Sequential (lean fit)")
        for n, v in g.items():
            print(f"    {n:34s} {v:9.2f}")
        print("  torch.nn loop")
        for n, v in t.items():
            print(f"    {n:34s} {v:9.2f}")
        print(f"  fit step / torch step: stock fit {k['fit step (epoch / steps)'] / t['step']:.3f}x, "
              f"lean fit {g['fit step (epoch / steps)'] / t['step']:.3f}x")
        results.append({"data": name, "shape": [N, T, dims], "gyre_keras_ms": k,
                        "gyre_keras_lean_ms": g, "torch_ms": t})
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"rounds": a.rounds, "reps": a.reps, "layer_reps": a.layer_reps, "threads": 1,
                       "flush_denormal": a.flush_denormal,
                       "load_average": os.getloadavg(), "results": results}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
