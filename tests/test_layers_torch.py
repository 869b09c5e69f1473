"""gyre.nn layers against torch.nn with copied weights, in float64, over the product of options:
outputs, final states and every parameter, input and initial-state gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gyre.nn as gnn

T, B, I, H = 5, 3, 4, 5
LENGTHS = [5, 2, 4]  # unsorted on purpose
DT = torch.float64
ATOL = 1e-10


def _cases():
    yield from itertools.product(
        ("lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"), (True, False), (False, True),
        (False, True), (1, 2), ("none", "packed", "lengths"),
    )


def _pair(kind, backend, **kw):
    if kind.startswith("lstm"):
        proj = 3 if kind == "lstm_proj" else 0
        ref = torch.nn.LSTM(I, H, proj_size=proj, **kw)
        ours = gnn.LSTM(I, H, proj_size=proj, backend=backend, **kw)
    elif kind == "gru":
        ref, ours = torch.nn.GRU(I, H, **kw), gnn.GRU(I, H, backend=backend, **kw)
    else:
        nl = kind.split("_")[1]
        ref = torch.nn.RNN(I, H, nonlinearity=nl, **kw)
        ours = gnn.RNN(I, H, nonlinearity=nl, backend=backend, **kw)
    ref, ours = ref.to(DT), ours.to(DT)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _states(kind, layers, bidir):
    k = layers * (2 if bidir else 1)
    out = H if kind != "lstm_proj" else 3
    h0 = torch.randn(k, B, out, dtype=DT, requires_grad=True)
    if kind.startswith("lstm"):
        return (h0, torch.randn(k, B, H, dtype=DT, requires_grad=True))
    return h0


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kind,bias,batch_first,bidir,layers,varlen", list(_cases()))
def test_matches_torch(kind, bias, batch_first, bidir, layers, varlen, backend):
    kw = dict(num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidir)
    ref, ours = _pair(kind, backend, **kw)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    hx = _states(kind, layers, bidir)
    lens = torch.tensor(LENGTHS)

    if varlen == "none":
        out_r, st_r = ref(x, hx)
        out_o, st_o = ours(x, hx)
    elif varlen == "packed":
        packed = pack_padded_sequence(x, lens, batch_first=batch_first, enforce_sorted=False)
        out_r, st_r = ref(packed, hx)
        out_o, st_o = ours(packed, hx)
        assert torch.equal(out_o.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_o.sorted_indices, out_r.sorted_indices)
        out_r, out_o = out_r.data, out_o.data
    else:
        packed = pack_padded_sequence(x, lens, batch_first=batch_first, enforce_sorted=False)
        out_r, st_r = ref(packed, hx)
        out_r, _ = pad_packed_sequence(out_r, batch_first=batch_first, total_length=T)
        out_o, st_o = ours(x, hx, lengths=LENGTHS)

    torch.testing.assert_close(out_o, out_r, atol=ATOL, rtol=0)
    for a, b in zip(_flat(st_o), _flat(st_r), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)

    # one scalar from every output, with random weights so no gradient is trivially symmetric
    g = torch.Generator().manual_seed(1)
    def loss(out, st):
        terms = [out] + _flat(st)
        return sum((t * torch.randn(t.shape, generator=g, dtype=DT)).sum() for t in terms)
    gr = torch.autograd.grad(loss(out_r, st_r), [x, *_flat(hx), *ref.parameters()],
                             retain_graph=True)
    g.manual_seed(1)
    go = torch.autograd.grad(loss(out_o, st_o), [x, *_flat(hx), *ours.parameters()])
    names = ["input"] + ["hx"] * len(_flat(hx)) + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, go, gr, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_state_dict_interchange(kind):
    ref, ours = _pair(kind, "auto", num_layers=2, bidirectional=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert a.shape == b.shape, n
    # gyre -> torch, strict
    fresh = type(ref)(**_ctor_kwargs(ref)).to(DT)
    fresh.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=DT)
    torch.testing.assert_close(fresh(x)[0], ours(x)[0], atol=ATOL, rtol=0)


def _ctor_kwargs(m):
    kw = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
              bidirectional=m.bidirectional)
    if isinstance(m, torch.nn.LSTM):
        kw["proj_size"] = m.proj_size
    return kw


def test_unbatched_input_matches_torch():
    ref, ours = _pair("lstm", "reference", num_layers=2)
    x = torch.randn(T, I, dtype=DT)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), ours(x)
    torch.testing.assert_close(o2, o1, atol=ATOL, rtol=0)
    torch.testing.assert_close(h2, h1, atol=ATOL, rtol=0)
    torch.testing.assert_close(c2, c1, atol=ATOL, rtol=0)


def test_interlayer_dropout_same_rng_as_torch_native():
    """With dropout between layers in training, the native backend draws as torch does."""
    ref, ours = _pair("lstm", "native", num_layers=2, dropout=0.5)
    x = torch.randn(T, B, I, dtype=DT)
    torch.manual_seed(3)
    a = ref(x)[0]
    torch.manual_seed(3)
    b = ours(x)[0]
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
