"""gyre.keras equals Keras's own layers on the torch backend, in float64: outputs and states
over the argument combinations (bias, activations, sequences/states, go_backwards, masks of
every pattern, initial states, stateful, dropout and per-gate recurrent dropout with the same
seed, Bidirectional), weights after model.fit steps, save/load, Keras's weight layout and weight
files, gyre's extras against gyre.nn, and the reference texts' Keras examples on real data."""

from __future__ import annotations

import itertools
import os
import pathlib
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
import torch  # noqa: E402

import gyre.keras as gk  # noqa: E402
import gyre.nn  # noqa: E402

B, T, I, H = 3, 7, 4, 5
#: float64. Keras's own float64 layers are float32-accurate where its generic loop runs (its
#: ``ops.matmul`` demotes float64 to float32: ``keras.backend.result_type`` maps 64-bit types to
#: 32-bit), so the comparisons run with that demotion switched off (``keras_float64``), where
#: Keras's loop is float64 throughout; test_keras_demotes_float64_matmul shows the cause.
ATOL = 1e-10
PAIRS = {"lstm": (keras.layers.LSTM, gk.LSTM), "gru": (keras.layers.GRU, gk.GRU),
         "rnn": (keras.layers.SimpleRNN, gk.SimpleRNN)}


@pytest.fixture(autouse=True)
def keras_float64(monkeypatch):
    from keras.src.backend.common import dtypes
    monkeypatch.setattr(dtypes, "BIT64_TO_BIT32_DTYPE", {})


def test_keras_demotes_float64_matmul(monkeypatch):
    """Why the fixture: with Keras's default rule its float64 SimpleRNN (and every masked loop)
    is float32-accurate, gyre's is float64-accurate; without the rule both are exact."""
    from keras.src.backend.common import dtypes
    monkeypatch.setattr(dtypes, "BIT64_TO_BIT32_DTYPE", {"float64": "float32"})
    assert keras.backend.result_type("float64", "float64") == "float32"
    x = _x()
    k, g = _pair("rnn", return_sequences=True)
    w = k.get_weights()
    h, ref = np.zeros((B, H)), []
    for t in range(T):
        h = np.tanh(x[:, t] @ w[0] + w[2] + h @ w[1])
        ref.append(h)
    ref = np.stack(ref, 1)
    assert 1e-9 < np.abs(_np(k(x)) - ref).max() < 1e-5
    np.testing.assert_allclose(_np(g(x)), ref, atol=1e-12, rtol=0)
    monkeypatch.setattr(dtypes, "BIT64_TO_BIT32_DTYPE", {})
    np.testing.assert_allclose(_np(k(x)), ref, atol=1e-12, rtol=0)


def _np(t):
    return keras.ops.convert_to_numpy(t)


def _x(seed=0, shape=(B, T, I)):
    return np.random.default_rng(seed).normal(size=shape)


def _masks():
    suffix = np.ones((B, T), bool)
    suffix[1, 5:] = False
    suffix[2, 2:] = False
    prefix = suffix[:, ::-1].copy()
    gaps = np.ones((B, T), bool)
    gaps[0, [1, 4]] = False
    gaps[1, :3] = False
    gaps[2] = False  # a sequence with no valid step
    return {"none": None, "suffix": suffix, "prefix": prefix, "gaps": gaps}


def _pair(kind, **kw):
    K, G = PAIRS[kind]
    k = K(H, dtype="float64", **kw)
    g = G(H, dtype="float64", **kw)
    x = _x()
    k(x)
    g(x)
    # randomise every weight so biases and the forget gate's +1 are exercised
    w = [np.random.default_rng(i + 1).uniform(-0.6, 0.6, size=v.shape) for i, v in
         enumerate(k.get_weights())]
    k.set_weights(w)
    g.set_weights(w)
    return k, g


def _assert_same(a, b):
    a = a if isinstance(a, list | tuple) else [a]
    b = b if isinstance(b, list | tuple) else [b]
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(_np(v), _np(u), atol=ATOL, rtol=0)


CASES = {
    "lstm": [dict(), dict(use_bias=False), dict(activation="relu"),
             dict(activation="softsign", recurrent_activation="hard_sigmoid", unit_forget_bias=False)],
    "gru": [dict(), dict(reset_after=False), dict(use_bias=False, activation="relu"),
            dict(reset_after=False, recurrent_activation="hard_sigmoid")],
    "rnn": [dict(), dict(activation="relu", use_bias=False), dict(activation="linear")],
}


@pytest.mark.parametrize("kind,kw", [(k, c) for k, cs in CASES.items() for c in cs],
                         ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{a}={b}" for a, b in v.items()))
def test_equal_to_keras(kind, kw):
    """Every mask pattern x go_backwards x return_sequences, states returned."""
    x = _x(3)
    for mask in _masks().values():
        for back, seq in itertools.product((False, True), repeat=2):
            k, g = _pair(kind, return_sequences=seq, return_state=True, go_backwards=back, **kw)
            _assert_same(k(x, mask=mask), g(x, mask=mask))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_common_call_skips_rnn_call(kind, monkeypatch):
    """The common call (no initial state, not stateful, no dropout, one dtype) does not go
    through Keras's ``RNN.call`` and returns exactly what it returns, masks included; a call
    with an initial state is ``RNN.call``'s."""
    _, g = _pair(kind, return_sequences=True, return_state=True)
    x, mask = torch.from_numpy(_x()), torch.from_numpy(_masks()["gaps"])
    rnn_call = keras.layers.RNN.call
    want = [rnn_call(g, x, mask=m, training=True) for m in (None, mask)]
    calls = []
    monkeypatch.setattr(keras.layers.RNN, "call",
                        lambda self, *a, **k: calls.append(1) or rnn_call(self, *a, **k))
    for m, w in zip((None, mask), want, strict=True):
        _assert_same(w, g.call(x, mask=m, training=True))
    assert not calls
    states = [torch.zeros(B, H, dtype=torch.float64) for _ in range(2 if kind == "lstm" else 1)]
    _assert_same(want[0], g.call(x, initial_state=states, training=True))
    assert calls


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_initial_state_and_stateful(kind):
    """initial_state as a call argument and in the functional API, and stateful=True (states
    carried across calls and across model.predict's batches, reset_states / reset_state), each
    with go_backwards both ways."""
    n = 2 if kind == "lstm" else 1
    mask = _masks()["gaps"]
    for back in (False, True):
        k, g = _pair(kind, return_sequences=True, return_state=True, go_backwards=back)
        s0 = [_x(9 + i, (B, H)) for i in range(n)]
        for m in (None, mask):
            _assert_same(k(_x(), initial_state=s0, mask=m), g(_x(), initial_state=s0, mask=m))
        k, g = _pair(kind, stateful=True, return_state=True, go_backwards=back)
        for layer in (k, g):  # _pair's first call ran with other weights
            layer.reset_states()
        for seed in (4, 5, 6):  # the state carries across calls
            _assert_same(k(_x(seed)), g(_x(seed)))
        k.reset_state()
        g.reset_state()
        _assert_same(k(_x(7)), g(_x(7)))
    K, G = PAIRS[kind]
    models = []
    for cls in (K, G):
        inp = keras.Input((T, I), dtype="float64")
        states = [keras.Input((H,), dtype="float64") for _ in range(n)]
        out = cls(H, return_sequences=True, go_backwards=True, dtype="float64")(
            inp, initial_state=states)
        models.append(keras.Model([inp, *states], out))
    models[1].set_weights(models[0].get_weights())
    ins = [_x(1)] + [_x(20 + i, (B, H)) for i in range(n)]
    _assert_same(models[0](ins), models[1](ins))
    assert not np.allclose(_np(models[1](ins)), _np(models[1]([ins[0]] + [0 * s for s in ins[1:]])))
    preds = []
    for cls in (K, G):  # model.predict over 3 batches of a stateful model: one stream per row
        m = keras.Sequential([keras.Input((T, I), batch_size=B, dtype="float64"),
                              cls(H, stateful=True, dtype="float64")])
        if cls is G:
            m.set_weights(preds[0][1])
        preds.append((m.predict(_x(8, (3 * B, T, I)), batch_size=B, verbose=0), m.get_weights()))
    np.testing.assert_allclose(preds[1][0], preds[0][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_dropout_same_seed_same_masks(kind):
    """Input dropout: Keras's own mask from its seeded generator, so training calls agree."""
    k, g = _pair(kind, dropout=0.4, seed=3, return_sequences=True)
    for _ in range(2):
        _assert_same(k(_x(), training=True), g(_x(), training=True))
    _assert_same(k(_x(), training=False), g(_x(), training=False))


@pytest.mark.parametrize("kind,kw", [
    ("lstm", dict(recurrent_dropout=0.3)), ("lstm", dict(recurrent_dropout=0.3, dropout=0.2)),
    ("gru", dict(recurrent_dropout=0.3, dropout=0.2)),
    ("gru", dict(recurrent_dropout=0.3, dropout=0.2, reset_after=False)),
    ("rnn", dict(recurrent_dropout=0.3, dropout=0.2)),
])
def test_recurrent_dropout_per_gate_like_keras(kind, kw):
    """recurrent_dropout is Keras's: one mask per gate (implementation=1), the Keras cell's own
    masks, so training calls equal Keras's with the same seed (masks and gaps included);
    inference has no dropout and equals Keras too."""
    k, g = _pair(kind, seed=1, return_sequences=True, **kw)
    x = _x()
    for mask in (None, _masks()["prefix"]):
        a, b = k(x, training=True, mask=mask), g(x, training=True, mask=mask)
        _assert_same(a, b)
    c = g(x, training=True)
    assert not np.allclose(_np(b), _np(c)) and np.isfinite(_np(c)).all()  # a new mask per batch
    _assert_same(k(x), g(x))
    # the masks: gate g's own (B, I) / (B, H) mask, drawn independently per gate
    cell = g.cell
    count = {"lstm": 4, "gru": 3, "rnn": None}[kind]
    assert getattr(cell, "dropout_mask_count", None) == count
    dp = cell._create_dropout_mask(torch.ones(64, H, dtype=torch.float64), 0.3)
    masks = [_np(m) for m in (dp if count else [dp])]
    for m in masks:
        assert m.shape == (64, H) and set(np.unique(m)) <= {0.0, 1 / 0.7}
        assert abs((m == 0).mean() - 0.3) < 0.06  # 320 draws: 3.6 standard deviations
    if count:
        assert all((masks[0] != m).any() for m in masks[1:])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bidirectional(kind):
    K, G = PAIRS[kind]
    x, mask = _x(), _masks()["suffix"]
    for seq in (False, True):
        k = keras.layers.Bidirectional(K(H, return_sequences=seq, dtype="float64"), dtype="float64")
        g = gk.Bidirectional(G(H, return_sequences=seq, dtype="float64"), dtype="float64")
        k(x)
        g(x)
        g.set_weights(k.get_weights())
        _assert_same(k(x, mask=mask), g(x, mask=mask))


def _model(layer_cls, **kw):
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, I), dtype="float64")
    h = keras.layers.Masking(dtype="float64")(inp)
    h = layer_cls(H, return_sequences=True, dtype="float64", **kw)(h)
    h = layer_cls(H, dtype="float64", **kw)(h)
    out = keras.layers.Dense(2, activation="softmax", dtype="float64")(h)
    return keras.Model(inp, out)


@pytest.mark.parametrize("kind,kw", [
    ("lstm", dict(activation="relu", kernel_regularizer="l2", recurrent_constraint="non_neg")),
    ("gru", dict(reset_after=False, bias_regularizer=keras.regularizers.L1(0.01))),
    ("gru", dict(dropout=0.2, seed=5)),
    ("lstm", dict(recurrent_dropout=0.2, dropout=0.1, seed=2)),
    ("rnn", dict(recurrent_regularizer="l1")),
])
def test_fit_steps_equal(kind, kw):
    """Weights after model.fit steps (gradients, regularizers, constraints, masks) agree."""
    K, G = PAIRS[kind]
    x = _x(11, (8, T, I))
    x[2, 5:] = 0.0  # padded steps, masked by Masking
    x[5, :2] = 0.0
    y = (x[:, :, 0].sum(1) > 0).astype("int64")
    weights = []
    for cls in (K, G):
        m = _model(cls, **kw)
        if cls is K:
            w0 = m.get_weights()
        m.set_weights(w0)
        m.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
        m.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        weights.append(m.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-9, rtol=0)
    assert not all(np.allclose(a, b) for a, b in zip(w0, weights[1], strict=True))


def test_weight_layout_and_torch():
    """Keras's layout: kernel (I, 4H) gates i, f, c, o == torch's weight_ih^T, i, f, g, o;
    GRU kernel z, r, h with reset_after bias (2, 3H) == torch's GRU with r, z swapped."""
    g = gk.LSTM(H, return_sequences=True, return_state=True, dtype="float64")
    x = _x()
    g(x)
    assert [tuple(w.shape) for w in g.get_weights()] == [(I, 4 * H), (H, 4 * H), (4 * H,)]
    t = torch.nn.LSTM(I, H, batch_first=True).double()
    sd = t.state_dict()
    g.set_weights([sd["weight_ih_l0"].numpy().T, sd["weight_hh_l0"].numpy().T,
                   (sd["bias_ih_l0"] + sd["bias_hh_l0"]).numpy()])
    out, h, c = g(x)
    ref, (rh, rc) = t(torch.from_numpy(x))
    _assert_same([ref, rh[0], rc[0]], [out, h, c])
    gr = gk.GRU(H, return_sequences=True, dtype="float64")
    gr(x)
    assert [tuple(w.shape) for w in gr.get_weights()] == [(I, 3 * H), (H, 3 * H), (2, 3 * H)]
    tg = torch.nn.GRU(I, H, batch_first=True).double()
    sd = tg.state_dict()

    def zrh(m):  # torch's r, z, n blocks -> Keras's z, r, h
        r, z, n = np.split(m, 3, axis=-1)
        return np.concatenate([z, r, n], axis=-1)

    gr.set_weights([zrh(sd["weight_ih_l0"].numpy().T), zrh(sd["weight_hh_l0"].numpy().T),
                    np.stack([zrh(sd["bias_ih_l0"].numpy()), zrh(sd["bias_hh_l0"].numpy())])])
    _assert_same(tg(torch.from_numpy(x))[0], gr(x))


def test_save_load(tmp_path):
    from gyre.keras.layers import LSTM, Dense, Embedding
    from gyre.keras.models import Sequential, load_model
    m = Sequential([keras.Input((T,), dtype="int64"), Embedding(20, 6, mask_zero=True),
                    LSTM(H, activation="relu", peephole=True, zoneout=0.1, return_sequences=True),
                    gk.Recurrent("gru_cho", H), Dense(1, activation="sigmoid")])
    tokens = np.random.default_rng(0).integers(1, 20, size=(6, T))
    tokens[1, 4:] = 0
    tokens[2, :3] = 0
    m.compile(optimizer="adam", loss="binary_crossentropy")
    m.fit(tokens, np.arange(6) % 2, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    m.save(path)
    back = load_model(path)
    assert type(keras.saving.load_model(path).layers[1]) is gk.LSTM
    assert isinstance(back.layers[1], gk.LSTM) and back.layers[1].peephole
    assert back.layers[1].zoneout == (0.1, 0.1)
    assert isinstance(back.layers[2], gk.Recurrent)
    np.testing.assert_allclose(_np(back(tokens)), _np(m(tokens)), atol=1e-6, rtol=0)


def test_weights_saved_by_keras_load_into_gyre(tmp_path):
    """A model of Keras's own LSTM/GRU layers saves weights that the same model of gyre's layers
    loads as they are (Keras's layout), with equal outputs."""
    x = _x()
    x[1, 4:] = x[2, :2] = 0.0  # masked by Masking

    def build(layers):
        keras.utils.set_random_seed(1)
        inp = keras.Input((T, I), dtype="float64")
        h = keras.layers.Masking(dtype="float64")(inp)
        h = layers.LSTM(H, return_sequences=True, dtype="float64")(h)
        h = layers.GRU(H, reset_after=False, dtype="float64")(h)
        return keras.Model(inp, keras.layers.Dense(2, dtype="float64")(h))

    k = build(keras.layers)
    k.save_weights(tmp_path / "k.weights.h5")
    g = build(gk)
    g.load_weights(tmp_path / "k.weights.h5")
    assert isinstance(g.layers[2], gk.LSTM)
    _assert_same(k(x), g(x))


def _gyre_nn_from(layer):
    """A gyre.nn.LSTM holding layer's weights (gyre's layout), for the extras."""
    g = gyre.nn.LSTM(I, H, batch_first=True, peephole=layer.peephole, layer_norm=layer.layer_norm,
                     zoneout=layer.zoneout, backend="reference").double()
    p = layer._gyre_params()
    with torch.no_grad():
        for name, v in p.items():
            getattr(g, f"{name}_l0").copy_(v)
    return g.eval()


def test_extras_equal_gyre_nn():
    x = _x()
    layer = gk.LSTM(H, peephole=True, layer_norm=True, zoneout=(0.2, 0.1), return_sequences=True,
                    return_state=True, dtype="float64")
    layer(x)
    layer.set_weights([np.random.default_rng(i).uniform(-0.5, 0.5, size=w.shape)
                       for i, w in enumerate(layer.get_weights())])
    assert len(layer.get_weights()) == 3 + 3 + 4
    out, h, c = layer(x)  # inference: zoneout's expectation
    ref, (rh, rc) = _gyre_nn_from(layer)(torch.from_numpy(x))
    _assert_same([ref, rh[0], rc[0]], [out, h, c])


def test_recurrent_any_cell():
    x = _x()
    for name in ("gru_cho", "mingru", "peephole", "rnn_output"):
        layer = gk.Recurrent(name, H, return_sequences=True)
        out = layer(x.astype("float32"))
        ref_layer = gyre.nn.Recurrent(name, I, H, batch_first=True, backend="reference")
        with torch.no_grad():
            for n, v in layer.cell.params().items():
                getattr(ref_layer, f"{n}_l0").copy_(v)
        ref, _ = ref_layer(torch.from_numpy(x).float())
        np.testing.assert_allclose(_np(out), ref.detach().numpy(), atol=1e-5, rtol=0)
    lstm = gk.Recurrent("lstm", H, cell_options={"proj_size": 2}, return_state=True)
    out, h, c = lstm(x.astype("float32"))
    assert tuple(out.shape) == (B, 2) and tuple(c.shape) == (B, H)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation: got 'elu'"):
        gk.LSTM(H, activation="elu")
    with pytest.raises(ValueError, match="recurrent_activation: got 'gelu'"):
        gk.GRU(H, recurrent_activation="gelu")
    with pytest.raises(ValueError, match="zoneout"):
        gk.LSTM(H, zoneout=1.5)
    with pytest.raises(ValueError, match="backend"):
        gk.SimpleRNN(H, backend="cudnn")
    with pytest.raises(ValueError, match="cell: got 'nope'"):
        gk.Recurrent("nope", H)


@pytest.mark.parametrize("env,code,message", [
    ({"KERAS_BACKEND": "numpy"}, "import gyre.keras", "torch backend"),
    ({}, "import sys; sys.modules['keras'] = None; import gyre.keras", "gyre[keras]"),
])
def test_import_errors(env, code, message):
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: gyre.keras needs Keras 3") and message in last


EXAMPLES = pathlib.Path(__file__).parents[1] / "examples" / "keras"


def _run_example(name):
    pytest.importorskip("aeon")
    keras.utils.set_random_seed(0)
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_example_001_binary_classifier_learns():
    """Reference text 001's classifier, run as written (10 epochs on ItalyPowerDemand's 67
    training days): on the 1029 test days it beats the majority class and the training prior's
    log-loss."""
    g = _run_example("rnn_001_binary_classifier.py")
    model, X, y = g["model"], g["X_test"], g["y_test"]
    assert isinstance(model.layers[0], gk.LSTM) and X.shape == (1029, 24, 1)
    p = np.clip(model.predict(X, verbose=0)[:, 0].astype("float64"), 1e-7, 1 - 1e-7)
    acc = ((p > 0.5) == (y > 0.5)).mean()
    majority = max(y.mean(), 1 - y.mean())
    prior = g["y_train"].mean()
    log_loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    prior_loss = -(y * np.log(prior) + (1 - y) * np.log(1 - prior)).mean()
    assert acc > majority + 0.03 and log_loss < prior_loss - 0.02, (acc, majority, log_loss, prior_loss)


def test_example_003_stacked_relu_lstm_learns():
    """Reference text 003's stacked ReLU LSTM, run as written (10 epochs on JapaneseVowels'
    270 training utterances): on the 370 test utterances it beats the majority speaker and the
    training prior's cross-entropy by far."""
    from aeon.datasets import load_japanese_vowels
    g = _run_example("rnn_003_stacked_relu_lstm.py")
    model = g["model"]
    assert [type(m) for m in model.layers[:2]] == [gk.LSTM, gk.LSTM]
    assert model.layers[0].gyre_cell.activation == "relu"
    utterances, speakers = load_japanese_vowels(split="test")
    X = np.zeros((len(utterances), g["timesteps"], g["input_dim"]))
    for n, u in enumerate(utterances):
        X[n, :u.shape[1]] = u.T
    y = speakers.astype(int) - 1
    p = np.clip(model.predict(X, verbose=0).astype("float64"), 1e-7, 1)
    acc = (p.argmax(1) == y).mean()
    majority = np.bincount(y).max() / len(y)
    prior = g["y"].mean(0)
    ce, prior_ce = -np.log(p[np.arange(len(y)), y]).mean(), -np.log(prior[y]).mean()
    assert acc > majority + 0.2 and ce < prior_ce - 0.3, (acc, majority, ce, prior_ce)


# gyre.keras.Sequential / Model: Keras's models with gyre's lean train_step and fit loop


def _stack(seq, L, dropout=True, **kw):
    """Input -> L(relu, sequences) -> L -> [Dropout] -> Dense(3, softmax), float64, seeded."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((T, I), dtype="float64"),
              L(H, activation="relu", return_sequences=True, dtype="float64", **kw),
              L(H, dtype="float64", kernel_regularizer="l2", **kw)]
    layers += [keras.layers.Dropout(0.3, dtype="float64", seed=3)] if dropout else []
    return seq(layers + [keras.layers.Dense(3, activation="softmax", dtype="float64")])


def _fit_data(n=21):
    x = _x(5, (n, T, I))
    y = np.eye(3)[(np.abs(x[:, :, 0].sum(1)) * 2).astype(int) % 3]
    return x, y


class _BatchLogs(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.seen = getattr(self, "seen", []) + [dict(logs)]


def _fit_same(models, x, y, callbacks=(), **fit_kw):
    """Fit each model from the first one's weights; their weights, History and (with a
    callback that reads them) batch logs."""
    out, w0 = [], models[0].get_weights()
    for m in models:
        m.set_weights(w0)
        m.compile(optimizer=keras.optimizers.Adam(0.02), loss="categorical_crossentropy",
                  metrics=["accuracy"])
        cbs = [type(c)() for c in callbacks]
        keras.utils.set_random_seed(7)  # the shuffles and Dropout's masks
        h = m.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=cbs, **fit_kw)
        out.append((m.get_weights(), h.history, [getattr(c, "seen", None) for c in cbs]))
    return out


def _assert_fits_equal(out, atol=0.0):
    (w, h, logs), rest = out[0], out[1:]
    for w2, h2, logs2 in rest:
        for a, b in zip(w, w2, strict=True):
            np.testing.assert_allclose(b, a, atol=atol, rtol=0)
        assert h2.keys() == h.keys()
        for k in h:
            np.testing.assert_allclose(h2[k], h[k], atol=atol, rtol=0)
        assert logs2 == logs if atol == 0 else len(logs2) == len(logs)


@pytest.mark.parametrize("fit_kw,layer_kw", [
    (dict(validation_split=0.25), {}),
    (dict(class_weight={0: 1.0, 1: 2.0, 2: 0.5}, validation_data="xy", shuffle="batch"), {}),
    (dict(sample_weight="w", shuffle=False), dict(dropout=0.2, seed=4)),
], ids=["validation_split", "class_weight", "sample_weight-lstm_dropout"])
def test_lean_fit_equals_stock_fit(fit_kw, layer_kw, monkeypatch):
    """gyre.keras.Sequential's fit (direct layer calls, its own loop) gives bit for bit the
    weights, History and batch logs of keras.Sequential's stock fit with the same gyre layers,
    and Keras's own layers' within float64 rounding; its training forward skips
    Layer.__call__."""
    x, y = _fit_data()
    fit_kw = {k: {"xy": (x[:6], y[:6]), "w": np.linspace(0.5, 2, len(x))}.get(v, v)
              if isinstance(v, str) and k != "shuffle" else v for k, v in fit_kw.items()}
    calls = []
    call = keras.layers.Layer.__call__

    def counting(self, *a, **k):
        calls.append((type(self), k.get("training")))
        return call(self, *a, **k)

    monkeypatch.setattr(gk.LSTM, "__call__", counting, raising=False)
    models = [_stack(keras.Sequential, gk.LSTM, **layer_kw), _stack(gk.Sequential, gk.LSTM, **layer_kw),
              _stack(keras.Sequential, keras.layers.LSTM, **layer_kw)]
    out = _fit_same(models, x, y, callbacks=[_BatchLogs()], **fit_kw)
    _assert_fits_equal(out[:2])
    _assert_fits_equal(out[::2], atol=1e-9)
    assert out[1][2][0] and set(out[1][2][0][0]) == {"loss", "accuracy"}  # batch logs, read
    calls.clear()
    models[1].fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert calls == []  # the lean forward called gyre's LSTM.call, not Layer.__call__
    models[0].fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert (gk.LSTM, True) in calls


class _OwnStep(gk.Sequential):
    def train_step(self, data):
        self.own_steps = getattr(self, "own_steps", 0) + 1
        return super().train_step(data)


def test_lean_fit_falls_back_to_keras():
    """What the lean path does not cover runs Keras's own code, with the same results: a mask
    (Keras's Layer.__call__ carries it), a subclass's train_step, nothing trainable (Keras's
    warning), a PyDataset, a model with two outputs and a loss per output."""
    x, y = _fit_data(12)

    def masked(seq):
        keras.utils.set_random_seed(0)
        return seq([keras.Input((T, I), dtype="float64"), keras.layers.Masking(dtype="float64"),
                    gk.GRU(H, dtype="float64"), keras.layers.Dense(3, activation="softmax",
                                                                   dtype="float64")])
    xm = x.copy()
    xm[2, 4:] = 0.0
    _assert_fits_equal(_fit_same([masked(keras.Sequential), masked(gk.Sequential)], xm, y))
    own = _stack(_OwnStep, gk.LSTM, dropout=False)
    _assert_fits_equal(_fit_same([_stack(keras.Sequential, gk.LSTM, dropout=False), own], x, y))
    assert own.own_steps == 2 * 3
    frozen = _stack(gk.Sequential, gk.LSTM, dropout=False)
    frozen.trainable = False
    frozen.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.warns(UserWarning, match="does not have any trainable weights"):
        frozen.fit(x, y, epochs=1, verbose=0)

    class Data(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]

    ms = [_stack(keras.Sequential, gk.LSTM, dropout=False), _stack(gk.Sequential, gk.LSTM, dropout=False)]
    ws, w0 = [], ms[0].get_weights()
    for m in ms:
        m.compile(optimizer="adam", loss="categorical_crossentropy")
        m.set_weights(w0)
        m.fit(Data(), epochs=1, shuffle=False, verbose=0)
        ws.append(m.get_weights())
    for a, b in zip(*ws, strict=True):
        np.testing.assert_array_equal(a, b)

    def two_heads(model_cls):
        keras.utils.set_random_seed(0)
        inp = keras.Input((T, I), dtype="float64")
        h = gk.LSTM(H, dtype="float64")(inp)
        return model_cls(inp, [keras.layers.Dense(3, activation="softmax", dtype="float64")(h),
                               keras.layers.Dense(1, dtype="float64")(h)])
    ws = []
    for cls in (keras.Model, gk.Model):
        m = two_heads(cls)
        if cls is keras.Model:
            w0 = m.get_weights()
        m.set_weights(w0)
        m.compile(optimizer="adam", loss=["categorical_crossentropy", "mse"], loss_weights=[1, 0.5])
        m.fit(x, [y, x[:, 0, :1]], batch_size=4, epochs=1, shuffle=False, verbose=0)
        ws.append(m.get_weights())
    for a, b in zip(*ws, strict=True):
        np.testing.assert_array_equal(a, b)


def test_gyre_models_are_keras_models(tmp_path):
    """gyre.keras.Model(inputs, outputs) is a functional gyre Model (without changing
    gyre.keras.Model's bases, which a subclass keeps); both save and load as gyre's classes."""
    from gyre.keras.models import Model, Sequential, load_model
    bases = Model.__bases__
    inp = keras.Input((T, I))
    f = Model(inp, keras.layers.Dense(2)(gk.LSTM(H)(inp)))
    assert isinstance(f, Model) and isinstance(f, keras.Model) and f.__class__.__name__ == "Functional"
    assert Model.__bases__ == bases

    class Sub(Model):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = gk.LSTM(H), keras.layers.Dense(2)

        def call(self, x, training=False):
            return self.head(self.rnn(x, training=training))

    seq = Sequential([keras.Input((T, I)), gk.LSTM(H), keras.layers.Dense(2)])
    x, y = _fit_data(8)
    for m in (f, Sub(), seq):
        m.compile(optimizer="adam", loss="mse")
        hist = m.fit(x.astype("float32"), y[:, :2], epochs=2, batch_size=4, verbose=0)
        assert len(hist.history["loss"]) == 2 and np.isfinite(hist.history["loss"]).all()
    for m in (f, seq):
        m.save(tmp_path / "m.keras")
        back = load_model(tmp_path / "m.keras")
        assert isinstance(back, Model | Sequential) and type(back) is type(m)
        np.testing.assert_allclose(_np(back(x.astype("float32"))), _np(m(x.astype("float32"))),
                                   atol=1e-6)


@pytest.mark.parametrize("fit_kw", [
    dict(steps_per_epoch=2, epochs=3, initial_epoch=1),
    dict(epochs=4, validation_freq=2, verbose=2, stop=True),
], ids=["steps_per_epoch-initial_epoch", "validation_freq-early_stopping-verbose2"])
def test_lean_fit_loop_arguments_as_keras(fit_kw, capsys):
    """fit's loop arguments and a callback that stops training act as in Keras's fit (a GRU,
    a SimpleRNN, AUC beside accuracy)."""
    x, y = _fit_data(20)
    fit_kw = dict(fit_kw)
    stop = fit_kw.pop("stop", False)
    out = []
    for seq in (keras.Sequential, gk.Sequential):
        keras.utils.set_random_seed(0)
        m = seq([keras.Input((T, I), dtype="float64"),
                 gk.GRU(H, return_sequences=True, dtype="float64"), gk.SimpleRNN(H, dtype="float64"),
                 keras.layers.Dense(3, activation="softmax", dtype="float64")])
        m.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy", "auc"])
        if out:
            m.set_weights(out[0][0])
        w0 = m.get_weights()
        cbs = [keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10)] if stop else []
        keras.utils.set_random_seed(1)
        h = m.fit(x, y, batch_size=4, validation_data=(x[:4], y[:4]), callbacks=cbs,
                  **{"verbose": 0, **fit_kw})
        out.append((w0, m.get_weights(), h.history, h.params, capsys.readouterr().out))
    (_, wk, hk, pk, ok), (_, wg, hg, pg, og) = out
    for a, b in zip(wk, wg, strict=True):
        np.testing.assert_array_equal(b, a)
    assert hg == hk and pg == pk
    assert og.count("Epoch") == ok.count("Epoch") == (2 if fit_kw.get("verbose") else 0)
    assert len(hk["loss"]) == (2 if stop or "initial_epoch" in fit_kw else 4)


class _PlanSeen(keras.callbacks.Callback):
    """Records which torch forms of gyre.keras._fast the lean step ran with (None: Keras's)."""

    def on_train_batch_end(self, batch, logs=None):
        plan = getattr(self.model, "_gyre_plan", None)
        if plan is None:
            return
        self.seen = {"dense": plan.calls is not None
                     and plan.calls[-1][0].__qualname__.startswith("lean_dense"),
                     "loss": plan.loss is not None, "metrics": plan.metrics is not None,
                     "apply": plan.apply is not None}


def _float32_stack(seq, opt, loss="categorical_crossentropy", activation="softmax"):
    keras.utils.set_random_seed(0)
    m = seq([keras.Input((T, I)), gk.LSTM(H, activation="relu", return_sequences=True),
             gk.LSTM(H, activation="relu"), keras.layers.Dense(3, activation=activation)])
    m.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    return m


@pytest.mark.parametrize("opt,loss,activation,torch_forms", [
    (lambda: "adam", "categorical_crossentropy", "softmax", {"dense", "loss", "metrics", "apply"}),
    (lambda: keras.optimizers.Adam(0.01, beta_1=0.8, epsilon=1e-4), "categorical_crossentropy",
     "tanh", {"dense", "loss", "metrics", "apply"}),
    (lambda: keras.optimizers.Adam(0.01, clipnorm=0.5, amsgrad=True),
     keras.losses.CategoricalCrossentropy(label_smoothing=0.1), "softmax", {"dense", "metrics"}),
    (lambda: keras.optimizers.SGD(0.05, momentum=0.9), "mse", None, {"dense", "metrics"}),
], ids=["adam-cce", "adam-args-tanh", "clipnorm-amsgrad-smoothing", "sgd-mse"])
def test_lean_torch_forms_equal_keras(opt, loss, activation, torch_forms, monkeypatch):
    """The lean step's torch forms (gyre.keras._fast: Dense, categorical cross-entropy, the
    loss tracker and accuracy, Keras's torch Adam) give bit for bit the weights and History
    of stock fit (keras.Sequential, same gyre layers) and of the lean fit with them turned off
    (GYRE_KERAS_FAST=0), in float32 as text 003's model runs; configurations they do not
    cover (clipnorm, AMSGrad, label smoothing, SGD, MSE) run Keras's own pieces."""
    x, y = _fit_data(14)
    x = x.astype("float32")
    y = y.astype("float32")
    out = []
    for seq, fast in ((keras.Sequential, "1"), (gk.Sequential, "1"), (gk.Sequential, "0")):
        monkeypatch.setenv("GYRE_KERAS_FAST", fast)
        m = _float32_stack(seq, opt(), loss, activation)
        seen = _PlanSeen()
        keras.utils.set_random_seed(7)
        h = m.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[seen])
        out.append((m.get_weights(), h.history, getattr(seen, "seen", None)))
    assert out[0][2] is None  # stock fit: no plan
    assert {k for k, v in out[1][2].items() if v} == torch_forms
    assert not any(out[2][2].values())
    for w, hist, _ in out[1:]:
        for a, b in zip(out[0][0], w, strict=True):
            np.testing.assert_array_equal(b, a)
        assert hist == out[0][1]


@pytest.fixture
def fresh_guard():
    from gyre.keras import _guard
    _guard.reset()
    yield _guard
    _guard.reset()


@pytest.mark.parametrize("group,change", [
    ("loop", "missing"), ("loop", "changed"), ("forms", "missing")])
def test_lean_fit_guard_falls_back_to_keras(group, change, fresh_guard, monkeypatch):
    """Where a Keras internal the lean fit (or its torch forms) builds on is missing or its
    source differs from the tested Keras's, fit warns once and runs Keras's own fit (or the
    lean loop with Keras's own pieces), with stock fit's weights and History bit for bit."""
    from keras.src.backend.torch import trainer as torch_trainer
    assert fresh_guard.loop_ok() and fresh_guard.forms_ok()  # the Keras installed is the tested
    fresh_guard.reset()
    table = fresh_guard.LOOP if group == "loop" else fresh_guard.FORMS
    if change == "missing":
        monkeypatch.setitem(table, ("keras.src.backend.torch.trainer", "TorchTrainer.gone"), "0")
    else:
        own = torch_trainer.TorchEpochIterator._get_iterator

        def changed(self):  # another Keras's version of this function: other source
            return own(self)
        monkeypatch.setattr(torch_trainer.TorchEpochIterator, "_get_iterator", changed)
    x, y = _fit_data(10)
    x, y = x.astype("float32"), y.astype("float32")
    out = []
    for seq in (keras.Sequential, gk.Sequential, gk.Sequential):
        m = _float32_stack(seq, "adam")
        seen = _PlanSeen()
        keras.utils.set_random_seed(7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h = m.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[seen])
        out.append((m.get_weights(), h.history, getattr(seen, "seen", None),
                    [str(w.message) for w in caught if "Keras's own" in str(w.message)]))
    assert out[0][3] == []  # stock fit never asks
    assert len(out[1][3]) == 1 and out[2][3] == []  # one warning per process
    assert ("TorchTrainer.gone is missing" if change == "missing"
            else "_get_iterator differs from Keras") in out[1][3][0]
    if group == "loop":
        assert out[1][2] is None and out[2][2] is None  # Keras's own fit and train_step
    else:
        assert not any(out[1][2].values())  # the lean loop with Keras's own pieces
    for w, hist, _, _ in out[1:]:
        for a, b in zip(out[0][0], w, strict=True):
            np.testing.assert_array_equal(b, a)
        assert hist == out[0][1]


def test_lean_batches_equal_keras_array_dataset():
    """The lean iterator's batches (torch tensors over the arrays, indexed per batch) equal
    Keras's ArrayDataset.__getitems__ in values, dtype and structure; arrays it does not cover
    (uint32, which Keras converts to int64) keep Keras's own slicing."""
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from gyre.keras import training
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, 3, 2))
    arrays = (x.astype("float32"), x, rng.integers(0, 5, 11), (rng.random(11) > 0.5))
    for a in arrays:
        adapter = ArrayDataAdapter(a, y=np.arange(11.0), batch_size=4, shuffle=True)
        ds = adapter.get_torch_dataloader().dataset
        tensors = training._as_tensors(ds.array)
        assert tensors is not None
        for idx in ([3, 0, 7, 1], [10], list(range(11))):
            want = ds.__getitems__(idx)
            got = tuple(None if t is None else t[torch.as_tensor(idx)] for t in tensors)
            assert type(got) is type(want) and len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert (g is None) == (w is None)
                if w is not None:
                    assert g.dtype == w.dtype and torch.equal(g, w)
    ds = ArrayDataAdapter(np.arange(11, dtype="uint32"), batch_size=4).get_torch_dataloader().dataset
    assert training._as_tensors(ds.array) is None


def test_lean_functional_with_torch_forms_equals_keras_model():
    """A functional gyre.keras.Model (its forward through Keras's graph, the loss, metrics and
    Adam in the torch forms) trains bit for bit as keras.Model with the same layers."""
    x, y = _fit_data(10)
    x, y = x.astype("float32"), y.astype("float32")
    out = []
    for cls in (keras.Model, gk.Model):
        keras.utils.set_random_seed(0)
        inp = keras.Input((T, I))
        m = cls(inp, keras.layers.Dense(3, activation="softmax")(gk.LSTM(H, activation="relu")(inp)))
        m.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        seen = _PlanSeen()
        keras.utils.set_random_seed(7)
        h = m.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[seen])
        out.append((m.get_weights(), h.history, getattr(seen, "seen", None)))
    assert out[0][2] is None
    assert out[1][2] == {"dense": False, "loss": True, "metrics": True, "apply": True}
    for a, b in zip(out[0][0], out[1][0], strict=True):
        np.testing.assert_array_equal(b, a)
    assert out[1][1] == out[0][1]
