"""Engine round 2, correctness: second derivatives and torch.func on every backend, inert
padding, empty batches, contiguous gradients, and the cell contract's ``ParamSpec(bias=True)``."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

from gyre import cells
from gyre.nn import LSTM, Recurrent

DT = torch.float64
ATOL = 1e-10

# (cell, backend): every backend, with a cell it runs
CASES = [("lstm", "reference"), ("lstm", "native"), ("lstm", "fused"), ("lstm", "auto"),
         ("gru", "fused"), ("mingru", "scan"), ("mingru", "fused"), ("mingru", "auto")]


def _pair(name, backend, **kw):
    ref = Recurrent(name, 3, 4, backend="reference", **kw).to(DT)
    m = Recurrent(name, 3, 4, backend=backend, **kw).to(DT)
    m.load_state_dict(ref.state_dict())
    return ref, m


@pytest.mark.parametrize("name,backend", CASES)
def test_second_derivative_and_batched_gradients(name, backend):
    """gradgradcheck with batched gradients (is_grads_batched, vmap over the backward), through
    lengths and both directions: the compiled backward falls back per call."""
    _, m = _pair(name, backend, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=DT, requires_grad=True)

    def fn(x, *params):
        out, state = torch.func.functional_call(m, dict(zip(names, params, strict=True)), (x,),
                                                {"lengths": [4, 2]})
        return out, *(state if isinstance(state, tuple) else (state,))

    names = [n for n, _ in m.named_parameters()]
    inputs = (x, *m.parameters())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("name,backend", CASES)
def test_create_graph_gradient_equals_reference(name, backend):
    """A gradient penalty (the gradient of an input gradient) equals the reference's, and the
    backend keeps running afterwards (nothing is disabled process-wide)."""
    ref, m = _pair(name, backend, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=DT)
    results = []
    for layer in (ref, m):
        xi = x.clone().requires_grad_()
        out = layer(xi)[0]
        (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        grads = torch.autograd.grad(gx.square().sum(), [xi, *layer.parameters()])
        results.append((gx, grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=ATOL, rtol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    if backend == "fused":
        out = Recurrent(name, 3, 4, backend="fused").to(DT)(x.requires_grad_())[0]
        assert type(out.grad_fn).__name__ == "_FusedBackward"


@pytest.mark.parametrize("name,backend", CASES)
def test_torch_func_jacrev_and_vmap(name, backend):
    """``torch.func.jacrev`` and ``vmap`` over gyre layers equal the reference's; afterwards the
    fused backend still compiles and runs for the same configuration."""
    ref, m = _pair(name, backend)
    x = torch.randn(3, 2, 3, dtype=DT)
    jac = [torch.func.jacrev(lambda v, layer=layer: layer(v)[0])(x) for layer in (ref, m)]
    torch.testing.assert_close(jac[1], jac[0], atol=ATOL, rtol=0)
    xs = torch.randn(4, 3, 3, dtype=DT)  # 4 unbatched (T, I) sequences
    got = torch.func.vmap(lambda v: m(v)[0])(xs)
    want = torch.stack([ref(v)[0] for v in xs])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if backend == "fused":
        out = m(x.clone().requires_grad_())[0]
        assert type(out.grad_fn).__name__ == "_FusedBackward"


@pytest.mark.parametrize("name,backend", CASES)
def test_padding_is_inert(name, backend):
    """NaN and inf past each sequence's length change no output, state or gradient: the same as
    zero padding, input gradients included (zero there)."""
    _, m = _pair(name, backend, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 3, dtype=DT)
    lengths = [5, 3, 1]
    x[3:, 1] = 0.0
    x[1:, 2] = 0.0
    bad = x.clone()
    bad[3:, 1] = float("nan")
    bad[1:, 2, 0] = float("inf")
    results = []
    for inp in (x, bad):
        xi = inp.clone().requires_grad_()
        out, state = m(xi, lengths=lengths)
        state = state if isinstance(state, tuple) else (state,)
        loss = out.sum() + sum(s.square().sum() for s in state)
        results.append((out, state, torch.autograd.grad(loss, [xi, *m.parameters()])))
    (o1, s1, g1), (o2, s2, g2) = results
    torch.testing.assert_close(o2, o1, atol=0, rtol=0)
    for a, b in zip(s1 + g1, s2 + g2, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,backend", CASES)
def test_empty_batch(name, backend):
    """B = 0, with and without ``lengths=[]``: empty outputs and states, and backward runs."""
    m = Recurrent(name, 3, 4, backend=backend, num_layers=2, bidirectional=True)
    x = torch.zeros(5, 0, 3, requires_grad=True)
    for lengths in (None, []):
        out, state = m(x, lengths=lengths)
        assert out.shape == (5, 0, 8)
        for s in (state if isinstance(state, tuple) else (state,)):
            assert s.shape[1] == 0
        out.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "native", "fused"])
def test_gradients_are_contiguous(backend):
    """``torch.autograd.grad`` gives contiguous gradients for every parameter (``weight_hh`` and
    ``weight_hr`` came out transposed from the fused kernels), so a flat gradient vector builds."""
    m = LSTM(3, 6, num_layers=2, proj_size=2, backend=backend)
    out = m(torch.randn(4, 2, 3, requires_grad=True))[0]
    grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    assert all(g.is_contiguous() for g in grads)
    assert torch.cat([g.view(-1) for g in grads]).numel() == sum(p.numel() for p in m.parameters())


def _user_cell():
    spec = importlib.util.spec_from_file_location(
        "user_cell", pathlib.Path(__file__).parents[1] / "examples" / "user_cell.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MIRNN()


@pytest.mark.parametrize("name", cells.names() + ["user_cell"])
def test_bias_false_leaves_out_bias_parameters(name):
    """A layer built with ``bias=False`` holds no parameter its cell marks ``ParamSpec(bias=True)``
    (the README's user cell declares its bias unconditionally and relies on this), and runs."""
    cell = _user_cell() if name == "user_cell" else cells.get(name)
    marked = {k for k, s in cell.param_specs(3, 4, True).items() if s.bias}
    assert marked
    layer = Recurrent(cell, 3, 4, num_layers=2, bias=False)
    held = {n.rsplit("_l", 1)[0] for n, _ in layer.named_parameters()}
    assert not held & marked
    with_bias = {n.rsplit("_l", 1)[0] for n, _ in Recurrent(cell, 3, 4, num_layers=2).named_parameters()}
    assert marked <= with_bias
    assert layer(torch.randn(4, 2, 3))[0].shape == (4, 2, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_runs_on_every_cpu(dtype):
    # torch.nn.LSTM under CPU autocast raises on CPUs whose oneDNN lacks the low-precision
    # primitive (AVX2 hosts); gyre's native backend falls back to the ATen kernel there.
    torch.manual_seed(0)
    m = LSTM(3, 4, backend="native")
    x = torch.randn(5, 2, 3, requires_grad=True)
    want = m(x, lengths=[5, 3])[0]
    with torch.autocast("cpu", dtype=dtype):
        got = m(x, lengths=[5, 3])[0]
    got.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
    assert torch._C._get_mkldnn_enabled()
