"""``activation`` / ``recurrent_activation`` of the built-in LSTM, GRU and RNN cells: the
formula written out here, the reference backend, ``fused`` (the activation is part of the traced
math) and ``scan``-free cells alike; ``native`` declines every non-default choice; defaults keep
torch's state dicts and kernels."""

from __future__ import annotations

import pytest
import torch

from gyre import cells, engine
from gyre.cells import activations
from gyre.engine import fused
from gyre.nn import GRU, LSTM, RNN, Recurrent

DT = torch.float64
I, H, T, B = 3, 4, 6, 3

# the activations written out independently of gyre.cells.activations (Keras's definitions)
ACT = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": lambda v: torch.clamp(v, min=0),
    "linear": lambda v: v,
    "hard_sigmoid": lambda v: torch.clamp(v / 6 + 0.5, 0, 1),
    "softsign": lambda v: v / (1 + v.abs()),
    "silu": lambda v: v / (1 + torch.exp(-v)),
    "swish": lambda v: v / (1 + torch.exp(-v)),
}

LSTM_CASES = [("relu", "sigmoid"), ("linear", "hard_sigmoid"), ("softsign", "sigmoid"),
              ("silu", "tanh")]
GRU_CASES = [("relu", "sigmoid"), ("tanh", "hard_sigmoid"), ("softsign", "linear")]


def _randomised(m):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.7, 0.7)
    return m


def _lstm_formula(P, x, act, gate):
    h = x.new_zeros(x.shape[1], H)
    c = x.new_zeros(x.shape[1], H)
    outs = []
    for xt in x:
        a = xt @ P["weight_ih_l0"].T + P["bias_ih_l0"] + h @ P["weight_hh_l0"].T + P["bias_hh_l0"]
        ai, af, ag, ao = a.split(H, -1)
        c = ACT[gate](af) * c + ACT[gate](ai) * ACT[act](ag)
        h = ACT[gate](ao) * ACT[act](c)
        outs.append(h)
    return torch.stack(outs), h, c


def _gru_formula(P, x, act, gate, reset_after):
    h = x.new_zeros(x.shape[1], H)
    outs = []
    for xt in x:
        xr, xz, xn = (xt @ P["weight_ih_l0"].T + P["bias_ih_l0"]).split(H, -1)
        Wr, Wz, Wn = P["weight_hh_l0"].split(H)
        br, bz, bn = P["bias_hh_l0"].split(H)
        r = ACT[gate](xr + h @ Wr.T + br)
        z = ACT[gate](xz + h @ Wz.T + bz)
        rec = r * (h @ Wn.T + bn) if reset_after else (r * h) @ Wn.T + bn
        n = ACT[act](xn + rec)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h


def _rnn_formula(P, x, act):
    h = x.new_zeros(x.shape[1], H)
    outs = []
    for xt in x:
        h = ACT[act](xt @ P["weight_ih_l0"].T + P["bias_ih_l0"] + h @ P["weight_hh_l0"].T
                     + P["bias_hh_l0"])
        outs.append(h)
    return torch.stack(outs), h


def _params(m):
    return dict(m.named_parameters())


@pytest.mark.parametrize("act,gate", LSTM_CASES)
def test_lstm_formula(act, gate):
    m = _randomised(LSTM(I, H, activation=act, recurrent_activation=gate, backend="reference")
                    .to(DT))
    x = torch.randn(T, B, I, dtype=DT)
    out, (h, c) = m(x)
    ref_out, ref_h, ref_c = _lstm_formula(_params(m), x, act, gate)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h[0], ref_h, atol=1e-12, rtol=0)
    torch.testing.assert_close(c[0], ref_c, atol=1e-12, rtol=0)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("act,gate", GRU_CASES)
def test_gru_formula(act, gate, reset_after):
    m = _randomised(GRU(I, H, activation=act, recurrent_activation=gate, reset_after=reset_after,
                        backend="reference").to(DT))
    x = torch.randn(T, B, I, dtype=DT)
    out, h = m(x)
    ref_out, ref_h = _gru_formula(_params(m), x, act, gate, reset_after)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h[0], ref_h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("act", ["linear", "sigmoid", "softsign", "relu"])
def test_rnn_formula(act):
    m = _randomised(RNN(I, H, nonlinearity=act, backend="reference").to(DT))
    x = torch.randn(T, B, I, dtype=DT)
    out, h = m(x)
    ref_out, ref_h = _rnn_formula(_params(m), x, act)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h[0], ref_h, atol=1e-12, rtol=0)


FUSED_CELLS = [cells.LSTM(activation=a, recurrent_activation=g) for a, g in LSTM_CASES] + [
    cells.LSTM(peephole=True, layer_norm=True, activation="relu"),
    cells.GRU(activation="relu"),
    cells.GRU(reset_after=False, activation="softsign", recurrent_activation="hard_sigmoid"),
    cells.GRU(layer_norm=True, recurrent_activation="hard_sigmoid"),
    cells.RNN(nonlinearity="linear"),
    cells.RNN(nonlinearity="softsign"),
]


@pytest.mark.skipif(fused.available() is not None, reason=f"no C++ toolchain: {fused.available()}")
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("cell", FUSED_CELLS, ids=lambda c: c.describe())
def test_fused_equals_reference(cell):
    """Outputs, final states and every gradient, two layers, both directions, lengths."""
    x = torch.randn(T, B, I, dtype=DT)
    lengths = torch.tensor([T, 4, 2])
    results = []
    for backend in ("reference", "fused"):
        m = _randomised(Recurrent(cell, I, H, num_layers=2, bidirectional=True,
                                  backend=backend).to(DT))
        xi = x.clone().requires_grad_(True)
        out, st = m(xi, lengths=lengths)
        st = st if isinstance(st, tuple) else (st,)
        loss = (out ** 2).sum() + sum((s * s.cos()).sum() for s in st)
        grads = torch.autograd.grad(loss, [xi, *m.parameters()])
        results.append((out, st, grads))
    (o0, s0, g0), (o1, s1, g1) = results
    torch.testing.assert_close(o1, o0, atol=1e-10, rtol=0)
    for a, b in zip(s1, s0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cell", FUSED_CELLS, ids=lambda c: c.describe())
def test_native_declines(cell):
    assert engine.native.mode(cell) is None
    with pytest.raises(ValueError, match="native"):
        engine.select_backend(cell, "native")
    assert engine.select_backend(cell, "auto") != "native"


def test_defaults_unchanged():
    """Default activations: torch's kernels and state dicts, as before."""
    for cell in (cells.LSTM(), cells.GRU(), cells.RNN(nonlinearity="relu"),
                 cells.LSTM(activation="tanh", recurrent_activation="sigmoid")):
        assert engine.native.mode(cell) is not None
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, 2).to(DT)
    m = LSTM(I, H, 2, backend="native").to(DT)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=DT)
    torch.testing.assert_close(m(x)[0], ref(x)[0], atol=1e-12, rtol=0)
    assert LSTM(I, H).cell == cells.LSTM()


def test_recurrent_keywords():
    assert Recurrent("lstm", I, H, activation="relu").cell == cells.LSTM(activation="relu")
    assert Recurrent("peephole", I, H, recurrent_activation="hard_sigmoid").cell == \
        cells.LSTM(peephole=True, recurrent_activation="hard_sigmoid")
    assert Recurrent("rnn_tanh", I, H, activation="linear").cell == cells.RNN(nonlinearity="linear")
    assert Recurrent(cells.GRU(), I, H, activation="relu").cell == cells.GRU(activation="relu")
    with pytest.raises(ValueError, match="recurrent_activation"):
        Recurrent("rnn_tanh", I, H, recurrent_activation="sigmoid")
    with pytest.raises(ValueError, match="activation: got 'gelu'"):
        LSTM(I, H, activation="gelu")
    with pytest.raises(ValueError, match="recurrent_activation: got 3"):
        GRU(I, H, recurrent_activation=3)
    assert "activation=relu" in repr(LSTM(I, H, activation="relu"))


def test_activation_table_matches_written_out():
    v = torch.linspace(-8, 8, 161, dtype=DT)
    for name, fn in activations.ACTIVATIONS.items():
        torch.testing.assert_close(fn(v), ACT[name](v), atol=1e-14, rtol=0)
