"""The CPU RNN tests of PyTorch's ``test/test_nn.py`` (``TestNN`` and ``TestNNDeviceType``), each
rewritten here with ``gyre.nn.RNN / LSTM / GRU`` in place of ``torch.nn``'s: the same inputs,
the same expected values, exception types and message patterns. Each test names the torch test
it follows. Not here: tests that need CUDA or cuDNN (``test_rnn_fused``, ``test_cudnn_*``,
``test_RNN_cpu_vs_cudnn_*``, whose CPU-side comparison ``tests/test_layers_torch.py`` makes
against ``torch.nn``), the cell classes (``test_RNN_cell``, ``test_LSTM_cell``, ...: gyre has no
``RNNCell`` classes), and the parts of ``test_rnn_weight_norm`` that count ``_flat_weights``,
torch's private list (see the README).
"""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
from torch.nn.utils import rnn as rnn_utils
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

import gyre.nn as gnn

MODES = {"RNN": gnn.RNN, "GRU": gnn.GRU, "LSTM": gnn.LSTM}
BACKENDS = ["auto", "reference", "native", "fused"]


def _hidden(mode, h):
    return (h, h) if mode == "LSTM" else h


@pytest.mark.parametrize("mode", MODES)
def test_rnn_args_check(mode):
    """torch: TestNN.test_rnn_args_check. Wrong input batch, hidden batch, input size, hidden
    size or hidden layers raise RuntimeError."""
    I, H, L, B, T, bad = 3, 5, 2, 4, 6, 7
    good_in, good_h = (T, B, I), (L, B, H)
    cases = [((T, bad, I), good_h), (good_in, (L, bad, H)), ((T, B, bad), good_h),
             (good_in, (L, B, bad)), (good_in, (bad, B, H))]
    model = MODES[mode](I, H, L)
    for in_shape, h_shape in cases:
        x, h = torch.randn(in_shape), torch.randn(h_shape)
        hiddens = [_hidden(mode, h)]
        if mode == "LSTM" and h_shape != good_h:
            ok = torch.randn(good_h)
            hiddens = [(h, ok), (ok, h)]
        for hx in hiddens:
            with pytest.raises(RuntimeError):
                model(x, hx)


def test_projections_lstm_args_check():
    """torch: TestNN.test_projections_lstm_args_check."""
    I, H, P, L, B, T, bad = 3, 5, 2, 2, 4, 6, 7
    model = gnn.LSTM(I, H, L, proj_size=P)
    good = ((T, B, I), (L, B, P), (L, B, H))
    cases = [((T, bad, I), good[1], good[2]), (good[0], (L, bad, P), (L, bad, H)),
             ((T, B, bad), good[1], good[2]), (good[0], (L, B, bad), (L, B, bad)),
             (good[0], (bad, B, P), (bad, B, H)), (good[0], (H, B, P), good[2]),
             (good[0], (bad, B, P), good[2]), (good[0], good[1], (bad, B, H))]
    for x, h, c in cases:
        with pytest.raises(RuntimeError):
            model(torch.randn(x), (torch.randn(h), torch.randn(c)))


def test_forward_exception_messages():
    """torch: TestNN.test_cudnn_forward_exception (it runs on the CPU too)."""
    rnns = [(gnn.LSTM(10, 20, batch_first=True), (torch.zeros(1, 2, 19), torch.zeros(1, 2, 19))),
            (gnn.LSTM(10, 20, batch_first=True, proj_size=10),
             (torch.zeros(1, 2, 19), torch.zeros(1, 2, 19))),
            (gnn.GRU(10, 20, batch_first=True), torch.zeros(1, 2, 19)),
            (gnn.RNN(10, 20, batch_first=True), torch.zeros(1, 2, 19))]
    for rnn, hidden in rnns:
        with pytest.raises(RuntimeError, match="Expected hidden.*size.*got"):
            rnn(torch.randn(2, 3, 10), hidden)
        with pytest.raises(RuntimeError, match=r"input\.size\(-1\) must be equal to input_size"):
            rnn(torch.randn(2, 3, 3))


@pytest.mark.parametrize("mode", MODES)
def test_rnn_initial_hidden_state(mode):
    """torch: TestNN.test_rnn_initial_hidden_state. Zeros given equal None."""
    rnn = MODES[mode](30, 20, 2)
    x = torch.randn(10, 32, 30)
    out1, h1 = rnn(x, _hidden(mode, torch.zeros(2, 32, 20)))
    out2, h2 = rnn(x)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("bidir", [False, True])
def test_projections_lstm_initial_hidden_state(bidir):
    """torch: TestNN.test_projections_lstm_initial_hidden_state."""
    rnn = gnn.LSTM(30, 20, 2, bidirectional=bidir, proj_size=10)
    d = 2 if bidir else 1
    x = torch.randn(10, 32, 30)
    out1, h1 = rnn(x, (torch.zeros(2 * d, 32, 10), torch.zeros(2 * d, 32, 20)))
    out2, h2 = rnn(x)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("mode", ["RNN", "GRU"])
def test_projections_errors_on_gru_and_rnn(mode):
    """torch: TestNN.test_projections_errors_on_gru_and_rnn."""
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN "
                                         "or GRU"):
        MODES[mode](30, 20, 2, proj_size=10)


def test_RNN_nonlinearity():
    """torch: TestNN.test_RNN_nonlinearity and test_RNN_nonlinearity_passed_as_arg."""
    assert gnn.RNN(1, 10).nonlinearity == "tanh"
    assert gnn.RNN(1, 10, nonlinearity="relu").nonlinearity == "relu"
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        gnn.RNN(1, 10, nonlinearity="garbage")
    assert gnn.RNN(2, 3, 1, "relu").nonlinearity == "relu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_RNN_input_size_zero(mode, backend):
    """torch: TestNN.test_RNN_input_size_zero. A batch of no sequences: output (5, 0, 4), and
    backward runs; with lengths=[] too."""
    rnn = MODES[mode](input_size=3, hidden_size=4, backend=backend)
    x = torch.zeros(5, 0, 3, requires_grad=True)
    out = rnn(x)[0]
    assert out.shape == (5, 0, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    out = rnn(x, lengths=[])[0]
    assert out.shape == (5, 0, 4)
    out.sum().backward()


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_error_RNN_seq_len_zero(mode, bidirectional):
    """torch: TestNN.test_error_RNN_seq_len_zero (CPU part)."""
    rnn = MODES[mode](5, 6, bidirectional=bidirectional)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        rnn(torch.ones(0, 10, 5))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("p", [0, 0.276, 0.731, 1])
def test_RNN_dropout(p, train, backend):
    """torch: TestNN.test_RNN_dropout (its CPU branch): dropout sits between the layers; with
    p=1 in training the second layer sees zeros."""
    rnn = gnn.RNN(10, 1000, 2, bias=False, dropout=p, nonlinearity="relu",
                  backend=backend).double()
    rnn.train(train)
    with torch.no_grad():
        for w in rnn.parameters():
            w.fill_(1)
    out, hy = rnn(torch.ones(1, 1, 10, dtype=torch.double), torch.zeros(2, 1, 1000,
                                                                       dtype=torch.double))
    assert out.min() == out.max()
    val = out[0, 0, 0].item()
    if p == 0 or not train:
        assert val == 10000
    elif p == 1:
        assert val == 0
    else:
        assert 8000 < val < 12000
        denorm = (val * (1 - p)) % 10
        assert min(denorm, 10 - denorm) < 1e-2
    assert hy[0].min() == hy[0].max() and hy[1].min() == hy[1].max()
    assert hy[0, 0, 0].item() == 10 and hy[1, 0, 0].item() == val


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("p", [0, 0.1234])
def test_RNN_dropout_state(p, train):
    """torch: TestNN.test_RNN_dropout_state (CPU part): a pickled layer gives the same results,
    and dropout draws differ call to call only in training."""
    rnn = gnn.RNN(100, 100, 2, bias=False, dropout=p, nonlinearity="relu")
    rnn.train(train)
    x, hx = torch.rand(1, 1, 100), torch.rand(2, 1, 100)
    out1, hy1 = rnn(x, hx)
    out2, hy2 = rnn(x, hx)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    rnn2 = torch.load(buf, weights_only=False)  # a whole module, as torch's test does
    rnn2.flatten_parameters()
    out3, hy3 = rnn2(x, hx)
    same = p == 0 or not train
    for a, b in ((out1, out2), (out1, out3), (hy1, hy2), (hy1, hy3)):
        assert torch.equal(a, b) == same


@pytest.mark.parametrize("train", [True, False])
def test_RNN_change_dropout(train):
    """torch: TestNN.test_RNN_change_dropout (CPU part): ``rnn.dropout = p`` between calls."""
    rnn = gnn.RNN(100, 100, 2, dropout=0, nonlinearity="relu").double()
    rnn.train(train)
    x = torch.rand(3, 2, 100, dtype=torch.double)
    prev = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        rnn.dropout = p
        out1, hy1 = rnn(x)
        out2, hy2 = rnn(x)
        same = p == 0 or p == 1 or not train
        assert torch.equal(out1, out2) == same and torch.equal(hy1, hy2) == same
        if prev is not None:
            assert torch.equal(out1, prev) == (not train)
            assert torch.equal(out2, prev) == (not train)
        prev = out1


def test_rnn_weight_norm():
    """torch: TestNN.test_rnn_weight_norm and the CPU side of test_RNN_cudnn_weight_norm:
    weight norm on a recurrent weight, applied and removed, leaves the parameters and the output
    as they were (torch's count of ``_flat_weights`` entries is the one part not applicable)."""
    for m, name in ((gnn.LSTM(32, 32), "weight_ih_l0"), (gnn.LSTM(10, 6, 2), "weight_hh_l0"),
                    (gnn.LSTM(32, 32, proj_size=16), "weight_hr_l0"),
                    (gnn.LSTM(10, 6, 2, proj_size=3), "weight_hr_l0")):
        x = torch.randn(7, 6, m.input_size)
        expected = m(x)
        m = torch.nn.utils.weight_norm(m, name=name)
        assert name + "_v" in dict(m.named_parameters()) and name not in m._parameters
        torch.testing.assert_close(m(x), expected)
        m = torch.nn.utils.remove_weight_norm(m, name=name)
        params = dict(m.named_parameters())
        assert m._parameters[name] is not None and params[name] is not None
        assert name + "_v" not in params and name + "_g" not in params
        torch.testing.assert_close(m(x), expected)


def test_partial_flat_weights():
    """torch: TestNN.test_partial_flat_weights (on the CPU): a weight deleted and set again."""
    m = gnn.LSTM(10, 6, 2)
    x = torch.randn(3, 2, 10)
    expected = m(x)[0]
    weight = m.weight_hh_l0
    del m.weight_hh_l0
    assert not hasattr(m, "weight_hh_l0")
    m.weight_hh_l0 = weight
    torch.testing.assert_close(m(x)[0], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_retain_variables(backend):
    """torch: TestNNDeviceType.test_rnn_retain_variables (float64): backward several times over
    one graph gives the same gradients."""
    for cls in (gnn.LSTM, gnn.GRU, gnn.RNN):
        rnn = cls(10, 20, num_layers=2, backend=backend).double()
        x = torch.randn(5, 6, 10, dtype=torch.double, requires_grad=True)
        out = rnn(x)
        out[0].sum().backward(retain_graph=True)
        grads = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
        for _ in range(4):
            rnn.zero_grad()
            x.grad.zero_()
            out[0].sum().backward(retain_graph=True)
            again = [x.grad] + [p.grad for p in rnn.parameters()]
            for a, b in zip(grads, again, strict=True):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variable_sequence(dtype):
    """torch: TestNNDeviceType.test_variable_sequence: a packed batch equals each sequence run
    alone, outputs, states and every gradient, with and without projections and initial states."""
    prec = 1e-5 if dtype == torch.float32 else 1e-10
    tests = [(True, [5]), (False, [5]), (True, [10, 10, 6, 2, 2, 1, 1]),
             (False, [10, 10, 6, 2, 2, 1, 1]), (False, [2, 1, 3, 2, 10, 5, 3])]
    for (enforce_sorted, lengths), default_hidden, proj in itertools.product(
            tests, (True, False), (0, 2)):
        I, H, L = 3, 4, 2
        T, B = max(lengths), len(lengths)
        x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
        lstm = gnn.LSTM(I, H, bidirectional=True, num_layers=L, proj_size=proj).to(dtype)
        lstm2 = copy.deepcopy(lstm)
        h0 = None
        if not default_hidden:
            real = proj or H
            h0 = (torch.randn(2 * L, B, real, dtype=dtype), torch.randn(2 * L, B, H, dtype=dtype))
        outs, hiddens = [], []
        for i, n in enumerate(lengths):
            hi = None if h0 is None else tuple(h[:, i:i + 1] for h in h0)
            out, hid = lstm2(x[:n, i:i + 1], hi)
            outs.append(torch.cat([out, out.new_zeros(T - n, *out.shape[1:])]))
            hiddens.append(hid)
        seq_out = torch.cat(outs, 1)
        seq_hidden = tuple(torch.cat(h, 1) for h in zip(*hiddens, strict=True))
        packed = rnn_utils.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        packed_out, packed_hidden = lstm(packed, h0)
        unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)
        for a, b in zip(packed_hidden, seq_hidden, strict=True):
            torch.testing.assert_close(a, b, atol=prec, rtol=0)
        torch.testing.assert_close(unpacked, seq_out, atol=prec, rtol=0)
        assert unpacked_len.tolist() == list(lengths)
        seq_out.sum().backward()
        grad_x = x.grad.clone()
        x.grad.zero_()
        unpacked.sum().backward()
        torch.testing.assert_close(x.grad, grad_x, atol=prec, rtol=0)
        for p1, p2 in zip(lstm.parameters(), lstm2.parameters(), strict=True):
            torch.testing.assert_close(p1.grad, p2.grad, atol=prec, rtol=0)


def _rnn_mod_check(mod, inp):
    def flat(x):
        out = mod(x)
        return tuple(t if isinstance(t, torch.Tensor) else tt for t in out for tt in t)
    assert gradcheck(flat, (inp,), check_batched_grad=False)
    assert gradgradcheck(flat, (inp,), check_batched_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [gnn.LSTM, gnn.GRU])
def test_grad_and_gradgrad(cls, backend):
    """torch: TestNNDeviceType.test_LSTM_grad_and_gradgrad, test_GRU_grad_and_gradgrad (float64;
    torch checks them with oneDNN/cuDNN off, here on every backend)."""
    inp = torch.rand(1, 3, 4, dtype=torch.double, requires_grad=True)
    for bias in (True, False):
        _rnn_mod_check(cls(4, 4, bias=bias, backend=backend).double(), inp)


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_LSTM_differentiable_backward(backend):
    """torch: TestNNDeviceType.test_LSTM_differentiable_backward_using_oneDNN: the gradient of
    an input gradient (create_graph=True) of a 20-layer LSTM equals the plain loop's (there:
    oneDNN against torch's ATen path; here each backend against gyre's reference)."""
    net = gnn.LSTM(3, 3, 20, batch_first=True, backend="reference")
    fast = copy.deepcopy(net)
    fast.backend = backend
    x = torch.rand(10, 12, 3)
    results = []
    for m in (net, fast):
        xi = x.clone().requires_grad_(True)
        out, _ = m(xi)
        der = torch.autograd.grad(out, xi, torch.ones_like(out), create_graph=True)[0]
        der.sum().backward()
        results.append((der, xi.grad, [p.grad for p in m.parameters()]))
    (d1, g1, p1), (d2, g2, p2) = results
    torch.testing.assert_close(d2, d1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_backward_to_input_but_not_parameters(backend):
    """torch: TestNNDeviceType.test_rnn_backward_to_input_but_not_parameters."""
    lstm = gnn.LSTM(2, 3, backend=backend)
    for p in lstm.parameters():
        p.requires_grad = False
    s = torch.randn(1, 1, 2, requires_grad=True)
    out, _ = lstm(s)
    out.sum().backward()
    assert s.grad is not None and s.grad.abs().sum().item() != 0


def test_pack_sequence_batch_sizes_throw():
    """torch: TestNN.test_pack_sequence_batch_sizes_throw."""
    with pytest.raises(ValueError, match=r"batch_sizes should always be on CPU"):
        m = gnn.LSTM(3, 4, bidirectional=True, num_layers=2).to("meta")
        a = torch.rand(5, 3, device="meta")
        b = torch.tensor([1, 1, 1, 1, 1], device="meta")
        m(rnn_utils.PackedSequence(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_dropout_argument(mode):
    """torch's constructor checks (TestNN via ``RNNBase``): dropout in [0, 1] with 1 accepted,
    a warning for dropout with one layer, none with two."""
    MODES[mode](3, 4, 2, dropout=1.0)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        MODES[mode](3, 4, 1, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MODES[mode](3, 4, 2, dropout=0.5)
    with pytest.raises(ValueError, match=r"dropout should be a number in range \[0, 1\]"):
        MODES[mode](3, 4, 2, dropout=1.5)
