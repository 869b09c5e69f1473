"""The ``scan`` backend equals ``reference`` for the cells linear in their state."""

from __future__ import annotations

import pytest
import torch

from gyre import cells, engine
from gyre.engine import scan
from gyre.nn import Recurrent

LINEAR = ["mingru", "minlstm"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _pair(cell, dtype, **kw):
    """Two layers with the same weights, one per backend."""
    ref = Recurrent(cell, 4, 5, backend="reference", **kw).to(dtype)
    ours = Recurrent(cell, 4, 5, backend="scan", **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(m, x, h0, lengths, *, seed=None):
    """Outputs, final state, per-step states and every gradient of a fixed random loss."""
    if seed is not None:  # the same zoneout masks in both layers
        torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    h0 = h0.clone().requires_grad_()
    out, h_n, states = m.forward_with_states(x, h0, lengths=lengths)
    g = torch.Generator().manual_seed(1)
    loss = ((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
            + (h_n * torch.randn(h_n.shape, generator=g, dtype=out.dtype)).sum()
            + states[0].square().sum())
    grads = torch.autograd.grad(loss, [x, h0, *m.parameters()])
    return [out, h_n, states[0], *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", LINEAR)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_scan_equals_reference(cell, dtype, bidirectional, varlen):
    ref, ours = _pair(cell, dtype, num_layers=2, bidirectional=bidirectional)
    T, B = 9, 3
    x = torch.randn(T, B, 4, dtype=dtype)
    h0 = torch.randn(2 * (2 if bidirectional else 1), B, 5, dtype=dtype)
    lengths = [9, 4, 6] if varlen else None
    got, want = _run(ours, x, h0, lengths), _run(ref, x, h0, lengths)
    assert len(got) == len(want) == 3 + 2 + len(list(ref.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])
    if varlen:  # padded steps give zero output
        assert got[0][4:, 1].abs().max() == 0


@pytest.mark.parametrize("cell", LINEAR)
@pytest.mark.parametrize("training", [True, False])
def test_scan_zoneout_residual_dropout(cell, training):
    """Zoneout (a fresh mask per step in training, the expectation in eval), residual
    connections and recurrent dropout (which these cells ignore) fold into the scan."""
    dtype = torch.float64
    kw = dict(num_layers=2, zoneout=0.3, residual=True, recurrent_dropout=0.25)
    ref = Recurrent(cell, 5, 5, backend="reference", **kw).to(dtype)
    ours = Recurrent(cell, 5, 5, backend="scan", **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    ref.train(training)
    ours.train(training)
    x = torch.randn(7, 2, 5, dtype=dtype)
    h0 = torch.randn(2, 2, 5, dtype=dtype)
    got = _run(ours, x, h0, [7, 5], seed=3)
    want = _run(ref, x, h0, [7, 5], seed=3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", LINEAR)
def test_scan_gradcheck(cell):
    c = cells.get(cell)
    specs = c.param_specs(3, 4)
    params = {k: torch.randn(s.shape, dtype=torch.float64, requires_grad=True)
              for k, s in specs.items()}
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.arange(6)[:, None] < torch.tensor([6, 4])[None, :]
    zone = (torch.full((), 0.2, dtype=torch.float64),)

    def f(x, h0, *ps):
        out, (last,), _ = scan.run_layer(c, dict(zip(params, ps, strict=True)), x, (h0,),
                                         valid=valid, zone=zone)
        return out, last

    inputs = (x, h0, *params.values())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("solver", ["sequential", "parallel"])
@pytest.mark.parametrize("T", [1, 2, 5, 8, 13])
def test_linear_recurrence_solvers(solver, T):
    """Both solvers against the recurrence written out, and gradcheck through each."""
    a = torch.rand(T, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(T, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    h = scan.linear_recurrence(a, b, h0, solver)
    want, prev = [], h0
    for t in range(T):
        prev = a[t] * prev + b[t]
        want.append(prev)
    torch.testing.assert_close(h, torch.stack(want), atol=1e-12, rtol=1e-12)
    fn = lambda a, b, h0: scan.linear_recurrence(a, b, h0, solver)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b, h0))
    assert torch.autograd.gradgradcheck(fn, (a, b, h0))


def test_tiny_gates_do_not_overflow():
    """Gates that underflow (a_t -> 0 over many steps) stay finite and match the loop: the
    solvers never divide by a cumulative product or take a logarithm."""
    T = 400
    a = torch.full((T, 4), 1e-3)
    b = torch.randn(T, 4)
    for solver in ("sequential", "parallel"):
        h = scan.linear_recurrence(a, b, torch.ones(4), solver)
        assert torch.isfinite(h).all()
        torch.testing.assert_close(h[1:], a[1:] * h[:-1] + b[1:], atol=1e-6, rtol=1e-6)


def test_linear_form_is_the_step():
    """The cell's step is its linear form, so the scan and the loop run the same math."""
    for name in LINEAR:
        c = cells.get(name)
        xp = torch.randn(3, c.gates * 5, dtype=torch.float64)
        h = torch.randn(3, 5, dtype=torch.float64)
        a, b = c.linear_form(xp, {})
        (h_new,) = c.step(xp, (h,), {})
        torch.testing.assert_close(h_new, a * h + b, atol=0, rtol=0)
    # independent formulas (Feng et al. 2024, sections 3.1.3 and 3.2.3)
    xp = torch.randn(2, 10, dtype=torch.float64)
    z, ht = torch.sigmoid(xp[:, :5]), xp[:, 5:]
    a, b = cells.get("mingru").linear_form(xp, {})
    torch.testing.assert_close(a, 1 - z)
    torch.testing.assert_close(b, z * ht)
    xp = torch.randn(2, 15, dtype=torch.float64)
    f, i, ht = torch.sigmoid(xp[:, :5]), torch.sigmoid(xp[:, 5:10]), xp[:, 10:]
    a, b = cells.get("minlstm").linear_form(xp, {})
    torch.testing.assert_close(a, f / (f + i))
    torch.testing.assert_close(b, i / (f + i) * ht)


def test_auto_picks_scan_only_for_linear_cells():
    # auto prefers the compiled loop where it builds (measured faster on CPU), else scan
    fused_ok = engine.fused.available() is None
    for name in LINEAR:
        c = cells.get(name)
        want = "fused" if fused_ok and engine.fused.unsupported_reason(c) is None else "scan"
        assert engine.select_backend(c, "auto") == want
        assert engine.select_backend(c, "auto", zone=[[(torch.tensor(0.1),)]]) == want
    for name in ("lstm", "gru", "peephole", "gru_001"):
        assert engine.select_backend(cells.get(name), "auto") != "scan"
    with pytest.raises(ValueError, match=r"backend: 'scan' cannot run this cell .*linear_form"):
        engine.select_backend(cells.get("peephole"), "scan")
    with pytest.raises(ValueError, match=r"cell: the scan backend cannot run it"):
        c = cells.get("rnn")
        p = {k: torch.zeros(s.shape) for k, s in c.param_specs(2, 3).items()}
        scan.run_layer(c, p, torch.zeros(2, 1, 2), (torch.zeros(1, 3),))


def test_linear_recurrence_bad_input():
    with pytest.raises(ValueError, match=r"solver: got 'fast', expected one of"):
        scan.linear_recurrence(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3), "fast")
    with pytest.raises(ValueError, match=r"a, b, h0: got shapes \(2, 3\), \(2, 4\), \(3,\)"):
        scan.linear_recurrence(torch.ones(2, 3), torch.ones(2, 4), torch.ones(3))


def test_streaming_step_on_scan_equals_forward():
    m = Recurrent("minlstm", 4, 5, backend="scan").double()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    out, h_n = m(x)
    state, ys = None, []
    for t in range(6):
        y, state = m.step(x[t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys), out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, h_n, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(0, 3), (40, 1, 8), (6, 64, 64)])
def test_auto_solver_equals_both(shape):
    """``auto`` (parallel below PARALLEL_BELOW numbers per step on CPU, else sequential) gives
    what both solvers give, including for an empty sequence."""
    a = torch.rand(shape, dtype=torch.float64)
    b = torch.randn(shape, dtype=torch.float64)
    h0 = torch.randn(shape[1:], dtype=torch.float64)
    want = scan.linear_recurrence(a, b, h0, "sequential")
    assert want.shape == shape
    for solver in ("auto", "parallel"):
        torch.testing.assert_close(scan.linear_recurrence(a, b, h0, solver), want,
                                   atol=1e-12, rtol=1e-12)


def test_auto_off_cpu_takes_scan(monkeypatch):
    """The compiled loop is CPU code: off the CPU ("meta" stands in for an accelerator here),
    auto runs a linear cell with the scan."""
    calls = []
    real = scan.run_layer

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(scan, "run_layer", spy)
    c = cells.get("mingru")
    p = {k: torch.empty(s.shape, device="meta") for k, s in c.param_specs(3, 4).items()}
    x = torch.empty(5, 2, 3, device="meta")
    res = engine.run(c, [[p]], x, (torch.empty(1, 2, 4, device="meta"),), backend="auto")
    assert calls == [1]
    assert res.output.shape == (5, 2, 4) and res.state[0].shape == (1, 2, 4)
