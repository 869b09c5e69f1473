"""``model.fit`` time per epoch for reference text 003's model (LSTM(128, relu,
return_sequences) -> LSTM(64, relu) -> Dense(C, softmax), Adam, categorical cross-entropy,
accuracy, batch 32) on real datasets: gyre.keras against Keras's own ``keras.layers.LSTM`` (torch
backend), and against the same shapes built from ``torch.nn.LSTM`` in a plain PyTorch loop.

Data: each named classification set's training split (``gyre data list``; aeon's UCR/UEA files),
every series zero-padded at its end to the longest, labels one-hot, as text 003's example does
for JapaneseVowels (``examples/keras/rnn_003_stacked_relu_lstm.py``).

Variants (``--variants``):

* ``gyre.keras``: 003's Keras model as ``examples/keras/rnn_003_stacked_relu_lstm.py`` runs it:
  ``gyre.keras.models.Sequential`` (Keras's, with gyre's lean ``fit``) of
  ``gyre.keras.layers.LSTM`` (relu).
* ``gyre.keras-ops``: ``gyre.keras`` with ``GYRE_KERAS_FAST=0``: the lean ``fit`` with Keras's
  own Dense, loss, metric updates and optimizer ``apply`` inside its step instead of their torch
  forms (``gyre.keras._fast``): what those save.
* ``gyre.keras-stock``: the same gyre layers in ``keras.Sequential`` through Keras's own
  ``fit`` (what the lean ``fit`` saves).
* ``torch.nn``: the plain PyTorch loop a user writes: ``torch.nn.LSTM`` x2 + ``Linear``,
  ``torch.optim.Adam(lr=1e-3)``, a shuffled permutation sliced into batches of 32,
  ``zero_grad / cross_entropy / backward / step``, and the epoch's mean loss and accuracy
  accumulated with ``.item()`` (what ``fit`` reports). ``torch.nn.LSTM`` has only tanh, so it
  runs tanh where 003 writes relu (torch's fastest LSTM, oneDNN on the CPU).
* ``keras``: 003's model with Keras's own ``keras.layers.LSTM`` (relu; a per-step eager loop).
* ``gyre.nn``: ``gyre.nn.LSTM(activation='relu')`` in the same plain loop as ``torch.nn``: gyre's
  engine without Keras around it.
* ``gyre.nn-tanh``: ``gyre.nn.LSTM`` with tanh in that loop (torch's own kernel through gyre's
  engine), beside ``torch.nn``: with ``gyre.nn`` it separates the ReLU kernel from the engine.
* ``gyre-tanh``: gyre.keras with Keras's default tanh (runs torch's oneDNN kernel through
  gyre), beside ``torch.nn``'s tanh.

Paired and interleaved: per dataset, each round runs one epoch of every variant, in an order
rotated from round to round, in this one process on one thread; ratios are medians of the
per-round ratios, from process CPU time (``time.process_time``, what other processes' load
distorts least) and from wall time. A Keras epoch is timed from its ``on_epoch_begin`` to its
``on_epoch_end`` (each epoch of ``fit(epochs=10)``, without ``fit``'s once-per-call setup), the
torch epoch around its loop.

Denormals: with long series the gradients that flow back through many steps of a tanh LSTM
underflow to subnormal floats, and oneDNN's LSTM backward (torch.nn.LSTM) then runs up to 10-15x
slower (OSULeaf, T=427). ``--flush-denormal`` (``torch.set_flush_denormal(True)``, for every
variant) measures the kernels without that; the default is what a user's program gets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/keras_fit.py \
        [--data japanese_vowels,gunpoint,...] [--rounds 5] [--warmup 1] [--max-series N] \
        [--variants gyre.keras,torch.nn,keras] [--flush-denormal] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = ("gyre.keras", "torch.nn", "keras", "gyre.nn", "gyre-tanh", "gyre.keras-stock",
            "gyre.nn-tanh", "gyre.keras-ops")
BATCH = 32


def data(name: str, max_series: int | None = None):
    """``(X (N, T, I) float32, y (N, C) one-hot)``: the training split of ``name``, each series
    zero-padded at its end to the longest; with ``max_series``, the first ``max_series``."""
    from gyre.data.classification import load_aeon
    d = load_aeon(name)
    xs, labels = d.X_train, d.y_train
    if max_series is not None:
        xs, labels = xs[:max_series], labels[:max_series]
    T, dims = max(len(x) for x in xs), xs[0].shape[1]
    X = np.zeros((len(xs), T, dims), dtype="float32")
    for n, x in enumerate(xs):
        X[n, :len(x)] = x
    return X, np.eye(len(d.classes), dtype="float32")[labels]


def keras_model(layers, activation: str, shape, classes: int, sequential=None):
    """003's model of ``layers.LSTM`` in ``sequential`` (default ``keras.Sequential``)."""
    import keras
    keras.utils.set_random_seed(0)
    m = (sequential or keras.Sequential)([keras.Input(shape),
                          layers.LSTM(128, activation=activation, return_sequences=True),
                          layers.LSTM(64, activation=activation),
                          keras.layers.Dense(classes, activation="softmax")])
    m.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return m


class TorchModel(torch.nn.Module):
    """003's model in torch: torch.nn.LSTM (tanh only), or with ``gyre_activation``
    gyre.nn.LSTM with that activation."""

    def __init__(self, inputs: int, classes: int, gyre_activation: str | None = None):
        super().__init__()
        if gyre_activation:
            import gyre.nn
            lstm = lambda i, h: gyre.nn.LSTM(i, h, batch_first=True,  # noqa: E731
                                             activation=gyre_activation)
        else:
            lstm = lambda i, h: torch.nn.LSTM(i, h, batch_first=True)  # noqa: E731
        self.l1 = lstm(inputs, 128)
        self.l2 = lstm(128, 64)
        self.head = torch.nn.Linear(64, classes)

    def forward(self, x):
        h, _ = self.l1(x)
        _, (h, _) = self.l2(h)
        return self.head(h[0])


def torch_epoch(model, opt, gen, X, y) -> tuple[float, float]:
    """One epoch of the plain loop; the epoch's mean loss and accuracy, as ``fit`` reports."""
    model.train()
    order = torch.randperm(len(X), generator=gen)
    total, correct = 0.0, 0
    for i in range(0, len(X), BATCH):
        idx = order[i:i + BATCH]
        xb, yb = X[idx], y[idx]
        opt.zero_grad()
        out = model(xb)
        loss = torch.nn.functional.cross_entropy(out, yb)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        correct += (out.argmax(1) == yb).sum().item()
    return total / len(X), correct / len(X)


def run_dataset(name: str, variants, rounds: int, warmup: int, max_series) -> dict:
    import keras

    import gyre.keras.layers as gl
    import gyre.keras.models as gm
    X, y = data(name, max_series)
    N, T, dims = X.shape
    C = y.shape[1]
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.argmax(1))
    loops, models = {}, {}
    for v in variants:
        if v in ("torch.nn", "gyre.nn", "gyre.nn-tanh"):
            torch.manual_seed(0)
            m = TorchModel(dims, C, {"gyre.nn": "relu", "gyre.nn-tanh": "tanh"}.get(v))
            loops[v] = (m, torch.optim.Adam(m.parameters(), 1e-3), torch.Generator().manual_seed(0))
        else:
            layers = keras.layers if v == "keras" else gl
            sequential = (gm.Sequential if v in ("gyre.keras", "gyre-tanh", "gyre.keras-ops")
                          else keras.Sequential)
            models[v] = keras_model(layers, "tanh" if v == "gyre-tanh" else "relu", (T, dims), C,
                                    sequential)

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = (time.process_time(), time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = (time.process_time() - self.t0[0], time.perf_counter() - self.t0[1])

    timer = EpochTimer()

    def epoch(v):
        if v in loops:
            c0, w0 = time.process_time(), time.perf_counter()
            torch_epoch(*loops[v], Xt, yt)
            return time.process_time() - c0, time.perf_counter() - w0
        fast = os.environ.get("GYRE_KERAS_FAST")
        os.environ["GYRE_KERAS_FAST"] = "0" if v == "gyre.keras-ops" else "1"
        try:
            models[v].fit(X, y, epochs=1, batch_size=BATCH, verbose=0, callbacks=[timer])
        finally:
            if fast is None:
                del os.environ["GYRE_KERAS_FAST"]
            else:
                os.environ["GYRE_KERAS_FAST"] = fast
        return timer.seconds

    for _ in range(warmup):
        for v in variants:
            epoch(v)
    cpu = {v: [] for v in variants}
    wall = {v: [] for v in variants}
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            c, w = epoch(v)
            cpu[v].append(c)
            wall[v].append(w)

    def ratio(times, u, v):
        return statistics.median(a / b for a, b in zip(times[u], times[v], strict=True))

    pairs = [(u, v) for u, v in (("gyre.keras", "torch.nn"), ("keras", "gyre.keras"),
                                 ("gyre.nn", "torch.nn"), ("gyre.keras", "gyre.nn"),
                                 ("gyre-tanh", "torch.nn"), ("gyre.keras-stock", "gyre.keras"),
                                 ("gyre.nn-tanh", "torch.nn"), ("gyre.keras-ops", "gyre.keras"),
                                 ("gyre.keras-ops", "torch.nn"))
             if u in cpu and v in cpu]
    return {
        "data": name, "shape": [N, T, dims], "classes": C, "steps_per_epoch": -(-N // BATCH),
        "cpu_s": cpu, "wall_s": wall,
        "median_cpu_ms": {v: statistics.median(t) * 1e3 for v, t in cpu.items()},
        "median_wall_ms": {v: statistics.median(t) * 1e3 for v, t in wall.items()},
        "ratios_cpu": {f"{u} / {v}": ratio(cpu, u, v) for u, v in pairs},
        "ratios_wall": {f"{u} / {v}": ratio(wall, u, v) for u, v in pairs},
    }


def report(res: dict) -> None:
    N, T, dims = res["shape"]
    print(f"\n{res['data']}: (N, T, I) = ({N}, {T}, {dims}), {res['classes']} classes, "
          f"{res['steps_per_epoch']} steps/epoch")
    for v, ms in res["median_cpu_ms"].items():
        print(f"  {v:11s} median cpu {ms:9.1f} ms/epoch   wall {res['median_wall_ms'][v]:9.1f}")
    for k, r in res["ratios_cpu"].items():
        target = {"gyre.keras / torch.nn": "  target <= 1.1: " + ("met" if r <= 1.1 else "NOT met"),
                  "keras / gyre.keras": "  target >= 4: " + ("met" if r >= 4 else "NOT met")
                  }.get(k, "")
        print(f"  {k:24s} cpu {r:6.3f}x  wall {res['ratios_wall'][k]:6.3f}x{target}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="japanese_vowels",
                   help="comma-separated classification datasets (gyre data list)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs of every variant first")
    p.add_argument("--max-series", type=int, default=None,
                   help="only the first N training series of each dataset")
    p.add_argument("--variants", default="gyre.keras,torch.nn,keras,gyre.nn",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) for every variant")
    p.add_argument("--json", default="benchmarks/results/keras_fit.json",
                   help="write every time and ratio here")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants: got {bad or a.variants!r}, expected some of {', '.join(VARIANTS)}")
    if a.rounds < 1 or a.warmup < 0:
        p.error(f"--rounds: got {a.rounds}, --warmup {a.warmup}; expected >= 1 and >= 0")
    torch.set_num_threads(1)
    if a.flush_denormal and not torch.set_flush_denormal(True):
        p.error("--flush-denormal: this CPU cannot flush denormals")
    results = []
    t0 = time.perf_counter()
    for name in [d.strip() for d in a.data.split(",") if d.strip()]:
        results.append(run_dataset(name, variants, a.rounds, a.warmup, a.max_series))
        report(results[-1])
    print(f"\n{a.rounds} rounds, 1 thread, flush_denormal={a.flush_denormal}, "
          f"load average {os.getloadavg()}, {time.perf_counter() - t0:.0f} s in all")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"command_args": argv if argv is not None else sys.argv[1:],
                       "rounds": a.rounds, "warmup": a.warmup, "threads": 1,
                       "flush_denormal": a.flush_denormal, "torch": torch.__version__,
                       "load_average": os.getloadavg(), "results": results}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
