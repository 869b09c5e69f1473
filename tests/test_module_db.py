"""PyTorch's generic module tests for ``torch.nn.RNN / LSTM / GRU``, run with gyre's classes.

The samples, expected errors and reference functions are torch's own: the ``module_db`` entries
of ``torch.testing._internal.common_modules`` (shipped in the torch wheel), which torch's
``test/test_modules.py`` drives. Each test below checks what the test of the same name there
checks, with ``gyre.nn.RNN / LSTM / GRU`` constructed from the same arguments. Gradients use
torch's testing ``gradcheck`` / ``gradgradcheck`` (fast mode, batched gradients checked through
``vmap``, as torch's suite runs them), in float64, on every backend that runs these cells.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.testing._internal.common_utils import freeze_rng_state, gradcheck, gradgradcheck
from torch.utils._pytree import tree_flatten, tree_unflatten

import gyre.nn

GYRE = {torch.nn.RNN: gyre.nn.RNN, torch.nn.LSTM: gyre.nn.LSTM, torch.nn.GRU: gyre.nn.GRU}
INFOS = {info.module_cls.__name__: info for info in module_db if info.module_cls in GYRE}
NAMES = sorted(INFOS)
DTYPES = [torch.float32, torch.float64]
TRAINING = [True, False]


def _samples(name, dtype=torch.float64, requires_grad=False, training=True):
    info = INFOS[name]
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                   training=training)


def _build(name, sample, dtype, training, backend="auto"):
    c = sample.constructor_input
    m = GYRE[INFOS[name].module_cls](*c.args, **c.kwargs, backend=backend).to(dtype)
    m.train(training)
    return m


def _tensors(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _assert_same(a, b, **tol):
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb, strict=True):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_forward(name, dtype, training):
    """Outputs equal torch's no-batch-dim reference (the module run on a batch of one), and
    ``.float()`` / ``.double()`` convert every parameter."""
    for sample in _samples(name, dtype, training=training):
        with freeze_rng_state():
            m = _build(name, sample, dtype, training)
            args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
            out = m(*args, **kwargs)
            if sample.reference_fn is not None:
                _assert_same(out, sample.reference_fn(m, *args, **kwargs))
            getattr(m, "double" if dtype == torch.float64 else "float")()
            m(*args, **kwargs)
            assert all(p.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_factory_kwargs(name, dtype):
    for sample in _samples(name, dtype):
        c = sample.constructor_input
        m = GYRE[INFOS[name].module_cls](*c.args, **c.kwargs, device="cpu", dtype=dtype)
        params = list(m.parameters())
        assert params and all(p.dtype == dtype and p.device.type == "cpu" for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_repr(name):
    for sample in _samples(name):
        m = _build(name, sample, torch.float64, True)
        assert type(m).__name__ in repr(m) and str(m)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("name", NAMES)
def test_pickle(name, training):
    for sample in _samples(name, torch.float32, training=training):
        with freeze_rng_state():
            m = _build(name, sample, torch.float32, training)
            args = sample.forward_input.args
            out = m(*args)
            buf = io.BytesIO()
            torch.save(m, buf)
            buf.seek(0)
            copy = torch.load(buf, weights_only=False)  # a whole module: torch's pickle test
            _assert_same(copy(*args), out)


def _non_contiguous(obj):
    def make(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
        assert not out.is_contiguous()
        return out.requires_grad_(t.requires_grad)
    flat, spec = tree_flatten(obj)
    return tree_unflatten([make(t) for t in flat], spec)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_tensors(name, dtype, training):
    """Non-contiguous inputs, states and output gradients give the same outputs and gradients."""
    for sample in _samples(name, dtype, requires_grad=True, training=training):
        m = _build(name, sample, dtype, training)
        args = sample.forward_input.args
        with freeze_rng_state():
            ref = m(*args)
        gouts = tree_unflatten([torch.randn_like(t) for t in tree_flatten(ref)[0]],
                               tree_flatten(ref)[1])
        results = []
        for a in (args, _non_contiguous(args)):
            for g in (gouts, _non_contiguous(gouts)):
                leaves = [t for t in _tensors(a) if t.requires_grad] + list(m.parameters())
                with freeze_rng_state():
                    out = m(*a)
                grads = torch.autograd.grad([o for o in _tensors(out)], leaves, _tensors(g),
                                            allow_unused=True)
                results.append((out, grads))
        for out, grads in results[1:]:
            _assert_same(out, results[0][0])
            _assert_same(grads, results[0][1], atol=1e-4, rtol=0)


def _gradient_check(m, sample, check, partial=True):
    """torch's ``_test_gradients_helper``: the total derivative over input, states and every
    parameter, then (``partial``) each parameter alone."""
    args = sample.forward_input.args
    params = tuple(m.parameters())
    flat, spec = tree_flatten(args + params)

    def fn(*flat_in):
        inputs = tree_unflatten(list(flat_in), spec)
        with freeze_rng_state():
            return tree_flatten(m(*inputs[:len(args)]))[0]

    assert check(fn, flat)
    if not partial:
        return
    for p in params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        assert check(fn, flat)
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


# Each backend that runs torch's cells. torch's suite checks every sample in training and
# evaluation, each parameter alone too; these samples have no dropout, so both modes compute the
# same function, and the samples differ in flags the other tests here cover (bias, batch_first,
# bidirectional, hx given). To keep the suite's time, "auto" checks every fourth sample (the first
# also parameter by parameter) and each other backend every eighth, in training mode; second
# derivatives every eighth and sixteenth.
BACKENDS = ["auto", "reference", "native", "fused"]


def _every(samples, backend, auto_step, other_step):
    step, first = (auto_step, 0) if backend == "auto" else (other_step, 1)
    return [(i, s) for i, s in enumerate(samples) if i % step == first]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_grad(name, backend):
    samples = _samples(name, torch.float64, requires_grad=True, training=True)
    for i, sample in _every(samples, backend, 4, 8):
        m = _build(name, sample, torch.float64, True, backend)
        _gradient_check(m, sample, gradcheck, partial=backend == "auto" and i == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gradgrad(name, backend):
    samples = _samples(name, torch.float64, requires_grad=True, training=True)
    for _, sample in _every(samples, backend, 8, 16):
        m = _build(name, sample, torch.float64, True, backend)
        _gradient_check(m, sample, gradgradcheck, partial=False)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("name", NAMES)
def test_memory_format(name, training):
    """Outputs and every gradient (input, states, parameters) come out contiguous."""
    for sample in _samples(name, torch.float32, requires_grad=True, training=training):
        m = _build(name, sample, torch.float32, training)
        args = sample.forward_input.args
        outs = _tensors(m(*args))
        assert all(o.is_contiguous() for o in outs)
        if not training:
            continue
        leaves = [t for t in _tensors(args) if t.requires_grad] + list(m.parameters())
        grads = torch.autograd.grad(outs, leaves, [torch.rand_like(o) for o in outs])
        for g in grads:
            assert g.is_contiguous(), g.stride()
        # torch's test_memory_format and a flat gradient vector (as torch users build them)
        assert torch.cat([g.view(-1) for g in grads]).numel() == sum(t.numel() for t in leaves)


@pytest.mark.parametrize("name", NAMES)
def test_if_train_and_eval_modes_differ(name):
    """``train_and_eval_differ`` is True for these entries: the forward reads ``training``."""
    assert INFOS[name].train_and_eval_differ
    sample = _samples(name)[0]
    m = _build(name, sample, torch.float64, True)
    delattr(m, "training")
    with pytest.raises(AttributeError, match="'training'"):
        m(*sample.forward_input.args)


@pytest.mark.parametrize("name", NAMES)
def test_device_ctx_init(name):
    """Built under ``torch.device('meta')``, parameters are meta with the CPU build's metadata."""
    for sample in _samples(name):
        c = sample.constructor_input
        cls = GYRE[INFOS[name].module_cls]
        cpu = cls(*c.args, **c.kwargs)
        with torch.device("meta"):
            meta = cls(*c.args, **c.kwargs)
        for a, b in zip(meta.parameters(), cpu.parameters(), strict=True):
            assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype
            assert a.stride() == b.stride() and a.requires_grad == b.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_to_empty(name):
    for sample in _samples(name, torch.float32):
        c = sample.constructor_input
        with torch.device("meta"):
            m = GYRE[INFOS[name].module_cls](*c.args, **c.kwargs)
        m.to_empty(device="cpu")
        assert all(p.device.type == "cpu" for p in m.parameters())
        out = m(*sample.forward_input.args)
        assert all(t.device.type == "cpu" for t in _tensors(out))


@pytest.mark.parametrize("set_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("swap", [False, True], ids=["data", "swap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_to(name, dtype, swap, set_grad):
    """``Module.to`` keeps every parameter an ``nn.Parameter`` of the new dtype, as the same
    Python object; with ``torch.__future__.set_swap_module_params_on_conversion(True)`` it swaps
    each tensor in place (so nothing else may hold a reference to it, a streaming plan
    included), otherwise it sets ``.data``; gradients follow."""
    info = INFOS[name]
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        for sample in _samples(name, dtype):
            c = sample.constructor_input
            m = GYRE[info.module_cls](*c.args, **c.kwargs)
            for n, p in list(m.named_parameters(recurse=False)):  # not .to(): under test
                new = torch.nn.Parameter(p.detach().clone().to("cpu", dtype))
                setattr(m, n, new)
                if set_grad:
                    new.grad = torch.randn_like(new)
            if swap and not set_grad:  # .to() after a forward and backward
                out = m(*sample.forward_input.args)
                (out[0] if isinstance(out, tuple) else out).sum().backward()
                with torch.no_grad():  # and after a streamed step, whose plan holds the weights
                    x = sample.forward_input.args[0]
                    m(x[:, :1] if x.dim() == 3 and m.batch_first else x[:1])
                m.to(dtype=torch.half)
                m.to(dtype=torch.float32)
            prev = dtype
            for dtype_ in info.dtypes:
                g_no_swap = dtype_ == prev
                prev = dtype_
                ids = [id(p) for p in m.parameters()]
                cdatas = [p._cdata for p in m.parameters()]
                if set_grad:
                    g_cdatas = [p.grad._cdata for p in m.parameters()]
                m.to(device="cpu", dtype=dtype_)
                params = list(m.parameters())
                assert all(isinstance(p, torch.nn.Parameter) and p.dtype == dtype_
                           for p in params)
                assert [id(p) for p in params] == ids
                if set_grad:
                    assert all(p.grad.dtype == dtype_ for p in params)
                    same = [a == p.grad._cdata for a, p in zip(g_cdatas, params, strict=True)]
                    assert all(same) if (g_no_swap or not swap) else not any(same)
                same = [a == p._cdata for a, p in zip(cdatas, params, strict=True)]
                assert not any(same) if swap else all(same)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize("name", NAMES)
def test_errors(name):
    """Every expected error of torch's entry: its exception type and its message's pattern."""
    info = INFOS[name]
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                           requires_grad=False, training=True)
    assert errors
    for err in errors:
        sample = err.module_error_input
        c = sample.constructor_input
        cls = GYRE[info.module_cls]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(err.error_type, match=err.error_regex):
                    cls(*c.args, **c.kwargs)
            else:
                m = cls(*c.args, **c.kwargs)
                f = sample.forward_input
                with pytest.raises(err.error_type, match=err.error_regex):
                    m(*f.args, **f.kwargs)


def test_every_entry_is_run():
    """The three torch entries are present, so the tests above are not vacuous."""
    assert NAMES == ["GRU", "LSTM", "RNN"]
    assert all(len(_samples(n)) >= 16 for n in NAMES)

