"""``model.fit`` time per epoch for reference text 003's model (LSTM(128, relu,
return_sequences) -> LSTM(64, relu) -> Dense(9, softmax), Adam, categorical cross-entropy,
batch 32) on JapaneseVowels' 270 training utterances zero-padded to 29 frames of 12
coefficients: gyre.keras against Keras's own keras.layers.LSTM (torch backend), and against the
same shapes built from torch.nn.LSTM in a plain PyTorch loop (torch.optim.Adam, shuffled
batches of 32). torch.nn.LSTM has only tanh, so that baseline (and the ``gyre-tanh`` row, gyre
with Keras's default activation, beside it) runs tanh where 003 writes relu; the ``gyre.nn`` row
is the relu model from gyre.nn.LSTM in the same plain loop, which splits gyre.keras's time into
gyre's engine and Keras's ``fit`` and layers around it.

Paired and interleaved: each round runs one epoch of every variant, in a rotated order, in this
process; the ratios are medians of the per-round ratios. A Keras epoch is timed from its
``on_epoch_begin`` to its ``on_epoch_end`` (each epoch of ``fit(epochs=10)``, without ``fit``'s
once-per-call setup), the torch epoch around its loop. One thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/keras_fit.py [--rounds 7] [--epochs-warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def data():
    from aeon.datasets import load_japanese_vowels
    utterances, speakers = load_japanese_vowels(split="train")
    X = np.zeros((len(utterances), 29, 12), dtype="float32")
    for n, u in enumerate(utterances):
        X[n, :u.shape[1]] = u.T
    y = np.eye(9, dtype="float32")[speakers.astype(int) - 1]
    return X, y


def keras_model(layers, activation):
    import keras
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((29, 12)),
                          layers.LSTM(128, activation=activation, return_sequences=True),
                          layers.LSTM(64, activation=activation),
                          keras.layers.Dense(9, activation="softmax")])
    m.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return m


class TorchModel(torch.nn.Module):
    """003's model in torch: torch.nn.LSTM (tanh only), or with ``relu`` gyre.nn.LSTM (the
    engine gyre.keras runs, without Keras around it)."""

    def __init__(self, relu: bool = False):
        super().__init__()
        if relu:
            import gyre.nn
            lstm = lambda i, h: gyre.nn.LSTM(i, h, batch_first=True, activation="relu")  # noqa: E731
        else:
            lstm = lambda i, h: torch.nn.LSTM(i, h, batch_first=True)  # noqa: E731
        self.l1 = lstm(12, 128)
        self.l2 = lstm(128, 64)
        self.head = torch.nn.Linear(64, 9)

    def forward(self, x):
        h, _ = self.l1(x)
        _, (h, _) = self.l2(h)
        return self.head(h[0])


def torch_epoch(state, X, y):
    model, opt, gen = state
    model.train()
    order = torch.randperm(len(X), generator=gen)
    for i in range(0, len(X), 32):
        idx = order[i:i + 32]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--epochs-warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="write the per-round times here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import keras

    import gyre.keras.layers as gl
    X, y = data()
    torch.manual_seed(0)
    tm = TorchModel()
    state = (tm, torch.optim.Adam(tm.parameters(), 1e-3), torch.Generator().manual_seed(0))
    gm = TorchModel(relu=True)
    gstate = (gm, torch.optim.Adam(gm.parameters(), 1e-3), torch.Generator().manual_seed(0))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.argmax(1))
    models = {"gyre.keras": keras_model(gl, "relu"), "keras": keras_model(keras.layers, "relu"),
              "gyre-tanh": keras_model(gl, "tanh")}

    class EpochTimer(keras.callbacks.Callback):
        """The epoch itself, from Keras's on_epoch_begin to on_epoch_end: what each epoch of
        ``fit(epochs=10)`` costs, without the once-per-``fit`` setup."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.t0

    timer = EpochTimer()

    def epoch(name):
        if name in ("torch.nn", "gyre.nn"):
            t0 = time.perf_counter()
            torch_epoch(state if name == "torch.nn" else gstate, Xt, yt)
            return time.perf_counter() - t0
        models[name].fit(X, y, epochs=1, batch_size=32, verbose=0, callbacks=[timer])
        return timer.seconds

    names = ["gyre.keras", "torch.nn", "keras", "gyre-tanh", "gyre.nn"]
    for _ in range(a.epochs_warmup):
        for n in names:
            epoch(n)
    times = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(epoch(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = lambda u, v: statistics.median(a / b for a, b in zip(times[u], times[v], strict=True))  # noqa: E731
    print(f"load average {os.getloadavg()}, {a.rounds} rounds, 1 thread, (N, T, I) = {X.shape}")
    for n in names:
        print(f"{n:11s} median {med[n] * 1e3:8.1f} ms/epoch  min {min(times[n]) * 1e3:8.1f}")
    print(f"gyre.keras / torch.nn   {ratio('gyre.keras', 'torch.nn'):.3f}x (target <= 1.1)")
    print(f"gyre-tanh / torch.nn    {ratio('gyre-tanh', 'torch.nn'):.3f}x")
    print(f"gyre.nn / torch.nn      {ratio('gyre.nn', 'torch.nn'):.3f}x (gyre's relu engine, torch loop)")
    print(f"gyre.keras / gyre.nn    {ratio('gyre.keras', 'gyre.nn'):.3f}x (Keras's fit and layers around it)")
    print(f"keras / gyre.keras      {ratio('keras', 'gyre.keras'):.2f}x (target >= 4)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"times_s": times, "load_average": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
