"""Streaming: one time step of a stack of layers of one cell through the compiled step entry.

:func:`plan` is ``fused``'s one-step entry (``step_entry`` of the backend contract, chosen by
:func:`gyre.engine.stream`): from a cell, its parameters (``params[l][0]``, one direction) and the
layer options it builds a :class:`Plan`, or returns None where the entry does not apply (not
float32/float64 on the CPU, a cell or layout it cannot take); the caller then runs the step as a
one-step sequence. A plan runs with no autograd graph (grad disabled, or nothing involved
requiring grad) and draws no random masks (zoneout runs as its expectation).

A plan holds each layer's compiled ``step_<tag>`` with raw pointers to the hoisted parameter
views (``kernel.prog.hoist``) and, where ``cell.input_preact`` is exactly ``linear(x, W, b)``, to
``W`` and ``b`` so the input projection runs in the same call. It reads the parameters' memory
itself, so in-place updates (``optimizer.step()``, ``load_state_dict``) need no rebuild; a
parameter replaced or moved to new storage does, and :meth:`Plan.current` tells (the caller owns
the parameters and rebuilds). Where the step uses a tensor computed from parameters
(``2 * weight``) or a matrix had to be copied into the layout the kernel reads, the plan also
compares the parameters' version counters (bumped by in-place ops; changes made through
``.data`` are invisible to them, as to autograd).

Every call returns new tensors (``(y, state)``); the previous step's tensors are never written.
The scratch of a plan is shared, so one plan must not step from two threads at once (the call
holds the GIL throughout, so this only matters without it).
"""

from __future__ import annotations

from functools import partial
from operator import attrgetter

import torch
from torch import Tensor

from ...cells import Cell, Params, layer_specs
from . import build

__all__ = ["Plan", "plan"]

_ptr = Tensor.data_ptr
_version = attrgetter("_version")
_strided = torch.strided
_FLOATS = (torch.float32, torch.float64)


class Plan:
    """A compiled one-step entry for one stack of layers. ``fast(current, x, state)`` (when not
    None) is the whole step in C++: ``current`` a mapping whose values are, in order, exactly the
    plan's parameters (:attr:`params`), every check made there; it returns ``(y, state)`` or
    None for anything unusual, which :meth:`step` then handles."""

    __slots__ = ("ptrs", "versions", "params", "mod", "cap", "fast", "run_all", "dtype", "I", "L",
                 "K", "sizes", "shapes1", "layers", "cell", "residual", "readout", "keep")

    def __reduce__(self):  # copy.deepcopy / pickle of an owner: rebuilt on its next step
        return (_none, ())

    def current(self, params: tuple[Tensor, ...]) -> bool:
        """Whether ``params`` (flattened as the plan's) are still the tensors the plan reads:
        the same objects, storage and, where the plan holds copies, versions."""
        return (len(params) == len(self.params)
                and all(a is b for a, b in zip(params, self.params, strict=True))
                and tuple(map(_ptr, params)) == self.ptrs
                and (self.versions is None or tuple(map(_version, params)) == self.versions))

    def step(self, x, state):
        """``(y, state)`` for one step of ``x`` ``(B, I)`` or ``(I,)`` from ``state`` (a tensor
        or tuple of ``(L, B, S_k)`` / ``(L, S_k)``, or None for zeros), making ``x`` and
        ``state`` contiguous where needed; None where the plan does not apply (wrong shapes or
        dtypes, an autograd graph needed, the parameters changed): the caller's general path
        then runs it and raises every error."""
        if not self.current(self.params):
            return None
        dtype = self.dtype
        if type(x) is not Tensor or x.dtype is not dtype or not x.is_cpu or \
                x.layout is not _strided:
            return None
        shape = x.shape
        if len(shape) == 2:
            B, I = shape
            if I != self.I or B == 0:
                return None
            unbatched = 0
        elif len(shape) == 1:
            if shape[0] != self.I:
                return None
            B = unbatched = 1
        else:
            return None
        if not x.is_contiguous():
            x = x.contiguous()
        if state is None:
            parts = (None,) * self.K
        else:
            parts = (state,) if type(state) is Tensor else state
            if type(parts) not in (tuple, list) or len(parts) != self.K:
                return None
            shapes = self.shapes1 if unbatched else ((self.L, B, s) for s in self.sizes)
            for s, want in zip(parts, shapes, strict=True):
                if type(s) is not Tensor or s.dtype is not dtype or not s.is_cpu or \
                        s.layout is not _strided or s.shape != want:
                    return None
            if not all(s.is_contiguous() for s in parts):
                parts = [s.contiguous() for s in parts]
        if torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.params)
                or (state is not None and any(s.requires_grad for s in parts))):
            return None
        if self.run_all:
            out = self.mod.run(self.cap, B, unbatched, _ptr(x), *map(_ptr0, parts))
            return out[0], (out[1] if self.K == 1 else out[1:])
        return _step_layers(self, x, parts, B, unbatched)


def _none():
    return None


class _LayerPlan:
    __slots__ = ("fold", "p", "fold_readout")

    def __init__(self, fold, p, fold_readout=False):
        self.fold = fold
        self.p = p
        self.fold_readout = fold_readout


def _dot_layout(m: Tensor, keep: list) -> tuple[int, int]:
    """(pointer, row stride) of ``m`` (K x N) read as N rows of K (``m.t()`` row-major), copying
    only when its layout is not already that."""
    K = m.shape[0]
    if not (m.stride(0) == 1 and (m.stride(1) >= K or m.shape[1] <= 1)):
        m = m.t().contiguous().t()
    keep.append(m)
    return m.data_ptr(), max(m.stride(1), K)


def _linear_ptrs(names, p, keep: list) -> tuple[int, int, int]:
    """(weight pointer, its row stride, bias pointer or 0) of a folded ``linear(x, W, b)`` whose
    parameter names are ``names`` (None: not folded, all 0)."""
    if names is None:
        return 0, 0, 0
    w, ld = _dot_layout(p[names[0]].t(), keep)
    bias = 0
    if names[1] is not None:
        b = p[names[1]].contiguous()
        keep.append(b)
        bias = b.data_ptr()
    return w, ld, bias


def plan(cell: Cell, params: list[list[Params]], input_size: int, hidden_size: int, *,
         residual: bool = False, zoneout: tuple[float, ...] | None = None) -> Plan | None:
    """The compiled one-step entry of a one-direction stack of ``len(params)`` layers of
    ``cell`` (``params[l][0]`` layer ``l``'s parameters) taking ``input_size`` features, with
    ``residual`` connections and ``zoneout`` rates per state component (applied as their
    expectation), or None where it does not apply."""
    from . import _kernel, _plain_linear, _plain_readout, available, unsupported_reason

    if not params or any(len(d) != 1 for d in params):
        return None
    flat = tuple(t for layer in params for t in layer[0].values())
    if not flat:
        return None
    dtype = flat[0].dtype
    if dtype not in _FLOATS or any(p.dtype != dtype or p.device.type != "cpu" or
                                   p.layout != _strided for p in flat):
        return None
    if available() is not None or unsupported_reason(cell) is not None:
        return None
    sizes = tuple(cell.state_sizes(hidden_size))
    out_size = cell.output_size(hidden_size)
    zone = tuple(zoneout) if zoneout is not None else (0.0,) * len(sizes)
    pl = Plan()
    pl.params, pl.ptrs, pl.versions = flat, tuple(map(_ptr, flat)), None
    keep: list = list(flat)
    layers, specs = [], []
    try:
        with torch.no_grad():
            for layer, (p,) in enumerate(params):
                layer_in = input_size if layer == 0 else out_size
                bias = _has_bias(cell, p, layer_in, hidden_size)
                if bias is None:
                    return None
                kernel = _kernel(cell, layer_in, hidden_size, bias)
                vecs, mats = kernel.prog.hoist(p)
                for v in vecs:
                    keep.append(v)
                mat_ptrs, mat_ld = [], []
                for mat in mats:
                    ptr, ld = _dot_layout(mat, keep)
                    mat_ptrs.append(ptr)
                    mat_ld.append(ld)
                lin = _plain_linear(cell, p)
                wih, wih_ld, bih = _linear_ptrs(lin, p, keep)
                rlin = _plain_readout(cell, p, hidden_size)
                rout, rout_ld, rbias = _linear_ptrs(rlin, p, keep)
                rates = tuple(r if r > 0 else -1.0 for r in zone)
                specs.append((kernel.tag, tuple(kernel.units), tuple(v.data_ptr() for v in vecs),
                              tuple(mat_ptrs), tuple(mat_ld), wih, wih_ld, bih, layer_in, rates,
                              rout, rout_ld, rbias))
                layers.append(_LayerPlan(lin is not None, p, rlin is not None))
            if any(t.dtype != dtype for t in keep):
                return None
            # a hoisted tensor computed from parameters (not a view of one), or copied into the
            # layout read here, goes stale on in-place updates: those then rebuild the plan
            storages = {p.untyped_storage().data_ptr() for p in flat}
            copies = any(t.untyped_storage().data_ptr() not in storages for t in keep)
            mod = build.python_module(kernel.module)
            cap = mod.make(int(dtype == torch.float64), int(residual), sizes, out_size,
                           tuple(specs), flat, pl.ptrs, int(copies), tuple(p._cdata for p in flat))
    except Exception:  # unsupported or not buildable here: the general path (it warns once)
        return None
    if copies:
        pl.versions = tuple(map(_version, flat))
    pl.mod, pl.cap, pl.dtype = mod, cap, dtype
    pl.I, pl.L, pl.K = input_size, len(params), len(sizes)
    pl.sizes = sizes
    pl.shapes1 = tuple((pl.L, s) for s in sizes)
    pl.readout = type(cell).readout is not Cell.readout
    pl.run_all = all(lp.fold and (lp.fold_readout or not pl.readout) for lp in layers)
    pl.fast = partial(mod.step, cap) if pl.run_all else None
    pl.layers, pl.cell, pl.residual = layers, cell, residual
    pl.keep = keep
    return pl


def _has_bias(cell: Cell, p: Params, layer_in: int, hidden: int) -> bool | None:
    """Whether ``p`` is the layer built with biases, without, or (None) neither."""
    for bias in (True, False):
        try:
            specs = layer_specs(cell, layer_in, hidden, bias)
        except ValueError:
            return None
        if set(specs) == set(p) and all(tuple(p[n].shape) == s.shape for n, s in specs.items()):
            return bias
    return None


def _ptr0(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _step_layers(plan: Plan, x: Tensor, parts, B: int, unbatched: int):
    """Layer by layer: the input pre-activations (when not a plain linear map) and the read-out
    (when not the identity) by the cell's own code between compiled steps."""
    L, K = plan.L, plan.K
    news = [torch.empty((L, B, s), dtype=plan.dtype) for s in plan.sizes]
    ins = tuple(map(_ptr0, parts))
    outs = tuple(map(_ptr, news))
    cell = plan.cell
    xin = x.view(B, plan.I)
    y = xin
    for layer, lp in enumerate(plan.layers):
        src = xin if lp.fold else cell.input_preact(xin, lp.p).contiguous()
        plan.mod.layer(plan.cap, layer, B, _ptr(src), *ins, *outs)
        h = news[0][layer]
        y = cell.readout(h, lp.p) if plan.readout else h
        if plan.residual and layer > 0:
            y = y + xin
        xin = y if y.is_contiguous() else y.contiguous()
    if y is h:
        y = h.clone()  # the output must not share memory with the returned state
    if unbatched:
        y = y[0]
        news = [s[:, 0] for s in news]
    return y, (news[0] if K == 1 else tuple(news))
