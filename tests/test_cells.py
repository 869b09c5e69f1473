"""Every cell: gradcheck, its formula computed independently, step-by-step vs whole sequence,
batch invariance, lengths= vs unpadded sequences."""

from __future__ import annotations

import pytest
import torch

from gyre import cells
from gyre.nn import Recurrent

DT = torch.float64
ATOL = 1e-10

CELLS = {name: cells.get(name) for name in cells.names()}
CELLS["lstm_proj"] = cells.LSTM(proj_size=2)
CELLS["peephole_ln_proj"] = cells.LSTM(peephole=True, layer_norm=True, proj_size=2)
CELLS["rnn_output_softmax"] = cells.OutputRNN(out_features=3, output_activation="softmax")


def _layer(cell, I=3, H=4, **kw):
    torch.manual_seed(0)
    m = Recurrent(cell, I, H, backend="reference", **kw).to(DT)
    # randomise every parameter (layer-norm gains start at 1, biases at 0)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.8, 0.8)
    return m


def _state_list(st):
    return list(st) if isinstance(st, tuple) else [st]


@pytest.mark.parametrize("name", sorted(CELLS))
def test_gradcheck(name):
    m = _layer(CELLS[name], I=3, H=3)
    x = torch.randn(4, 2, 3, dtype=DT, requires_grad=True)
    params = dict(m.named_parameters())
    keys = list(params)

    def f(x, *ps):
        out, st = torch.func.functional_call(m, dict(zip(keys, ps, strict=True)), (x,))
        return (out, *_state_list(st))

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-7)


# ---- formulas written out independently of gyre.cells -------------------------------------------
sig, tanh = torch.sigmoid, torch.tanh


def _lin(W, v):
    return v @ W.T


def _norm(v):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + 1e-5)


def formula(name, P, x, state):
    """One step of each cell straight from its paper / reference text. P: the layer's
    parameters with the ``_l0`` suffix removed. Returns (output, new_state)."""
    if name == "gated_004":  # reference text 004
        (h,) = state
        H = h.shape[-1]
        W, U, b = P["weight_ih"], P["weight_hh"], P["bias"]
        Wi, Wf, Wo, Wc = W.split(H)
        Ui, Uf, Uo, Uc = U.split(H)
        bi, bf, bo, bc = b.split(H)
        i = sig(_lin(Wi, x) + _lin(Ui, h) + bi)
        f = sig(_lin(Wf, x) + _lin(Uf, h) + bf)
        o = sig(_lin(Wo, x) + _lin(Uo, h) + bo)
        ht = tanh(_lin(Wc, x) + _lin(Uc, f * h) + bc)
        hn = o * tanh(h) + i * ht
        return hn, (hn,)
    if name == "gru_001":  # reference text 001
        (h,) = state
        H = h.shape[-1]
        Wxz, Wxr, Wxh = P["weight_ih"].split(H)
        Whz, Whr, Whh = P["weight_hh"].split(H)
        bz, br, bh = P["bias"].split(H)
        z = sig(_lin(Wxz, x) + _lin(Whz, h) + bz)
        r = sig(_lin(Wxr, x) + _lin(Whr, h) + br)
        ht = tanh(_lin(Wxh, x) * r + _lin(Whh, h) * (1 - z) + bh)
        hn = (1 - z) * h + z * ht
        return hn, (hn,)
    if name == "gru_002":  # reference text 002
        (h,) = state
        H = h.shape[-1]
        Wxz, Wxr, Wxh = P["weight_ih"].split(H)
        Whz, Whr, Whh = P["weight_hh"].split(H)
        bz, br, bht = P["bias"].split(H)
        b_h = P["bias_h"]
        z = sig(_lin(Wxz, x) + _lin(Whz, h) + bz)
        r = sig(_lin(Wxr, x) + _lin(Whr, h) + br)
        ht = tanh(_lin(Wxh, x) + _lin(Whh, (1 - r) * h + r * b_h) + bht)
        hn = (1 - z) * h + z * ht
        return hn, (hn,)
    if name in ("rnn_output", "rnn_output_softmax"):  # reference texts 000, 002, 003
        (h,) = state
        hn = tanh(_lin(P["weight_hh"], h) + _lin(P["weight_xh"], x) + P["bias_h"])
        y = _lin(P["weight_hy"], hn) + P["bias_y"]
        if name == "rnn_output_softmax":
            y = torch.exp(y) / torch.exp(y).sum(-1, keepdim=True)
        return y, (hn,)
    if name == "peephole":  # Gers & Schmidhuber 2000; reference text 001
        h, c = state
        H = c.shape[-1]
        Wi, Wf, Wg, Wo = P["weight_ih"].split(H)
        Ui, Uf, Ug, Uo = P["weight_hh"].split(H)
        b = P["bias_ih"] + P["bias_hh"]
        bi, bf, bg, bo = b.split(H)
        i = sig(_lin(Wi, x) + _lin(Ui, h) + P["weight_ci"] * c + bi)
        f = sig(_lin(Wf, x) + _lin(Uf, h) + P["weight_cf"] * c + bf)
        cn = f * c + i * tanh(_lin(Wg, x) + _lin(Ug, h) + bg)
        o = sig(_lin(Wo, x) + _lin(Uo, h) + P["weight_co"] * cn + bo)
        hn = o * tanh(cn)
        return hn, (hn, cn)
    if name == "ln_lstm":  # Ba et al. 2016
        h, c = state
        H = c.shape[-1]
        a = (P["ln_ih_weight"] * _norm(_lin(P["weight_ih"], x))
             + P["ln_hh_weight"] * _norm(_lin(P["weight_hh"], h)) + P["bias_ih"] + P["bias_hh"])
        ai, af, ag, ao = a.split(H, dim=-1)
        cn = sig(af) * c + sig(ai) * tanh(ag)
        hn = sig(ao) * tanh(P["ln_c_weight"] * _norm(cn) + P["ln_c_bias"])
        return hn, (hn, cn)
    if name == "gru_cho":  # Cho et al. 2014
        (h,) = state
        H = h.shape[-1]
        Wr, Wz, Wn = P["weight_ih"].split(H)
        Ur, Uz, Un = P["weight_hh"].split(H)
        bir, biz, bin_ = P["bias_ih"].split(H)
        bhr, bhz, bhn = P["bias_hh"].split(H)
        r = sig(_lin(Wr, x) + bir + _lin(Ur, h) + bhr)
        z = sig(_lin(Wz, x) + biz + _lin(Uz, h) + bhz)
        n = tanh(_lin(Wn, x) + bin_ + _lin(Un, r * h) + bhn)
        hn = (1 - z) * n + z * h
        return hn, (hn,)
    if name == "ln_gru":
        (h,) = state
        H = h.shape[-1]
        ax = P["ln_ih_weight"] * _norm(_lin(P["weight_ih"], x)) + P["bias_ih"]
        ah = P["ln_hh_weight"] * _norm(_lin(P["weight_hh"], h)) + P["bias_hh"]
        xr, xz, xn = ax.split(H, dim=-1)
        hr, hz, hn_ = ah.split(H, dim=-1)
        r, z = sig(xr + hr), sig(xz + hz)
        n = tanh(xn + r * hn_)
        hn = (1 - z) * n + z * h
        return hn, (hn,)
    if name == "mingru":  # Feng et al. 2024
        (h,) = state
        H = h.shape[-1]
        Wz, Wh = P["weight_ih"].split(H)
        bz, bh = P["bias_ih"].split(H)
        z = sig(_lin(Wz, x) + bz)
        hn = (1 - z) * h + z * (_lin(Wh, x) + bh)
        return hn, (hn,)
    if name == "minlstm":  # Feng et al. 2024
        (h,) = state
        H = h.shape[-1]
        Wf, Wi, Wh = P["weight_ih"].split(H)
        bf, bi, bh = P["bias_ih"].split(H)
        f, i = sig(_lin(Wf, x) + bf), sig(_lin(Wi, x) + bi)
        hn = f / (f + i) * h + i / (f + i) * (_lin(Wh, x) + bh)
        return hn, (hn,)
    raise KeyError(name)


FORMULA_CELLS = ["gated_004", "gru_001", "gru_002", "rnn_output", "rnn_output_softmax", "peephole",
                 "ln_lstm", "gru_cho", "ln_gru", "mingru", "minlstm"]


@pytest.mark.parametrize("name", FORMULA_CELLS)
def test_cell_matches_its_formula(name):
    m = _layer(CELLS[name], I=3, H=4)
    P = {n.removesuffix("_l0"): p for n, p in m.named_parameters()}
    T, B = 5, 2
    x = torch.randn(T, B, 3, dtype=DT)
    state = tuple(torch.randn(B, s, dtype=DT) for s in m.state_sizes)
    hx = state[0][None] if len(state) == 1 else tuple(s[None] for s in state)
    out, final = m(x, hx)
    ys = []
    for t in range(T):
        y, state = formula(name, P, x[t], state)
        ys.append(y)
    torch.testing.assert_close(out, torch.stack(ys), atol=ATOL, rtol=0)
    for a, b in zip(_state_list(final), state, strict=True):
        torch.testing.assert_close(a[0], b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_step_by_step_equals_whole_sequence(name):
    m = _layer(CELLS[name], num_layers=2, zoneout=0.3).eval()  # eval: zoneout's expectation
    x = torch.randn(6, 2, 3, dtype=DT)
    out, final = m(x)
    state, ys = None, []
    for t in range(6):
        y, state = m.step(x[t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys), out, atol=ATOL, rtol=0)
    for a, b in zip(_state_list(state), _state_list(final), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_step_batch_first_and_unbatched():
    m = _layer("lstm", batch_first=True)
    x = torch.randn(2, 4, 3, dtype=DT)
    out, _ = m(x)
    y, st = m.step(x[:, 0])
    torch.testing.assert_close(y, out[:, 0], atol=ATOL, rtol=0)
    y1, _ = m.step(x[0, 0])
    torch.testing.assert_close(y1, out[0, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_lengths_equal_unpadded_and_batch_invariance(name):
    m = _layer(CELLS[name], num_layers=2, bidirectional=True, residual=True)
    T, lens = 6, [6, 2, 4]
    x = torch.randn(T, 3, 3, dtype=DT)
    out, final = m(x, lengths=lens)
    for b, n in enumerate(lens):
        o1, f1 = m(x[:n, b : b + 1])  # this sequence alone, unpadded
        torch.testing.assert_close(out[:n, b : b + 1], o1, atol=ATOL, rtol=0)
        assert torch.all(out[n:, b] == 0)
        for a, c in zip(_state_list(final), _state_list(f1), strict=True):
            torch.testing.assert_close(a[:, b : b + 1], c, atol=ATOL, rtol=0)


def test_forward_with_states_returns_every_cell_state():
    m = _layer("lstm", num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=DT)
    out, (h, c), (hs, cs) = m.forward_with_states(x, lengths=[5, 3])
    torch.testing.assert_close(hs, out, atol=ATOL, rtol=0)
    H = 4
    # the last layer's final states: forward direction at each sequence's last step, reverse at 0
    torch.testing.assert_close(cs[4, 0, :H], c[2, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(cs[2, 1, :H], c[2, 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(cs[0, :, H:], c[3], atol=ATOL, rtol=0)
    assert torch.all(cs[3:, 1] == 0)


def test_residual_adds_layer_input():
    m = _layer("gru", num_layers=2, residual=True)
    a = _layer("gru")
    b = _layer("gru", I=4)
    a.load_state_dict({k: v for k, v in m.state_dict().items() if k.endswith("_l0")})
    b.load_state_dict({k.replace("_l1", "_l0"): v for k, v in m.state_dict().items()
                       if k.endswith("_l1")})
    x = torch.randn(5, 2, 3, dtype=DT)
    y1, _ = a(x)
    y2, _ = b(y1)
    torch.testing.assert_close(m(x)[0], y2 + y1, atol=ATOL, rtol=0)


def test_recurrent_dropout_one_mask_per_sequence():
    """Training output equals the LSTM formula with the state multiplied by one fixed mask
    (scaled by 1/keep) before the recurrent product (Gal & Ghahramani 2016)."""
    m = _layer("lstm", recurrent_dropout=0.5).train()
    x = torch.randn(5, 2, 3, dtype=DT)
    torch.manual_seed(7)
    out, _ = m(x)
    torch.manual_seed(7)
    mask = torch.empty(2, 4, dtype=DT).bernoulli_(0.5) / 0.5
    P = {n.removesuffix("_l0"): p for n, p in m.named_parameters()}
    h = c = torch.zeros(2, 4, dtype=DT)
    for t in range(5):
        a = _lin(P["weight_ih"], x[t]) + P["bias_ih"] + _lin(P["weight_hh"], h * mask) + P["bias_hh"]
        ai, af, ag, ao = a.split(4, dim=-1)
        c = sig(af) * c + sig(ai) * tanh(ag)
        h = sig(ao) * tanh(c)
        torch.testing.assert_close(out[t], h, atol=ATOL, rtol=0)
    m.eval()
    torch.testing.assert_close(m(x)[0], _layer("lstm")(x)[0], atol=ATOL, rtol=0)


def test_zoneout_train_masks_and_eval_expectation():
    m = _layer("gru", zoneout=0.4)
    x = torch.randn(5, 2, 3, dtype=DT)
    plain = _layer("gru")
    P = {n.removesuffix("_l0"): p for n, p in m.named_parameters()}

    def gru_step(x_t, h):
        return _gru(P, x_t, h)

    m.train()
    torch.manual_seed(5)
    out, _ = m(x)
    torch.manual_seed(5)
    keep_old = torch.empty(5, 2, 4, dtype=DT).bernoulli_(0.4)
    h = torch.zeros(2, 4, dtype=DT)
    for t in range(5):
        h = keep_old[t] * h + (1 - keep_old[t]) * gru_step(x[t], h)
        torch.testing.assert_close(out[t], h, atol=ATOL, rtol=0)
    m.eval()
    out, _ = m(x)
    h = torch.zeros(2, 4, dtype=DT)
    for t in range(5):
        h = 0.4 * h + 0.6 * gru_step(x[t], h)
        torch.testing.assert_close(out[t], h, atol=ATOL, rtol=0)
    assert not torch.allclose(out, plain(x)[0])


def _gru(P, x, h):
    H = h.shape[-1]
    xr, xz, xn = (_lin(P["weight_ih"], x) + P["bias_ih"]).split(H, dim=-1)
    hr, hz, hn = (_lin(P["weight_hh"], h) + P["bias_hh"]).split(H, dim=-1)
    r, z = sig(xr + hr), sig(xz + hz)
    return (1 - z) * tanh(xn + r * hn) + z * h


def test_minlstm_gates_stay_finite_when_both_underflow():
    """f / (f + i) with both gates below ~-88 is 0/0 in float32; the cell must still give the
    float64 value of its formula."""
    xp = torch.tensor([[-120.0, -125.0, 3.0]])
    a, b = cells.MinLSTM().linear_form(xp, {})
    f, i = torch.sigmoid(xp[:, :1].double()), torch.sigmoid(xp[:, 1:2].double())
    torch.testing.assert_close(a.double(), f / (f + i), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.double(), i / (f + i) * 3.0, atol=1e-5, rtol=0)
