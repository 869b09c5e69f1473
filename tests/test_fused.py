"""The ``fused`` backend equals ``reference`` for every built-in cell and a user cell: outputs,
final states and every gradient, across layers, directions, lengths, recurrent dropout and
zoneout (the same masks: torch is seeded before each call), plus gradcheck in float64.

All built-in cells share one compiled module, built once per machine (cached by torch)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gyre import cells, engine
from gyre.cells import Cell, ParamSpec
from gyre.engine import fused
from gyre.nn import Recurrent

pytestmark = [
    pytest.mark.skipif(fused.available() is not None,
                       reason=f"no C++ toolchain: {fused.available()}"),
    # a build failure makes the backend fall back to reference with a RuntimeWarning: fail
    pytest.mark.filterwarnings("error::RuntimeWarning"),
]

I, H, T, B = 3, 4, 5, 3
BUILTIN = [n for n in cells.names() if n != "rnn"]  # "rnn" is "rnn_tanh"


@dataclass(frozen=True)
class ScaledTanhRNN(Cell):
    """A user cell: h' = a * tanh(W x + U h + b) + (1 - a) * relu(h) * exp(-|u|)"""

    name = "scaled_tanh_rnn"

    def param_specs(self, input_size, hidden_size, bias=True):
        specs = super().param_specs(input_size, hidden_size, bias)
        specs["mix"] = ParamSpec((hidden_size,), init="uniform")
        return specs

    def pointwise(self, xp, hp, state, p):
        (h,) = state
        a = torch.sigmoid(p["mix"])
        return (a * torch.tanh(xp + hp) + (1 - a) * torch.relu(h) * torch.exp(-hp.abs()),)


@dataclass(frozen=True)
class NormGatedCell(Cell):
    """A user cell overriding step: two matrix products on weight slices, a layer norm without
    affine parameters between them, and half of the input pre-activations unused."""

    name = "norm_gated"
    gates = 2

    def step(self, xp, state, p, drop=None):
        (h,) = state
        n = h.shape[-1]
        hd = h if drop is None else h * drop
        a, _ = xp.chunk(2, dim=-1)
        u = torch.nn.functional.layer_norm(hd @ p["weight_hh"][:n].T, (n,))
        gate = torch.sigmoid(torch.relu(u) @ p["weight_hh"][n:].T)
        return (torch.tanh(a + u) * gate + (1 - gate) * h,)


def _pair(cell, dtype, **kw):
    ref = Recurrent(cell, I, H, backend="reference", dtype=dtype, **kw)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.uniform_(-0.8, 0.8)
    fast = Recurrent(cell, I, H, backend="fused", dtype=dtype, **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _hx(m, dtype):
    k = m.num_layers * (2 if m.bidirectional else 1)
    parts = tuple(torch.randn(k, B, s, dtype=dtype) * 0.5 for s in m.state_sizes)
    return parts[0] if len(parts) == 1 else parts


def _compare(ref, fast, dtype, atol, *, lengths=None, train=True, states=False):
    ref.train(train)
    fast.train(train)
    x = torch.randn(T, B, I, dtype=dtype)
    hx = _hx(ref, dtype)
    hx_t = (hx,) if isinstance(hx, torch.Tensor) else hx
    results = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        hi = tuple(h.clone().requires_grad_() for h in hx_t)
        torch.manual_seed(1234)  # the same dropout, recurrent-dropout and zoneout masks
        hin = hi[0] if len(hi) == 1 else hi
        if states:
            out, h_n, st = m.forward_with_states(xi, hin, lengths=lengths)
        else:
            out, h_n = m(xi, hin, lengths=lengths)
            st = ()
        h_n = (h_n,) if isinstance(h_n, torch.Tensor) else h_n
        gen = torch.Generator().manual_seed(7)
        loss = (out * torch.randn(out.shape, generator=gen, dtype=dtype)).sum()
        loss = loss + sum((h * torch.randn(h.shape, generator=gen, dtype=dtype)).sum()
                          for h in (*h_n, *st))
        grads = torch.autograd.grad(loss, [xi, *hi, *m.parameters()], allow_unused=True)
        results.append((out, h_n, st, grads))
    (o1, h1, s1, g1), (o2, h2, s2, g2) = results
    assert fused.available() is None  # the kernels were built and ran (no fallback)
    assert "Fused" in _graph_names(o2)
    torch.testing.assert_close(o2, o1, atol=atol, rtol=0)
    for a, b in zip((*h1, *s1), (*h2, *s2), strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)
    names = ["input", *[f"hx[{i}]" for i in range(len(hx_t))],
             *[n for n, _ in ref.named_parameters()]]
    for name, a, b in zip(names, g1, g2, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def _graph_names(t) -> str:
    """Names of the autograd nodes behind ``t`` (to see which backend ran)."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return " ".join(names)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_cell_every_option_float64(name):
    ref, fast = _pair(name, torch.float64, num_layers=2, bidirectional=True, dropout=0.3,
                      recurrent_dropout=0.4, zoneout=0.25)
    _compare(ref, fast, torch.float64, 1e-10, lengths=[5, 2, 4], train=True)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_cell_float32_eval_zoneout_without_bias(name):
    ref, fast = _pair(name, torch.float32, bias=False, zoneout=0.3)
    _compare(ref, fast, torch.float32, 1e-5, train=False, states=True)


@pytest.mark.parametrize("options", [
    {}, {"num_layers": 2}, {"bidirectional": True}, {"residual": True, "num_layers": 2},
])
@pytest.mark.parametrize("name", ["lstm", "gru", "gru_cho", "ln_lstm"])
def test_layer_options_float64(name, options):
    ref, fast = _pair(name, torch.float64, **options)
    _compare(ref, fast, torch.float64, 1e-10, lengths=[3, 5, 1], train=True)


def test_lstm_projection_and_zoneout_per_component():
    cell = cells.LSTM(proj_size=2, peephole=True)
    ref, fast = _pair(cell, torch.float64, num_layers=2, recurrent_dropout=0.3,
                      zoneout=(0.1, 0.4))
    _compare(ref, fast, torch.float64, 1e-10, lengths=[4, 5, 2], train=True)


def test_user_cell_gets_fused_kernels():
    assert fused.unsupported_reason(ScaledTanhRNN()) is None
    ref, fast = _pair(ScaledTanhRNN(), torch.float64, num_layers=2, bidirectional=True,
                      recurrent_dropout=0.2, zoneout=0.1)
    _compare(ref, fast, torch.float64, 1e-10, lengths=[5, 1, 3])
    ref, fast = _pair(ScaledTanhRNN(), torch.float32)
    _compare(ref, fast, torch.float32, 1e-5)


def test_user_cell_overriding_step_gets_fused_kernels():
    ref, fast = _pair(NormGatedCell(), torch.float64, bidirectional=True, recurrent_dropout=0.3)
    _compare(ref, fast, torch.float64, 1e-10, lengths=[2, 5, 4])


@pytest.mark.parametrize("name", ["lstm", "gru_cho", "ln_lstm", "gated_004"])
def test_gradcheck_through_fused(name):
    torch.manual_seed(3)
    m = Recurrent(name, 2, 3, backend="fused", dtype=torch.float64, zoneout=0.2)
    m.eval()
    params = list(m.parameters())
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(1, 2, s, dtype=torch.float64, requires_grad=True)
               for s in m.state_sizes)

    def f(x, *args):
        hxs, ps = args[:len(hx)], args[len(hx):]
        with torch.nn.utils.stateless._reparametrize_module(
                m, {n: p for (n, _), p in zip(m.named_parameters(), ps, strict=True)}):
            out, h_n = m(x, hxs[0] if len(hxs) == 1 else hxs, lengths=[4, 3])
        h_n = (h_n,) if isinstance(h_n, torch.Tensor) else h_n
        return (out, *h_n)

    assert torch.autograd.gradcheck(f, (x, *hx, *params), atol=1e-7, rtol=1e-6)


def test_streaming_step_matches_reference():
    ref, fast = _pair("gru", torch.float32)
    ref.eval()
    fast.eval()
    xs = torch.randn(6, 2, I)
    sa = sb = None
    for x in xs:
        ya, sa = ref.step(x, sa)
        yb, sb = fast.step(x, sb)
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=0)
    out, h_n = ref(xs)
    torch.testing.assert_close(sb, h_n, atol=1e-5, rtol=0)


def test_auto_picks_fused_where_torch_has_no_fused_kernel():
    assert engine.select_backend(cells.get("gru")) == "fused"
    assert engine.select_backend(cells.get("peephole")) == "fused"
    assert engine.select_backend(cells.get("lstm")) == "native"
    assert engine.select_backend(cells.get("lstm"), drop=[[None]]) == "fused"
    # torch's packed-sequence CPU LSTM is not oneDNN's: variable lengths go fused on CPU only
    assert engine.select_backend(cells.get("lstm"), varlen=True) == "fused"
    assert engine.select_backend(cells.get("lstm"), varlen=True, device="cuda") == "native"
    # ... and so is its LSTM with a projection
    assert engine.select_backend(cells.LSTM(proj_size=16)) == "fused"
    assert engine.select_backend(cells.LSTM(proj_size=16), device="cuda") == "native"
    assert engine.select_backend(cells.get("gru"), device="cuda") == "native"
    assert engine.select_backend(cells.get("mingru"), device="cuda") == "scan"
    # a projection wider than the small size the support check starts from
    assert engine.select_backend(cells.LSTM(proj_size=16, peephole=True)) == "fused"
    # LSTM training at large sizes: fused on CPU; inference, small sizes and GPUs: torch's kernel
    big, small = (64, 256), (32, 128)
    assert 64 * 4 * 256 * 256 >= engine.LSTM_FUSED_TRAIN_MIN_MACS > 32 * 4 * 128 * 128
    lstm = cells.get("lstm")
    assert engine.select_backend(lstm, size=big, grad=True) == "fused"
    assert engine.select_backend(lstm, size=big, grad=False) == "native"
    assert engine.select_backend(lstm, size=small, grad=True) == "native"
    assert engine.select_backend(lstm, size=big, grad=True, device="cuda") == "native"


def test_auto_lstm_training_at_a_large_size_runs_fused():
    m = Recurrent("lstm", 8, 256)
    ref = torch.nn.LSTM(8, 256)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 64, 8)
    out, _ = m(x)
    assert "Fused" in _graph_names(out)
    out_ref, _ = ref(x)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), m.weight_hh_l0)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), ref.weight_hh_l0)
    torch.testing.assert_close(g, g_ref, atol=1e-5 * max(1.0, g_ref.abs().max().item()),
                               rtol=1e-5)
    m.requires_grad_(False)  # frozen parameters (only the input's gradient): torch's kernel
    out, _ = m(x.requires_grad_())
    assert "Fused" not in _graph_names(out) and out.grad_fn is not None


@dataclass(frozen=True)
class CumsumCell(Cell):
    """A step with an op the fused backend does not compile (a cumulative sum over units)."""

    def pointwise(self, xp, hp, state, p):
        return (torch.tanh(torch.cumsum(xp + hp, dim=-1)),)


def test_unsupported_cell_is_refused_by_name_and_auto_falls_back():
    with pytest.raises(ValueError, match="fused.*cumsum"):
        engine.select_backend(CumsumCell(), "fused")
    assert engine.select_backend(CumsumCell()) == "reference"
    m = Recurrent(CumsumCell(), I, H)
    out, _ = m(torch.randn(T, B, I))
    assert out.shape == (T, B, H)


def test_float32_at_a_size_that_uses_onednn_packed_weights(monkeypatch):
    steps, batch, inputs, hidden = 8, 64, 512, 256
    monkeypatch.setattr(fused, "PACK_MIN_MACS", 0)  # recurrent products
    monkeypatch.setattr(fused, "_onednn_input_wins", lambda *a: True)  # input product
    assert steps * batch * inputs * 4 * hidden >= fused.INPUT_PACK_MIN_MACS
    ref = Recurrent("peephole", inputs, hidden, backend="reference", recurrent_dropout=0.2)
    fast = Recurrent("peephole", inputs, hidden, backend="fused", recurrent_dropout=0.2)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, inputs)
    res = []
    for m in (ref, fast):
        torch.manual_seed(5)
        out, (h, c) = m(x)
        loss = (out * torch.linspace(-1, 1, hidden)).sum() + c.sum()
        res.append((out, c, torch.autograd.grad(loss, list(m.parameters()))))
    torch.testing.assert_close(res[1][0], res[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(res[1][1], res[0][1], atol=1e-5, rtol=0)
    for a, b in zip(res[0][2], res[1][2], strict=True):
        # weight gradients are sums over all 512 rows, in another order: 1e-5 of their scale
        torch.testing.assert_close(b, a, atol=1e-5 * max(1.0, a.abs().max().item()), rtol=1e-5)


def test_buffers_reused_across_calls_never_overwrite_what_a_caller_still_holds():
    """The kernels reuse their big buffers (outputs, saved activations, gradients) across calls
    once nothing holds them: outputs and gradients kept from earlier calls stay as they were,
    and every call still equals the reference."""
    steps, batch, inputs, hidden = 40, 8, 6, 64  # buffers well above the reuse threshold
    ref = Recurrent("peephole", inputs, hidden, backend="reference")
    fast = Recurrent("peephole", inputs, hidden, backend="fused")
    fast.load_state_dict(ref.state_dict())
    xs = [torch.randn(steps, batch, inputs, requires_grad=True) for _ in range(3)]
    kept = []
    for x in xs:
        out, (h, c) = fast(x)
        (gx,) = torch.autograd.grad(out.sum() + c.sum(), x)
        kept.append((out, c, gx, out.clone(), c.clone(), gx.clone()))
        with torch.no_grad():
            fast(torch.randn(steps, batch, inputs))  # a call whose buffers are freed at once
    for x, (out, c, gx, out0, c0, gx0) in zip(xs, kept, strict=True):
        torch.testing.assert_close(out, out0, atol=0, rtol=0)
        torch.testing.assert_close(c, c0, atol=0, rtol=0)
        torch.testing.assert_close(gx, gx0, atol=0, rtol=0)
        r_out, (_, r_c) = ref(x)
        (r_gx,) = torch.autograd.grad(r_out.sum() + r_c.sum(), x)
        torch.testing.assert_close(out, r_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(gx, r_gx, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,dtype", [("peephole", torch.float32), ("ln_lstm", torch.float64),
                                        ("gru", torch.float32), ("gated_004", torch.float64)])
def test_batch_split_across_threads_equals_reference(name, dtype):
    """With two threads, the kernels run the batch as two row ranges, each its own time loop
    (``batch_split``: 11 rows -> 5 + 6, well above its work threshold at this size), with the
    tiled kernel's packed weights; variable lengths, zoneout and recurrent dropout per row."""
    steps, batch, inputs, hidden = 30, 11, 16, 64
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    kw = dict(dtype=dtype, recurrent_dropout=0.3, zoneout=0.2, bidirectional=True)
    ref = Recurrent(name, inputs, hidden, backend="reference", **kw)
    fast = Recurrent(name, inputs, hidden, backend="fused", **kw)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, inputs, dtype=dtype)
    lengths = torch.randint(steps // 2, steps + 1, (batch,))
    threads = torch.get_num_threads()
    res = []
    try:
        for m, nt in ((ref, 2), (fast, 2), (fast, 1)):
            torch.set_num_threads(nt)
            xi = x.clone().requires_grad_()
            torch.manual_seed(3)
            out, h_n = m(xi, lengths=lengths)
            gen = torch.Generator().manual_seed(7)
            loss = (out * torch.randn(out.shape, generator=gen, dtype=dtype)).sum() + \
                sum((h * h).sum() for h in (h_n if isinstance(h_n, tuple) else (h_n,)))
            res.append((out, torch.autograd.grad(loss, [xi, *m.parameters()])))
    finally:
        torch.set_num_threads(threads)
    (o_ref, g_ref), (o_two, g_two), (o_one, g_one) = res
    torch.testing.assert_close(o_two, o_ref, atol=atol, rtol=0)
    torch.testing.assert_close(o_two, o_one, atol=atol, rtol=0)
    for a, b, c in zip(g_ref, g_two, g_one, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)
        torch.testing.assert_close(b, c, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_products_with_partial_tiles_equal_torch_lstm(dtype):
    """The tiled kernels at sizes that leave partial tiles everywhere: 4H = 80 columns (two
    panels and a padded third), H = 20 weight rows and 9 / 4 + 5 batch rows (short row tiles),
    and 100 * 9 = 900 rows in the weight gradient (blocks of K); outputs and every
    gradient against torch.nn.LSTM with the same weights, on one thread and on two."""
    steps, batch, inputs, hidden = 100, 9, 7, 20
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    ref = torch.nn.LSTM(inputs, hidden, dtype=dtype)
    m = Recurrent("lstm", inputs, hidden, backend="fused", dtype=dtype)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, inputs, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(steps, batch, hidden, generator=gen, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            grads = []
            for mod in (ref, m):
                xi = x.clone().requires_grad_()
                out, _ = mod(xi)
                grads.append((out, torch.autograd.grad((out * w).sum(), [xi, *mod.parameters()])))
            (o_ref, g_ref), (o, g) = grads
            torch.testing.assert_close(o, o_ref, atol=atol, rtol=0)
            for a, b in zip(g_ref, g, strict=True):
                torch.testing.assert_close(b, a, atol=atol * max(1.0, a.abs().max().item()),
                                           rtol=atol)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_over_all_rows_equal_torch(dtype):
    """``mm_rows`` (the input projection and its input gradient) and ``mm_tn`` (its weight
    gradient, and the bias's as a column sum) against torch's matmul and sum, at sizes that leave
    partial tiles, blocks of rows and of K everywhere (K = 300 and 600 rows > the 256 block),
    with and without bias, a strided ``a``, and K = 0; one thread and two."""
    Recurrent("lstm", 2, 3, backend="fused", dtype=dtype)(torch.randn(2, 1, 2, dtype=dtype))
    ops = getattr(torch.ops, next(iter(fused._compiled.values())).module)
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    gen = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for m, k, n in [(37, 300, 45), (600, 40, 70), (70, 7, 1), (1, 33, 64), (9, 0, 5), (0, 4, 3)]:
                a = torch.randn(m, 2 * k + 1, generator=gen, dtype=dtype)[:, 1::2]  # strided
                mat = torch.randn(n, k, generator=gen, dtype=dtype).t()  # transposed, as a weight
                bias = torch.randn(n, generator=gen, dtype=dtype)
                torch.testing.assert_close(ops.mm_rows(a, mat, None), a @ mat, atol=atol, rtol=0)
                torch.testing.assert_close(ops.mm_rows(a, mat, bias), a @ mat + bias,
                                           atol=atol, rtol=0)
                b = torch.randn(m, n, generator=gen, dtype=dtype)
                (ab,) = ops.mm_tn(a, b, False)
                torch.testing.assert_close(ab, a.t() @ b, atol=atol, rtol=0)
                ab, bsum = ops.mm_tn(a, b, True)
                torch.testing.assert_close(ab, a.t() @ b, atol=atol, rtol=0)
                torch.testing.assert_close(bsum, b.sum(0), atol=atol, rtol=0)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="mm_rows: a \\(M x K\\) and mat \\(K x N\\)"):
        ops.mm_rows(torch.randn(3, 4, dtype=dtype), torch.randn(5, 2, dtype=dtype), None)


def test_subnormals_flushed_inside_the_kernels_only():
    """A gradient that decays through a long series into the subnormal range (small recurrent
    weights, a loss on the last step only): outputs and every gradient equal torch.nn.LSTM's
    with the same weights, and the thread's floating-point mode is restored after the call
    (torch's own ops still produce subnormals)."""
    steps, batch, inputs, hidden = 300, 4, 3, 8
    torch.manual_seed(0)
    ref = torch.nn.LSTM(inputs, hidden)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.mul_(0.05 if name.startswith("weight") else 0.0)
            if name.startswith("bias_ih"):
                p[hidden:2 * hidden] = -6.0  # forget gate nearly shut: the state gradient decays
    m = Recurrent("lstm", inputs, hidden, backend="fused")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, inputs)
    grads = []
    for mod in (ref, m):
        xi = x.clone().requires_grad_()
        out, _ = mod(xi)
        grads.append((out, torch.autograd.grad(out[-1].sum(), [xi, *mod.parameters()])))
    (o_ref, g_ref), (o, g) = grads
    peak = g_ref[0].abs().amax(dim=(1, 2))
    assert ((peak > 0) & (peak < torch.finfo(torch.float32).tiny)).sum() >= 3  # decayed that far
    torch.testing.assert_close(o, o_ref, atol=1e-6, rtol=0)
    for a, b in zip(g_ref, g, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6 * max(1.0, a.abs().max().item()), rtol=1e-5)
    tiny = torch.tensor([torch.finfo(torch.float32).tiny], dtype=torch.float32)
    assert (tiny / 4).item() > 0  # a subnormal result survives on this thread


def test_first_call_leaves_the_global_generator_alone(monkeypatch):
    """Finding out whether a cell's input projection is a plain linear (on its first fused call)
    draws no numbers from torch's global generator: seeded dropout and zoneout masks stay the
    same whether or not the check has run in the process."""
    monkeypatch.setattr(fused, "_linear_cache", {})
    m = Recurrent("gated_004", I, H, backend="fused")
    x = torch.randn(T, B, I)
    torch.manual_seed(11)
    m(x)
    after = torch.rand(3)
    torch.manual_seed(11)
    torch.testing.assert_close(after, torch.rand(3), atol=0, rtol=0)
    assert fused._linear_cache  # the check did run


@pytest.mark.parametrize("frozen", ["weight_ih_l0", "bias_ih_l0"])
def test_frozen_input_weight_or_bias(frozen):
    """A frozen input weight (or bias) gets no gradient and the rest equal ``reference``'s: the
    input projection's backward computes only what is asked for."""
    ref, fast = _pair("lstm", torch.float64)
    for m in (ref, fast):
        getattr(m, frozen).requires_grad_(False)
    x = torch.randn(T, B, I, dtype=torch.float64)
    grads = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        out, _ = m(xi)
        params = [p for p in m.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(out.square().sum(), [xi, *params]))
        assert getattr(m, frozen).grad is None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", BUILTIN)
def test_saturated_gates_stay_finite_float32(name):
    """Pre-activations far outside float32 exp's range (inputs of +-1000 on weights of +-40:
    sigmoid(-x) needs exp(x) = inf) give the reference's outputs and gradients, not NaN (the
    compiled code divides by a reciprocal estimate, which turned 1 / inf into NaN). 64 units:
    the vectorized loops."""
    ref = Recurrent(name, I, 64, backend="reference")
    with torch.no_grad():
        for n, prm in ref.named_parameters():
            prm.uniform_(-0.8, 0.8)
            if n.startswith("weight_ih"):
                prm.mul_(50)
    fast = Recurrent(name, I, 64, backend="fused")
    fast.load_state_dict(ref.state_dict())
    x = torch.tensor([-1000.0, -200.0, -90.0, 90.0, 200.0, 1000.0]).repeat_interleave(
        B * I * T // 6 + 1)[:T * B * I].reshape(T, B, I)
    results = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        out, _ = m(xi)
        results.append((out, torch.autograd.grad(out.sum(), [xi, *m.parameters()])))
    (o1, g1), (o2, g2) = results
    assert torch.isfinite(o2).all() and all(torch.isfinite(g).all() for g in g2)
    scale = max(1.0, o1.abs().max().item())
    torch.testing.assert_close(o2, o1, atol=1e-5 * scale, rtol=0)
    # minGRU/minLSTM here carry states of ~1e4 whose gradients sum thousands of large terms:
    # in float32 the fused kernel's summation order (vector width, tiles) loses up to 3e-3 of
    # the largest gradient on AVX-512 machines (measured against float64: 2.7e-3; the float32
    # reference loop 1e-6), so they are held to 6e-3 of it, every other cell to 1e-3
    tol = 6e-3 if name in ("mingru", "minlstm") else 1e-3
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, atol=tol * max(1.0, a.abs().max().item()), rtol=0)


def test_runtime_files_ship_and_are_part_of_the_module_hash(monkeypatch):
    """The C++ runtime lives in files under ``csrc/``: the generated source includes them, the
    module's name hashes their contents (a changed header builds a new module), and the package
    data ships them."""
    import tomllib
    from pathlib import Path

    from gyre.engine.fused import build, codegen

    progs = {"pnothing": "// no kernels"}
    src = codegen.module_source("NS", progs)
    for name in codegen.RUNTIME_FILES:
        assert (codegen.CSRC / name).is_file()
        assert f'#include "{name}"' in src
    name = build.module_name(progs)
    assert build.module_name(progs) == name
    monkeypatch.setattr(build, "runtime_text", lambda: codegen.runtime_text() + "// edited\n")
    assert build.module_name(progs) != name
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "csrc/*.h" in pyproject["tool"]["setuptools"]["package-data"]["gyre.engine.fused"]


def test_a_lock_file_left_by_a_killed_build_is_not_waited_on():
    """torch guards a build with a ``lock`` file, which a build killed midway leaves behind
    (every later load then waited on it forever); gyre's own lock goes with its holder, and
    whoever holds it removes such a file before loading."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import os
        import warnings
        warnings.simplefilter("error")  # a fallback to the reference loop fails the check
        import torch
        from torch.utils import cpp_extension
        import gyre.nn
        from gyre.engine.fused import _builtin_programs, build
        name = build.module_name(_builtin_programs())
        d = cpp_extension._get_build_directory(name, verbose=False)
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "lock"), "w").close()  # as a killed build leaves it
        m = gyre.nn.LSTM(3, 4, backend="fused")
        ref = gyre.nn.LSTM(3, 4, backend="reference")
        ref.load_state_dict(m.state_dict())
        x = torch.randn(5, 2, 3)
        with torch.no_grad():
            y, _ = m(x)
            torch.testing.assert_close(y, ref(x)[0], atol=1e-5, rtol=1e-5)
        assert not os.path.exists(os.path.join(d, "lock"))
    """)
    # bounded: a fresh machine's first build of the built-in module takes minutes
    subprocess.run([sys.executable, "-c", code], check=True, timeout=1200,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_a_library_cut_short_is_rebuilt(tmp_path):
    """A build killed while linking leaves a library that ninja sees as up to date but that does
    not load; the next load rebuilds it from its sources (fused stays on, no warning)."""
    import os
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import sys
        import warnings
        warnings.simplefilter("error")  # a fallback to the reference loop fails the check
        sys.path.insert(0, "examples")
        import torch
        from user_cell import MIRNN
        from gyre.nn import Recurrent
        m = Recurrent(MIRNN(), 3, 4, backend="fused")
        ref = Recurrent(MIRNN(), 3, 4, backend="reference")
        ref.load_state_dict(m.state_dict())
        x = torch.randn(5, 2, 3)
        with torch.no_grad():
            torch.testing.assert_close(m(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    """)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda: subprocess.run([sys.executable, "-c", code], check=True, timeout=900,  # noqa: E731
                                 env=env, cwd=root)
    run()
    (lib,) = tmp_path.glob("*/*.so")
    lib.write_bytes(b"")  # what a link cut short can leave
    run()
    assert lib.stat().st_size > 0
