"""The ``fused`` backend: the time loop and its backward in generated, compiled C++.

A cell's :meth:`~gyre.cells.Cell.step` is traced into per-unit scalar operations
(:mod:`.ir`), from which :mod:`.codegen` writes the forward loop (recurrent GEMMs on packed
weights into preallocated buffers, pointwise work in vectorized loops, one range of batch rows
per thread) and the backward through time (the reverse-mode derivative of every pointwise op,
one GEMM per step per matrix product for the state gradient, the weight gradients as single
GEMMs over all ``T*B`` rows). The input pre-activations and anything computed from parameters
alone run in Python under autograd (``dW_ih`` comes from autograd through
``cell.input_preact``); where that is a plain ``linear(x, W, b)``, the product over all
``T*B`` rows and its two gradients run on the same tiled kernel as the loop's products
(:class:`_TiledLinear`), or on oneDNN for big float32 ones.

For streaming, every program also has a one-step entry, :data:`step_entry` (:func:`.stream.plan`:
the whole stack in one call, no autograd), which :func:`gyre.engine.stream` hands out when the
contract chooses ``fused`` for a one-step call.

A user cell gets all of this from its Python ``step``; nothing is written per cell. Kernels are
built on first use (:mod:`.build`); where they cannot be, :func:`run_layer` runs the
``reference`` loop after one warning.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ...cells import Cell, Params, State, layer_specs
from .. import reference
from . import build, ir
from .codegen import program_source
from .stream import plan as step_entry  # the one-step entry of the backend contract

__all__ = ["run_layer", "step_entry", "unsupported", "unsupported_reason", "available",
           "Unsupported"]

Unsupported = ir.Unsupported

_lock = threading.RLock()
_compiled: dict = {}
_reasons: dict = {}
_builtin: dict[str, str] | None = None
_warned: set[str] = set()
_broken: str | None = None  # why builds fail here, once known ("" once known to work)


@dataclass
class _Kernel:
    prog: ir.Program
    units: list[int]
    fwd: object
    bwd: object
    tag: str = ""  # the program's name in its module (``step_<tag>`` is its streaming step)
    module: str = ""  # the built module's name (see :func:`build.python_module`)


def _tagged(prog: ir.Program) -> tuple[str, str]:
    src = program_source(prog, "TAG")
    tag = "p" + hashlib.sha256(src.encode()).hexdigest()[:16]
    return tag, src.replace("TAG", tag)


def _builtin_programs() -> dict[str, str]:
    """Every built-in cell's program (default options, with and without biases)."""
    global _builtin
    if _builtin is None:
        from ...cells import LSTM, REGISTRY

        progs = {}
        cells = [factory() for factory in REGISTRY.values()] + [
            LSTM(proj_size=2), LSTM(proj_size=2, peephole=True)]
        for cell in cells:
            for bias in (True, False):
                try:
                    prog, _ = ir.trace(cell, 3, 4, bias, check=False)
                except Unsupported:
                    continue
                tag, src = _tagged(prog)
                progs[tag] = src
        _builtin = progs
    return _builtin


def _key(cell: Cell):
    try:
        hash(cell)
        return cell
    except TypeError:
        return id(cell)


def available() -> str | None:
    """None when fused kernels can be built here, else why not."""
    global _broken
    if _broken is None:
        _broken = build.toolchain_missing() or ""
    return _broken or None


def unsupported_reason(cell: Cell) -> str | None:
    """Why ``cell`` cannot run fused (checked by tracing at a small size), or None."""
    k = _key(cell)
    if k not in _reasons:
        reason = None
        for hidden in (5, 67, 1031):  # a cell may need a bigger size (LSTM's proj_size < H)
            try:
                ir.trace(cell, 3, hidden, True)
                reason = None
                break
            except Unsupported as e:
                reason = str(e)
                if not isinstance(e.__cause__, ValueError):
                    break
        _reasons[k] = reason
    return _reasons[k]


def unsupported(cell: Cell, options, device: str) -> str | None:
    """The backend contract (:mod:`gyre.engine.contract`): why ``fused`` cannot run ``cell``
    with ``options`` on ``device``, or None. Every layer option is supported over a sequence;
    the one-step entry (``options.stream``, :data:`step_entry`) runs one direction without an
    autograd graph and draws no random masks."""
    if device != "cpu":
        return "fused kernels are CPU code"
    reason = available() or unsupported_reason(cell)
    if reason is None and options.stream:
        if options.directions != 1:
            return "a reverse direction needs the whole sequence"
        if options.grad != "none":
            return "the one-step entry builds no autograd graph"
        if options.random:
            return "the one-step entry draws no random masks"
    return reason


def _kernel(cell: Cell, input_size: int, hidden: int, bias: bool) -> _Kernel:
    key = (_key(cell), input_size, hidden, bias)
    with _lock:
        if key in _compiled:
            return _compiled[key]
        prog, units = ir.trace(cell, input_size, hidden, bias)
        tag, src = _tagged(prog)
        builtin = _builtin_programs()
        if tag in builtin:
            ns = build.load(builtin, "gyre's built-in cells")
        else:
            ns = build.load({tag: src}, cell.describe())
        ops = getattr(torch.ops, ns)
        k = _Kernel(prog, [units[f] for f in range(prog.nfam)], getattr(ops, f"fwd_{tag}"),
                    getattr(ops, f"bwd_{tag}"), tag, ns)
        _compiled[key] = k
        return k


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


_size_cache: dict = {}


def _sizes(cell: Cell, p: Params, x: Tensor, state: State):
    """(input_size, hidden_size, bias) of this layer, checked against the cell's specs."""
    key = (_key(cell), x.shape[-1], tuple(s.shape[-1] for s in state),
           tuple((k, v.shape) for k, v in p.items()))
    found = _size_cache.get(key)
    if found is None:
        found = _size_cache[key] = _find_sizes(cell, p, x, state)
    return found


def _find_sizes(cell: Cell, p: Params, x: Tensor, state: State):
    input_size = x.shape[-1]
    for h in _hidden_candidates(cell, state):
        for bias in (True, False):
            try:
                specs = layer_specs(cell, input_size, h, bias)
            except ValueError:
                continue
            if set(specs) == set(p) and all(tuple(p[n].shape) == s.shape
                                            for n, s in specs.items()):
                return input_size, h, bias
    raise Unsupported("cannot tell the hidden size from the parameters")


def _hidden_candidates(cell: Cell, state: State):
    seen = []
    for s in state:
        h = s.shape[-1]
        if h not in seen:
            seen.append(h)
    return seen


def run_layer(
    cell: Cell,
    p: Params,
    x: Tensor,
    state: State,
    *,
    valid: Tensor | None = None,
    drop: Tensor | None = None,
    zone: tuple[Tensor | None, ...] | None = None,
    return_states: bool = False,
) -> tuple[Tensor, State, tuple[Tensor, ...] | None]:
    """Same contract as :func:`gyre.engine.reference.run_layer`, run by compiled kernels."""
    kernel = None
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        reason = available()
        if reason is None:
            try:
                kernel = _kernel(cell, *_sizes(cell, p, x, state))
            except Unsupported as e:
                _warn_once(f"unsupported:{cell.describe()}",
                           f"gyre: the fused backend cannot compile {cell.describe()} ({e}); "
                           "running the reference loop")
            except build.BuildError as e:
                global _broken
                _broken = str(e)
                _warn_once("build", f"gyre: fused kernels could not be built ({e}); "
                                    "running the reference loop instead")
        else:
            _warn_once("build", f"gyre: fused kernels cannot be built here ({reason}); "
                                "running the reference loop instead")
    if kernel is None:
        return reference.run_layer(cell, p, x, state, valid=valid, drop=drop, zone=zone,
                                   return_states=return_states)
    T, B = x.shape[:2]
    xp = _input_preact(kernel, cell, p, x).contiguous()
    vecs, mats = kernel.prog.hoist(p)
    K = len(state)
    drop_t = xp.new_ones(B, state[0].shape[-1]) if drop is None else \
        drop.to(xp.dtype).contiguous()
    empty = xp.new_empty(0)
    zts, zmodes = [], []
    for k in range(K):
        m = None if zone is None else zone[k]
        if m is None:
            zts.append(empty)
            zmodes.append(0)
        elif m.dim() == 0:
            zts.append(m.detach().to(xp.dtype).reshape(1))
            zmodes.append(1)
        else:
            zts.append(m.detach().to(xp.dtype).contiguous())
            zmodes.append(2)
    valid_t = empty.bool() if valid is None else valid.to(torch.bool).contiguous()
    state0 = [s.contiguous() for s in state]
    packed = _packed(mats, B, xp)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xp, *state0, *vecs, *mats)):
        again = _Recompute(cell, tuple(p), valid, drop, zone)
        seqs = _Fused.apply(kernel, again, xp, drop_t.detach(), zts, zmodes, valid_t, packed, K,
                            len(vecs), len(mats), x, *state0, *vecs, *mats, *p.values())
    else:  # inference (streaming included): no autograd node, nothing saved
        seqs = kernel.fwd(xp, state0, vecs, mats, packed, drop_t, zts, zmodes, valid_t,
                          kernel.units, False)[:K]
    final = tuple(s[-1] for s in seqs)
    out, states = reference.zero_padding(cell.readout(seqs[0], p), tuple(seqs), valid)
    return out, final, (states if return_states else None)


#: from this many multiply-adds per step a recurrent product runs on oneDNN's prepacked weight;
#: below, on the generated code's tiled kernel. Measured, LSTM training at (100,64,256,256) and
#: (50,128,512,512): on an AVX-512 Xeon within 1% of oneDNN's either way (2 threads), on an
#: AVX-512 EPYC the tiled kernel 3-6% faster (one thread: oneDNN's output is copied out of a
#: fresh tensor every step)
PACK_MIN_MACS = 1 << 30
#: from this many multiply-adds the input projection may run on oneDNN's prepacked weight (where
#: :func:`_onednn_input_wins` measures it faster than the tiled kernel), below on the tiled kernel
INPUT_PACK_MIN_MACS = 1 << 28
#: ...but only while its output stays below this many bytes: glibc maps every larger block fresh
#: from the system (its mmap threshold stops growing at 32 MiB), so oneDNN's output, and the
#: autograd products of its backward, page-fault on every 4 KiB of every call, where the tiled
#: products take theirs from the kernel module's buffer pool (measured, minGRU at T=16384, B=8,
#: I=H=256, one thread: ~20% of the call in page faults before)
INPUT_PACK_MAX_BYTES = 32 << 20

_input_choice: dict = {}


def _onednn_input_wins(x2: Tensor, w: Tensor, b: Tensor | None, ops) -> bool:
    """Whether oneDNN (the weight reordered, then its product) computes ``x2 @ w.T + b`` faster
    than the tiled kernel (:class:`_TiledLinear`): both timed on this call's tensors, best of 3
    each, alternating, with :data:`gyre.engine.autotune.clock`, once per (rows rounded up to a
    power of 2, in, out, threads), kept for the process. Which wins depends on the CPU: on an
    AVX-512 Xeon oneDNN was 1-4% faster at (6400, 256) @ (256, 1024), on an AVX-512 EPYC the
    tiled kernel was."""
    from .. import autotune

    key = (autotune.bucket(x2.shape[0]), w.shape[1], w.shape[0], torch.get_num_threads())
    found = _input_choice.get(key)
    if found is None:
        with torch.no_grad():
            xd, wd, bd = x2.detach(), w.detach(), None if b is None else b.detach()

            def onednn():
                packed = torch.ops.mkldnn._reorder_linear_weight(wd.contiguous(), xd.shape[0])
                torch.ops.mkldnn._linear_pointwise(xd.contiguous(), packed, bd, "none", [], "")

            def tiled():
                ops.mm_rows(xd, wd.t(), bd)

            best = {onednn: float("inf"), tiled: float("inf")}
            for r in range(4):  # the first round untimed: first-touch memory, oneDNN's JIT
                for fn in (onednn, tiled) if r % 2 else (tiled, onednn):
                    t0 = autotune.clock()
                    fn()
                    if r:
                        best[fn] = min(best[fn], autotune.clock() - t0)
        found = _input_choice[key] = best[onednn] < best[tiled]
    return found


def _input_preact(kernel: _Kernel, cell: Cell, p: Params, x: Tensor) -> Tensor:
    """``cell.input_preact``; for the base class's ``linear(x, weight_ih, bias_ih)``, the same
    product over all ``T*B`` rows on the kernel module's tiled products (:class:`_TiledLinear`),
    or for big float32 inputs through oneDNN with a prepacked weight (:class:`_PackedLinear`)."""
    names = _plain_linear(cell, p) if x.dim() == 3 else None
    if names is None:
        return cell.input_preact(x, p)
    w, b = p[names[0]], None if names[1] is None else p[names[1]]
    x2 = x.reshape(-1, x.shape[-1])
    out = None
    ops = getattr(torch.ops, kernel.module)
    if (x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and x2.shape[0] * w.shape[0] * w.shape[1] >= INPUT_PACK_MIN_MACS
            and x2.shape[0] * w.shape[0] * x.element_size() < INPUT_PACK_MAX_BYTES):
        try:
            if _onednn_input_wins(x2, w, b, ops):
                with torch.no_grad():
                    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(),
                                                                    x2.shape[0])
                out = _PackedLinear.apply(x2, w, b, packed, ops)
        except (RuntimeError, AttributeError):
            out = None
    if out is None:
        out = _TiledLinear.apply(x2, w, b, ops)
    return out.view(*x.shape[:-1], w.shape[0])


_linear_cache: dict = {}


def _plain_linear(cell: Cell, p: Params) -> tuple[str, str | None] | None:
    """(weight, bias) parameter names when ``cell.input_preact`` is exactly
    ``linear(x, p[weight], p[bias])`` (checked by recording it once), else None."""
    width = next((v.shape[-1] for v in p.values() if v.dim() == 2), None)
    return _recorded_linear(("input", _key(cell), tuple(p)), cell.input_preact, p, width)


def _plain_readout(cell: Cell, p: Params, hidden: int) -> tuple[str, str | None] | None:
    """The same for ``cell.readout`` of a ``hidden``-wide state (None also for the identity)."""
    return _recorded_linear(("readout", _key(cell), tuple(p), hidden), cell.readout, p, hidden)


def _recorded_linear(key, fn, p: Params, width: int | None) -> tuple[str, str | None] | None:
    """(weight, bias) names when ``fn(x, p)`` on a ``width``-wide ``x`` records exactly as
    ``linear(x, p[weight], p[bias])`` (cached under ``key``), else None."""
    if key not in _linear_cache:
        found = None
        try:
            gen = torch.Generator().manual_seed(0)  # not the global one: masks drawn later
            ex = {k: torch.rand(v.shape, generator=gen) for k, v in p.items()}
            x = torch.rand(2, width, generator=gen)
            ops, _ = ir.record_fn(lambda: fn(x, ex))
            names = {id(v): k for k, v in ex.items()}
            funcs = [op[0] for op in ops]
            aten = torch.ops.aten
            if funcs == [aten.t.default, aten.addmm.default] and ops[1][1][1] is x and \
                    ops[1][1][2] is ops[0][3] and id(ops[1][1][0]) in names:
                found = (names[id(ops[0][1][0])], names[id(ops[1][1][0])])
            elif funcs == [aten.t.default, aten.mm.default] and ops[1][1][0] is x and \
                    ops[1][1][1] is ops[0][3]:
                found = (names[id(ops[0][1][0])], None)
        except Exception:  # anything unexpected (a weight not among p too): the cell's own code
            found = None
        _linear_cache[key] = found
    return _linear_cache[key]


class _PackedLinear(torch.autograd.Function):
    """``x2 @ w.T + b`` on oneDNN's prepacked weight; its backward as :class:`_TiledLinear`'s."""

    @staticmethod
    def forward(ctx, x2, w, b, packed, ops):
        ctx.save_for_backward(x2, w)
        ctx.has_bias, ctx.ops = b is not None, ops
        return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), packed, b, "none", [], "")

    @staticmethod
    def backward(ctx, g):
        return (*_TiledLinear.backward(ctx, g), None)


def _linear_backward(ctx, g):
    """The gradients of ``x2 @ w.T + b`` in torch ops (so differentiable again when
    ``create_graph=True``, and batchable under vmap)."""
    x2, w = ctx.saved_tensors
    dx = g @ w if ctx.needs_input_grad[0] else None
    dw = g.t() @ x2 if ctx.needs_input_grad[1] else None
    db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db, None


class _TiledLinear(torch.autograd.Function):
    """``x2 @ w.T + b`` and its backward (``g @ w``; ``g.T @ x2`` and ``g.sum(0)`` in one pass) on
    the tiled kernel of a fused module (``ops``: its ``torch.ops`` namespace)."""

    @staticmethod
    def forward(ctx, x2, w, b, ops):
        ctx.save_for_backward(x2, w)
        ctx.has_bias, ctx.ops = b is not None, ops
        return ops.mm_rows(x2, w.t(), b)

    @staticmethod
    def backward(ctx, g):
        if _differentiable_backward_needed((g,)):
            return _linear_backward(ctx, g)
        x2, w = ctx.saved_tensors
        g = g.contiguous()
        dx = ctx.ops.mm_rows(g, w, None) if ctx.needs_input_grad[0] else None
        dw = db = None
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:  # the bias's gradient from the same pass over g
            res = ctx.ops.mm_tn(x2, g, need_db)
            dw, db = res[0].t().contiguous(), (res[1] if need_db else None)
        elif need_db:
            db = g.sum(0)
        return dx, dw, db, None


def _packed(mats: list[Tensor], batch: int, xp: Tensor) -> list[Tensor]:
    """oneDNN-prepacked weights for each matrix product, forward and backward (float32 on CPU
    with oneDNN and big enough products), else empty: the kernels then use their tiled one."""
    if xp.dtype != torch.float32 or not mats or not torch.backends.mkldnn.is_available():
        return []
    if any(batch * m.shape[0] * m.shape[1] < PACK_MIN_MACS for m in mats):
        return []
    try:
        with torch.no_grad():
            reorder = torch.ops.mkldnn._reorder_linear_weight
            return [w for m in mats for w in (reorder(m.t().contiguous(), batch),
                                              reorder(m.contiguous(), batch))]
    except (RuntimeError, AttributeError):
        return []


@dataclass
class _Recompute:
    """What :class:`_Fused`'s differentiable backward needs to rerun the layer's loop in torch
    ops (:func:`gyre.engine.reference.state_sequences`); tensors here carry no gradient."""

    cell: Cell
    names: tuple[str, ...]  # the parameters' names, in the order they follow the matrices
    valid: Tensor | None
    drop: Tensor | None
    zone: tuple[Tensor | None, ...] | None


def _differentiable_backward_needed(grads) -> bool:
    """True when a backward must itself be differentiable or batchable: ``create_graph=True``
    (grad mode is on inside the backward), ``torch.func`` (a functorch level is active) or
    ``is_grads_batched=True`` (the output gradients are batched tensors). The compiled backward
    is neither."""
    functorch = torch._C._functorch
    return (torch.is_grad_enabled() or functorch.maybe_current_level() is not None
            or any(g is not None and functorch.is_legacy_batchedtensor(g) for g in grads))


def _strided_like(g: Tensor | None, like: Tensor) -> Tensor | None:
    """``g`` laid out with ``like``'s strides, so a gradient that autograd maps back through a
    transposed view of a parameter (``mats`` are ``W.t()`` where the kernel wants them) reaches
    the parameter contiguous."""
    if g is None or g.stride() == like.stride() or not _dense(like):
        return g
    return torch.empty_strided(like.shape, like.stride(), dtype=g.dtype,
                               device=g.device).copy_(g)


def _dense(t: Tensor) -> bool:
    """True when ``t``'s strides are a permutation of a contiguous layout."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


class _Fused(torch.autograd.Function):
    """The compiled loop and its compiled backward. The layer's input ``x`` and parameters ``p``
    ride along after the hoisted matrices. The compiled backward returns the gradients of ``xp``
    and the hoisted tensors (None for ``x`` and ``p``: autograd carries them back through the
    input projection and the hoisting ops). Where the backward itself must be differentiable or
    batchable (:func:`_differentiable_backward_needed`, decided per call) it reruns the whole
    layer in torch ops from ``x``, the initial state and ``p`` and returns their gradients
    (None for ``xp`` and the hoisted tensors)."""

    @staticmethod
    def forward(ctx, kernel, again, xp, drop, zts, zmodes, valid, packed, K, V, M, *tensors):
        state0 = tensors[1:1 + K]
        vecs, mats = tensors[1 + K:1 + K + V], tensors[1 + K + V:1 + K + V + M]
        save = any(ctx.needs_input_grad)
        res = kernel.fwd(xp, list(state0), list(vecs), list(mats), packed, drop, zts, zmodes,
                         valid, kernel.units, save)
        seqs = res[:K]
        if save:
            ctx.kernel, ctx.zts, ctx.zmodes, ctx.K, ctx.V, ctx.M = kernel, zts, zmodes, K, V, M
            ctx.again, ctx.packed = again, packed
            ctx.saved = res[K:]
            ctx.save_for_backward(xp, drop, valid, *tensors, *seqs)
        return tuple(seqs)

    @staticmethod
    def backward(ctx, *gseqs):
        K, V, M = ctx.K, ctx.V, ctx.M
        xp, drop, valid, x, *rest = ctx.saved_tensors
        state0, vecs, mats = rest[:K], rest[K:K + V], rest[K + V:K + V + M]
        ptensors, seqs = rest[K + V + M:-K], rest[-K:]
        lead = (None,) * 11  # kernel, again, xp, drop, zts, zmodes, valid, packed, K, V, M
        if _differentiable_backward_needed(gseqs):
            dx, dstate, dp = _recomputed_backward(ctx.again, x, state0, ptensors, gseqs)
            return (*lead, dx, *dstate, *(None,) * (V + M), *dp)
        gseqs = [g.contiguous() for g in gseqs]
        res = ctx.kernel.bwd(gseqs, xp, list(state0), list(seqs), list(vecs), list(mats),
                             ctx.packed, drop, ctx.zts, ctx.zmodes, valid, ctx.saved,
                             ctx.kernel.units)
        dxp, dstate = res[0], res[1:1 + K]
        dvecs = res[1 + K:1 + K + V]
        dmats = [_strided_like(g, m) for g, m in zip(res[1 + K + V:], mats, strict=True)]
        return (None, None, dxp, *lead[3:], None, *dstate, *dvecs, *dmats,
                *(None,) * len(ptensors))


def _recomputed_backward(again: _Recompute, x, state0, ptensors, gseqs):
    """The gradients of the layer's state sequences for its input ``x``, initial state and
    parameters, by autograd through the reference loop (``cell.input_preact`` and
    :func:`gyre.engine.reference.state_sequences`) rerun here from the saved inputs; the result
    is differentiable again when grad mode is on (``create_graph=True``)."""
    p = dict(zip(again.names, ptensors, strict=True))
    wrt = [x, *state0, *ptensors]
    live = [i for i, t in enumerate(wrt) if t.requires_grad]
    grads = [None] * len(wrt)
    if live:
        with torch.enable_grad():
            seqs = reference.state_sequences(again.cell, p, again.cell.input_preact(x, p),
                                             tuple(state0), valid=again.valid, drop=again.drop,
                                             zone=again.zone)
        found = torch.autograd.grad(seqs, [wrt[i] for i in live], gseqs, allow_unused=True,
                                    create_graph=torch.is_grad_enabled())
        for i, g in zip(live, found, strict=True):
            grads[i] = g
    K = len(state0)
    return grads[0], grads[1:1 + K], grads[1 + K:]
