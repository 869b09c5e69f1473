"""Streaming (``Recurrent.step``) through the compiled step entry (gyre.engine.fused.stream).

Step by step over a sequence equals ``forward`` on the whole sequence and a pure-PyTorch
reference layer with the same weights, for every built-in cell, a projected LSTM and a user
cell; the plan follows weight changes; returned tensors are never rewritten by later steps;
whatever needs autograd (or is not supported) takes the general path and still backpropagates.

Sizes are chosen so the hand-written matrix-vector code runs both its vector blocks and its
tails (K >= 8 rows for float32, a K and N that are not multiples of the lanes) and, at batch 6,
the BLAS branch."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import pathlib
import pickle
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from gyre import cells
from gyre import nn as gyre_nn
from gyre.cells import LSTM as LSTMCell
from gyre.cells import Cell
from gyre.engine import fused
from gyre.nn import LSTM, Recurrent

pytestmark = [
    pytest.mark.skipif(fused.available() is not None,
                       reason=f"no C++ toolchain: {fused.available()}"),
    pytest.mark.filterwarnings("error::RuntimeWarning"),  # a fallback after a build failure
]

_spec = importlib.util.spec_from_file_location(
    "user_cell", pathlib.Path(__file__).parents[1] / "examples" / "user_cell.py")
user_cell = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(user_cell)

I, H, T = 9, 12, 5
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CELLS = {name: name for name in cells.REGISTRY} | {
    "lstm_proj": LSTMCell(proj_size=5),
    "lstm_proj_peephole": LSTMCell(proj_size=5, peephole=True),
    "mi_rnn (user)": user_cell.MIRNN(),
}
# (num_layers, residual, batch (None: unbatched), zoneout)
CONFIGS = [(1, False, 1, 0.0), (1, False, 3, 0.0), (1, False, None, 0.0), (2, False, 3, 0.0),
           (2, True, 1, 0.0), (2, False, 2, 0.3)]


def _parts(state):
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


def _stream(m, x, state=None):
    ys = []
    for t in range(x.shape[0]):
        y, state = m.step(x[t], state)
        ys.append(y)
    return torch.stack(ys), state


def _plan(m):
    """The engine's one-step plan the layer streams by (None: the general path)."""
    s = m.__dict__.get("_gyre_stream")
    return None if s is None else s.plan


def _compiled(m):
    return _plan(m) is not None


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=0)


def _layer(cell, dtype, **kw):
    m = Recurrent(cell, I, H, **kw).to(dtype)
    with torch.no_grad():  # away from the initial range so every gate matters
        for p in m.parameters():
            p.uniform_(-0.6, 0.6)
    return m.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CELLS))
def test_stream_equals_forward(name, dtype):
    cell = CELLS[name]
    for layers, residual, batch, zoneout in CONFIGS:
        m = _layer(cell, dtype, num_layers=layers, residual=residual, zoneout=zoneout)
        ref = Recurrent(cell, I, H, num_layers=layers, residual=residual, zoneout=zoneout,
                        backend="reference").to(dtype).eval()
        ref.load_state_dict(m.state_dict())
        shape = (T, I) if batch is None else (T, batch, I)
        x = torch.randn(*shape, dtype=dtype)
        h0 = tuple(torch.randn(layers, *(() if batch is None else (batch,)), s, dtype=dtype)
                   for s in m.state_sizes)
        h0 = h0[0] if len(h0) == 1 else h0
        with torch.no_grad():
            out, h_n = m(x, h0)
            out_ref, h_ref = ref(x, h0)
            ys, state = _stream(m, x, h0)
            ys0, state0 = _stream(m, x)  # state None: zeros
            out0, h_n0 = m(x)
        assert _compiled(m), f"{name}: the compiled step was not used"
        assert ys.shape == out.shape
        for a, b in ((ys, out), (ys, out_ref), (ys0, out0)):
            _close(a, b, dtype)
        for s, r, q, s0, r0 in zip(_parts(state), _parts(h_n), _parts(h_ref), _parts(state0),
                                   _parts(h_n0), strict=True):
            _close(s, r, dtype)
            _close(s, q, dtype)
            _close(s0, r0, dtype)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_relu", "ln_lstm"])
def test_stream_without_biases(name):
    m = _layer(name, torch.float32, num_layers=2, bias=False)
    x = torch.randn(T, 3, I)
    with torch.no_grad():
        out, h_n = m(x)
        ys, state = _stream(m, x)
    assert _compiled(m)
    _close(ys, out, torch.float32)
    for a, b in zip(_parts(state), _parts(h_n), strict=True):
        _close(a, b, torch.float32)


def test_plain_cells_run_whole_stack_in_one_call():
    """Plain linear input projections and identity or plain linear read-outs: the whole stack
    in C++ (layer-norm cells too: their input layer norm is part of the step); a read-out with
    a softmax: layer by layer."""
    x = torch.randn(2, I)
    for name, whole in (("lstm", True), ("gru", True), ("rnn", True), ("ln_lstm", True),
                        ("ln_gru", True), ("rnn_output", True),
                        (cells.OutputRNN(output_activation="softmax"), False)):
        m = _layer(name, torch.float32, num_layers=2)
        with torch.no_grad():
            m.step(x)
        plan = _plan(m)
        assert plan is not None and plan.run_all is whole and (plan.fast is not None) is whole, \
            name
        if whole:  # the entry that reads the tensors themselves accepts them here
            with torch.no_grad():
                y, h = plan.fast(m._parameters, x, None)
                assert y.shape == (2, H) and not torch.isnan(y).any()
                # not contiguous: left to the checked path
                assert plan.fast(m._parameters, x.t().contiguous().t(), None) is None
            # weights that need grad: left to autograd
            assert plan.fast(m._parameters, x, None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["lstm", "gru", "ln_gru", "rnn_output"])
def test_stream_big_batch_and_batch_first(name, dtype):
    """Batch 6 takes BLAS; batch_first input sliced per step is not contiguous."""
    m = _layer(name, dtype, num_layers=2, batch_first=True)
    x = torch.randn(6, T, I, dtype=dtype)
    with torch.no_grad():
        out, h_n = m(x)
        state, ys = None, []
        for t in range(T):
            assert not x[:, t].is_contiguous()
            y, state = m.step(x[:, t], state)
            ys.append(y)
    assert _compiled(m)
    _close(torch.stack(ys, 1), out, dtype)
    for s, r in zip(_parts(state), _parts(h_n), strict=True):
        _close(s, r, dtype)


def _expected_next(m, x, state):
    """One step by the general (forward) path on the layer's current weights."""
    with torch.no_grad():
        out, h = m(x.unsqueeze(0), state)
    return out[0], h


def _step_matches_forward(m, x, state):
    """``m.step`` from ``state`` equals one step of the general path on the current weights."""
    with torch.no_grad():
        y, s = m.step(x, state)
    want_y, want_s = _expected_next(m, x, state)
    _close(y, want_y, torch.float32)
    for a, b in zip(s, want_s, strict=True):
        _close(a, b, torch.float32)


def test_stream_follows_weight_changes():
    torch.manual_seed(1)
    m = _layer("lstm", torch.float32, num_layers=2)
    x = torch.randn(3, I)
    with torch.no_grad():
        _, state = m.step(x)
    plan = _plan(m)

    # an optimizer step changes the weights in place
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(torch.randn(4, 3, I))[0].square().sum().backward()
    opt.step()
    for _ in range(2):
        _step_matches_forward(m, x, state)
    assert _plan(m) is plan  # read in place: nothing to rebuild

    # load_state_dict copies in place; with assign=True it replaces the parameters
    other = _layer("lstm", torch.float32, num_layers=2)
    for assign in (False, True):
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(-1.5)
        m.load_state_dict(other.state_dict(), assign=assign)
        with torch.no_grad():
            y, _ = m.step(x, state)
        _close(y, _expected_next(other, x, state)[0], torch.float32)

    # a parameter reassigned, and changed through .data
    m.weight_hh_l1 = torch.nn.Parameter(torch.randn_like(m.weight_hh_l1))
    m.weight_ih_l0.data.mul_(0.5)
    with torch.no_grad():
        y, _ = m.step(x, state)
    _close(y, _expected_next(m, x, state)[0], torch.float32)

    # a dtype change swaps every parameter's storage
    m.double()
    x64, state64 = x.double(), tuple(s.double() for s in state)
    with torch.no_grad():
        y, _ = m.step(x64, state64)
    assert y.dtype == torch.float64 and _compiled(m)
    _close(y, _expected_next(m, x64, state64)[0], torch.float64)


@dataclass(frozen=True)
class ScaledRNN(Cell):
    """A user cell whose step uses tensors computed from the parameters (``2 * W_hh``,
    ``b_hh / 2``): the same compiled program as the built-in tanh RNN (no build of its own),
    but the plan holds copies, so in-place updates must be noticed through version counters."""

    name = "scaled_rnn"

    def recurrent(self, h, p):
        return F.linear(h, 2 * p["weight_hh"], p["bias_hh"] / 2)

    def pointwise(self, xp, hp, state, p):
        return (torch.tanh(xp + hp),)


def test_computed_weights_follow_in_place_updates():
    m = _layer(ScaledRNN(), torch.float64, num_layers=2)
    ref = Recurrent(ScaledRNN(), I, H, num_layers=2, backend="reference").double().eval()
    x = torch.randn(T, 2, I, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.3)
    for _ in range(2):
        ref.load_state_dict(m.state_dict())
        with torch.no_grad():
            ys, h = _stream(m, x)
            out, h_ref = ref(x)
        assert _compiled(m) and _plan(m).versions is not None
        _close(ys, out, torch.float64)
        _close(h, h_ref, torch.float64)
        m(x)[0].square().sum().backward()
        opt.step()  # in place: the plan's 2 * W_hh is now stale and must be rebuilt


def test_held_states_are_not_overwritten():
    m = _layer("lstm", torch.float32, num_layers=2)
    xs = torch.randn(6, 2, I)
    held = []
    state = None
    with torch.no_grad():
        for t in range(6):
            y, state = m.step(xs[t], state)
            held.append((y, state, y.clone(), tuple(s.clone() for s in state)))
    for y, s, y_copy, s_copy in held:
        assert torch.equal(y, y_copy)
        for a, b in zip(s, s_copy, strict=True):
            assert torch.equal(a, b)
    # the output and the state never share memory either
    y, state = held[-1][0], held[-1][1]
    y.add_(100.0)
    assert torch.equal(state[0], held[-1][3][0])
    ptrs = {y.data_ptr(), *(s.data_ptr() for s in state)}
    assert len(ptrs) == 3


def test_grad_enabled_step_falls_back_and_backpropagates():
    torch.manual_seed(2)
    m = _layer("gru", torch.float64, num_layers=2)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    ys, state = _stream(m, x)
    assert ys.requires_grad and state.requires_grad
    g_stream = torch.autograd.grad(ys.sum() + state.sum(), list(m.parameters()))
    out, h_n = m(x)
    g_fwd = torch.autograd.grad(out.sum() + h_n.sum(), list(m.parameters()))
    _close(ys, out, torch.float64)
    for a, b in zip(g_stream, g_fwd, strict=True):
        _close(a, b, torch.float64)

    # an input or state that requires grad, with frozen weights: gradient to the input
    for p in m.parameters():
        p.requires_grad_(False)
    xg = x[0].clone().requires_grad_(True)
    y, _ = m.step(xg)
    (gx,) = torch.autograd.grad(y.sum(), xg)
    out, _ = m(xg.unsqueeze(0))
    (gx_ref,) = torch.autograd.grad(out.sum(), xg)
    _close(gx, gx_ref, torch.float64)

    # frozen weights, nothing requiring grad: the compiled step, even with grad enabled
    y, s = m.step(x[0])
    assert not y.requires_grad and _compiled(m)
    _close(y, m(x[:1])[0][0], torch.float64)


def test_training_mode():
    x = torch.randn(2, I)
    # no random masks: the compiled step, same as evaluation
    m = _layer("lstm", torch.float32, num_layers=2).train()
    with torch.no_grad():
        y_train, _ = m.step(x)
        y_eval, _ = m.eval().step(x)
    _close(y_train, y_eval, torch.float32)
    # zoneout in training draws masks: the general path, not the expectation
    m = _layer("gru", torch.float32, zoneout=0.5).train()
    torch.manual_seed(3)
    with torch.no_grad():
        y, h = m.step(x)
        torch.manual_seed(3)
        out, h_ref = m(x.unsqueeze(0))
    _close(y, out[0], torch.float32)
    # recurrent dropout in training stays an error, bidirectional too
    m = _layer("lstm", torch.float32, recurrent_dropout=0.2).train()
    with pytest.raises(ValueError, match=r"step: recurrent_dropout needs one mask per sequence"):
        m.step(x)
    with pytest.raises(ValueError, match=r"step: the layer is bidirectional"):
        _layer("lstm", torch.float32, bidirectional=True).step(x)


def test_bad_input_and_state_keep_their_messages():
    m = _layer("lstm", torch.float32)
    with torch.no_grad():
        _, state = m.step(torch.randn(2, I))
        with pytest.raises(ValueError, match=rf"input: got feature size 4 .* input_size={I}"):
            m.step(torch.randn(2, 4), state)
        with pytest.raises(ValueError, match=r"hx: state 'h' has shape \(1, 3, 12\), expected "
                                             r"\(1, 2, 12\)"):
            m.step(torch.randn(2, I), (torch.zeros(1, 3, H), state[1]))
        with pytest.raises(ValueError, match=r"hx: got a Tensor of shape"):
            m.step(torch.randn(2, I), state[0])
        with pytest.raises(TypeError, match=r"input: got dtype torch.float64, expected the "
                                            r"layer's dtype torch.float32"):
            m.step(torch.randn(2, I, dtype=torch.float64), state)
        with pytest.raises(ValueError, match=r"input: got rank 3"):
            m.step(torch.randn(1, 2, I), state)


def test_other_backends_and_copies():
    x = torch.randn(3, 2, I)
    ref = _layer("gru", torch.float32)
    ref.backend = "reference"  # as asked: the general path, not the compiled step
    with torch.no_grad():
        ys, _ = _stream(ref, x)
    assert not _compiled(ref)
    m = _layer("gru", torch.float32)
    m.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ys2, _ = _stream(m, x)
        _close(ys2, ys, torch.float32)
        # a streamed module still copies and pickles; the copy streams on its own weights
        twin = copy.deepcopy(m)
        back = pickle.loads(pickle.dumps(m))
        for other in (twin, back):
            _close(_stream(other, x)[0], ys, torch.float32)
            assert _compiled(other) and _plan(other) is not _plan(m)


def test_drop_in_lstm_projection_unbatched():
    m = LSTM(I, H, num_layers=2, proj_size=4).eval()
    x = torch.randn(T, I)
    with torch.no_grad():
        out, (h, c) = m(x)
        ys, (hs, cs) = _stream(m, x)
    assert _compiled(m) and ys.shape == (T, 4) and hs.shape == (2, 4) and cs.shape == (2, H)
    _close(ys, out, torch.float32)
    _close(hs, h, torch.float32)
    _close(cs, c, torch.float32)


def test_parametrized_weight_takes_the_general_path():
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 0.5 * w

    m = _layer("gru", torch.float32)
    parametrize.register_parametrization(m, "weight_hh_l0", Scale())
    x = torch.randn(3, 2, I)
    with torch.no_grad():
        ys, _ = _stream(m, x)
        m.parametrizations.weight_hh_l0.original.mul_(2.0)
        ys2, _ = _stream(m, x)
        out, _ = m(x)
    assert not _compiled(m)
    _close(ys2, out, torch.float32)
    assert not torch.allclose(ys, ys2)


# -- one-step forward: torch users stream with out, state = layer(x_t[None], state) -------------
ONE_STEP = [  # (class, kwargs, batch (None: unbatched), h0 given)
    (gyre_nn.LSTM, {}, 1, False),
    (gyre_nn.LSTM, {"num_layers": 2, "batch_first": True}, 3, True),
    (gyre_nn.LSTM, {"num_layers": 2, "proj_size": 5}, 2, True),
    (gyre_nn.LSTM, {"proj_size": 5}, None, True),
    (gyre_nn.GRU, {"num_layers": 2}, 3, True),
    (gyre_nn.GRU, {"batch_first": True}, 1, False),
    (gyre_nn.RNN, {"num_layers": 2, "nonlinearity": "relu", "batch_first": True}, 2, True),
    (gyre_nn.RNN, {}, None, False),
]


def _one_step_input(m, batch, dtype):
    if batch is None:
        return torch.randn(1, I, dtype=dtype)
    return torch.randn(*((batch, 1) if m.batch_first else (1, batch)), I, dtype=dtype)


def _h0(m, batch, dtype):
    shape = () if batch is None else (batch,)
    h0 = tuple(torch.randn(m.num_layers, *shape, s, dtype=dtype) for s in m.state_sizes)
    return h0[0] if len(h0) == 1 else h0


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_one_step_forward_takes_the_compiled_step(dtype, monkeypatch):
    """forward on one step under no_grad runs the step entry (never engine.run) and equals the
    general path, the reference backend and torch.nn with the same weights."""
    from gyre import engine

    general = engine.run
    for cls, kw, batch, given in ONE_STEP:
        m = cls(I, H, **kw).to(dtype).eval()
        ref = cls(I, H, backend="reference", **kw).to(dtype).eval()
        ref.load_state_dict(m.state_dict())
        torch_cls = getattr(torch.nn, cls.__name__)
        tm = torch_cls(I, H, **kw).to(dtype).eval()
        tm.load_state_dict(m.state_dict())
        x = _one_step_input(m, batch, dtype)
        h0 = _h0(m, batch, dtype) if given else None
        with torch.no_grad():
            want, h_want = m.forward_with_states(x, h0)[:2]  # the general path
            monkeypatch.setattr(engine, "run", _no_general_path)
            for _ in range(2):  # the plan is made on the first call, reused on the second
                out, h_n = m(x, h0)
            monkeypatch.setattr(engine, "run", general)
            out_ref, h_ref = ref(x, h0)
            out_t, h_t = tm(x, h0)
        what = f"{cls.__name__} {kw} batch={batch} h0={given}"
        assert m.step_compiled and out.shape == want.shape == out_t.shape, what
        for a, b in ((out, want), (out, out_ref), (out, out_t)):
            _close(a, b, dtype)
        for s, w, r, t in zip(_parts(h_n), _parts(h_want), _parts(h_ref), _parts(h_t),
                              strict=True):
            assert s.shape == t.shape, what
            _close(s, w, dtype)
            _close(s, r, dtype)
            _close(s, t, dtype)


def _no_general_path(*args, **kwargs):
    raise AssertionError("the one-step forward ran the general path")


def test_one_step_forward_with_autograd_or_longer_takes_the_general_path():
    m = gyre_nn.LSTM(I, H, num_layers=2)
    x = torch.randn(1, 3, I)
    out, (h, c) = m(x)  # parameters require grad: autograd, through the general path
    assert out.requires_grad and h.requires_grad
    with torch.no_grad():
        want = m.forward_with_states(x)[0]
    _close(out.detach(), want, torch.float32)
    (g,) = torch.autograd.grad(out.sum(), [m.weight_ih_l1])
    assert g.abs().sum() > 0
    with torch.no_grad():  # two steps, lengths=, a PackedSequence: the general path
        m(torch.randn(2, 3, I))
        m(x, lengths=[1, 1, 1])
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, [1, 1, 1])
        assert isinstance(m(packed)[0], torch.nn.utils.rnn.PackedSequence)
    # errors keep the general path's messages
    with torch.no_grad(), pytest.raises(ValueError, match=r"input: got feature size 4"):
        m(torch.randn(1, 3, 4))


def test_one_step_forward_under_vmap_takes_the_general_path():
    """torch.func sees only torch ops: under vmap a one-step forward and a step take the
    general path (the reference loop), per sample equal to the compiled step."""
    m = gyre_nn.GRU(I, H, num_layers=2).eval()
    xs = torch.randn(4, 2, I)
    with torch.no_grad():
        out = torch.func.vmap(lambda v: m(v[None])[0][0])(xs)
        ys = torch.func.vmap(lambda v: m.step(v)[0])(xs)
        for k in range(4):
            want = m.step(xs[k])[0]
            _close(out[k], want, torch.float32)
            _close(ys[k], want, torch.float32)
    assert m.step_compiled


# -- the contract: the streaming choice is the engine's, from public inputs --------------------
def test_streaming_choice_is_the_contracts():
    from gyre import engine
    from gyre.engine.contract import Options

    lstm = LSTMCell()
    # a whole sequence in inference runs oneDNN's LSTM; one step with carried state, fused's entry
    assert engine.choose(lstm, "auto", Options(size=(1, H)), "cpu") == "native"
    assert engine.choose(lstm, "auto", Options(stream=True), "cpu") == "fused"
    assert fused.unsupported(lstm, Options(stream=True), "cpu") is None
    for opts, why in ((Options(stream=True, directions=2), "reverse direction"),
                      (Options(stream=True, random=True), "random masks"),
                      (Options(stream=True, grad="params"), "autograd")):
        assert why in fused.unsupported(lstm, opts, "cpu")
        assert fused.unsupported(lstm, dataclasses.replace(opts, stream=False), "cpu") is None
    assert engine.choose(lstm, "auto", Options(stream=True, random=True), "cpu") == "native"


def test_stream_sees_a_swapped_tensor():
    """A swap of the tensor under a parameter's Python object (what torch.utils.swap_tensors
    does after its reference checks, which refuse while the plan holds the parameter) keeps
    the object: the compiled step's check sees the new tensor and steps on it."""
    torch.manual_seed(2)
    m = _layer("lstm", torch.float32)
    x = torch.randn(3, I)
    with torch.no_grad():
        _, state = m.step(x)
    assert _plan(m) is not None and _plan(m).fast is not None
    torch._C._swap_tensor_impl(m.weight_hh_l0, torch.nn.Parameter(torch.randn_like(m.weight_hh_l0)))
    _step_matches_forward(m, x, state)


def test_stream_entry_raises_for_a_cpp_exception(monkeypatch):
    """A check inside the C++ entry that throws (a sparse tensor has no data pointer) raises a
    RuntimeError in Python instead of ending the process."""
    from gyre import engine
    from gyre.cells import layer_specs

    cell = LSTMCell()
    params = [[{n: torch.randn(s.shape) for n, s in layer_specs(cell, I, H, True).items()}]]
    mod = engine.stream(cell, params, I, H).mod
    calls = []
    make = mod.make
    monkeypatch.setattr(mod, "make", lambda *a: calls.append(a) or make(*a))
    assert engine.stream(cell, params, I, H) is not None and len(calls) == 1
    args = list(calls[0])
    sparse = torch.eye(3).to_sparse()
    args[5] = (sparse, *args[5][1:])  # the parameters, and the tensor each object holds
    args[8] = (sparse._cdata, *args[8][1:])
    with pytest.raises(RuntimeError, match="storage"):
        make(*args)


def test_stream_entry_from_plain_parameters():
    """engine.stream takes a cell and parameter dicts, no layer: a hand-made two-layer GRU
    stack streams through the plan, equal to engine.run on one step; a forced backend without
    a one-step entry, random masks or two directions give None (the general path)."""
    from gyre import engine
    from gyre.cells import GRU as GRUCell
    from gyre.cells import layer_specs

    cell = GRUCell()
    gen = torch.Generator().manual_seed(0)
    params = [[{n: torch.rand(s.shape, generator=gen, dtype=torch.float64) - 0.5
                for n, s in layer_specs(cell, size, H, True).items()}] for size in (I, H)]
    plan = engine.stream(cell, params, I, H)
    assert isinstance(plan, fused.stream.Plan)
    x = torch.randn(3, I, dtype=torch.float64)
    h0 = torch.randn(2, 3, H, dtype=torch.float64)
    y, h = plan.step(x, h0)
    want = engine.run(cell, params, x[None], (h0,), backend="reference")
    _close(y, want.output[0], torch.float64)
    _close(h, want.state[0], torch.float64)
    assert plan.current(tuple(t for layer in params for t in layer[0].values()))
    assert engine.stream(cell, params, I, H, backend="reference") is None
    assert engine.stream(cell, params, I, H, backend="native") is None
    assert engine.stream(cell, params, I, H, random=True) is None
    assert engine.stream(cell, [layer * 2 for layer in params], I, H) is None
