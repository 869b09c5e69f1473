"""Streaming: one time step of a whole ``Recurrent`` stack through the compiled step entry.

:func:`step` is what ``Recurrent.step`` tries first. It applies when no autograd graph is
needed (grad disabled, or nothing involved requires grad), on CPU in float32/float64, for a
one-direction stack on the ``auto`` or ``fused`` backend whose cell compiles, and with no random
masks (evaluation mode, or training without inter-layer dropout and zoneout). Anything else
returns None and the caller runs the general path, which also raises every error message.

Per module a *plan* is cached: each layer's compiled ``step_<tag>`` with raw pointers to the
hoisted parameter views (``kernel.prog.hoist``) and, where ``cell.input_preact`` is exactly
``linear(x, W, b)``, to ``W`` and ``b`` so the input projection runs in the same call. The plan
is rebuilt when a parameter's storage changes (reassignment, ``.to()``, ``load_state_dict(...,
assign=True)``: the data pointers are compared every step). In-place updates
(``optimizer.step()``, ``load_state_dict``) need no rebuild: the plan reads the parameters'
memory itself. Where the step uses a tensor computed from parameters (``2 * weight``) or a
matrix had to be copied into the layout the kernel reads, the plan also compares the
parameters' version counters (bumped by in-place ops; changes made through ``.data`` are
invisible to them, as to autograd).

Every call returns new tensors (``(y, state)``); the previous step's tensors are never written.
The scratch of a plan is shared, so one module must not step from two threads at once (the call
holds the GIL throughout, so this only matters without it).
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import Tensor

from ...cells import Cell
from . import build

__all__ = ["compiled", "step"]

_ptr = Tensor.data_ptr
_version = attrgetter("_version")
_strided = torch.strided
_FLOATS = (torch.float32, torch.float64)


class _Plan:
    """A module's streaming plan (``ok`` False: this configuration takes the general path)."""

    __slots__ = ("ok", "ptrs", "versions", "params", "backend", "training_ok", "mod", "cap",
                 "run_all", "dtype", "I", "L", "K", "sizes", "shapes1", "layers", "cell", "residual",
                 "readout", "keep")

    def __init__(self, ptrs, backend):
        self.ok = self.run_all = False
        self.ptrs = ptrs
        self.versions = None
        self.backend = backend

    def __reduce__(self):  # copy.deepcopy / pickle of the module: rebuilt on the next step
        return (_none, ())


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


def _build(m) -> _Plan:
    from . import _kernel, _plain_linear, _plain_readout, available, unsupported_reason

    params = tuple(m._parameters.values())
    plan = _Plan(tuple(map(_ptr, params)), m.backend)
    if m.bidirectional or m.backend not in ("auto", "fused") or not params:
        return plan
    dtype = params[0].dtype
    if dtype not in _FLOATS or any(p.dtype != dtype or p.device.type != "cpu" or
                                   p.layout != _strided for p in params):
        return plan
    cell = m.cell
    if available() is not None or unsupported_reason(cell) is not None:
        return plan
    keep: list = list(params)
    layers, specs = [], []
    try:
        with torch.no_grad():
            for layer, names in enumerate(m._names):
                # registered parameters only: a parametrized or hooked weight is recomputed
                # from others, which the plan would not see change
                p = {n: m._parameters.get(a) for n, a in names[0].items()}
                if any(v is None for v in p.values()):
                    return plan
                layer_in = m.input_size if layer == 0 else m.output_size
                kernel = _kernel(cell, layer_in, m.hidden_size, m.bias)
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
                rlin = _plain_readout(cell, p, m.hidden_size)
                rout, rout_ld, rbias = _linear_ptrs(rlin, p, keep)
                zone = tuple(r if r > 0 else -1.0 for r in m.zoneout)
                specs.append((kernel.tag, tuple(kernel.units), tuple(v.data_ptr() for v in vecs),
                              tuple(mat_ptrs), tuple(mat_ld), wih, wih_ld, bih, layer_in, zone,
                              rout, rout_ld, rbias))
                layers.append(_LayerPlan(lin is not None, p, rlin is not None))
            if any(t.dtype != dtype for t in keep):
                return plan
            # a hoisted tensor computed from parameters (not a view of one), or copied into the
            # layout read here, goes stale on in-place updates: those then rebuild the plan
            storages = {p.untyped_storage().data_ptr() for p in params}
            copies = any(t.untyped_storage().data_ptr() not in storages for t in keep)
            mod = build.python_module(kernel.module)
            cap = mod.make(int(dtype == torch.float64), int(m.residual), tuple(m.state_sizes),
                           m.output_size, tuple(specs), params, plan.ptrs, int(copies),
                           tuple(p._cdata for p in params))
    except Exception:  # unsupported or not buildable here: the general path (it warns once)
        return plan
    plan.ok = True
    plan.params = params
    if copies:
        plan.versions = tuple(map(_version, params))
    plan.training_ok = not (any(m.zoneout) or (m.dropout > 0 and m.num_layers > 1) or
                            m.recurrent_dropout > 0)
    plan.mod, plan.cap, plan.dtype = mod, cap, dtype
    plan.I, plan.L, plan.K = m.input_size, m.num_layers, len(m.state_sizes)
    plan.sizes = tuple(m.state_sizes)
    plan.shapes1 = tuple((plan.L, s) for s in plan.sizes)
    plan.readout = type(cell).readout is not Cell.readout
    plan.run_all = all(lp.fold and (lp.fold_readout or not plan.readout) for lp in layers)
    plan.layers, plan.cell, plan.residual = layers, cell, m.residual
    plan.keep = keep
    return plan


def compiled(m) -> bool:
    """Whether ``m.step`` runs the compiled step (as of its latest call)."""
    plan = m.__dict__.get("_gyre_stream")
    return plan is not None and plan.ok


def step(m, x, state):
    """``m.step(x, state)`` by the compiled step entry, or None where it does not apply."""
    plan = m.__dict__.get("_gyre_stream")
    if plan is not None and plan.run_all and m.backend == plan.backend and \
            (plan.training_ok or not m.training):
        # everything checked in C++ (parameters unchanged, grad, dtypes, shapes); None: unusual
        out = plan.mod.step(plan.cap, m._parameters, x, state)
        if out is not None:
            return out
    return _step_checked(m, plan, x, state)


def _step_checked(m, plan, x, state):
    """The same with every check in Python, making ``x`` and ``state`` contiguous if needed."""
    if (plan is None or tuple(map(_ptr, m._parameters.values())) != plan.ptrs
            or m.backend != plan.backend
            or (plan.versions is not None and tuple(map(_version, plan.params)) != plan.versions)):
        plan = m.__dict__["_gyre_stream"] = _build(m)
    if not plan.ok or (m.training and not plan.training_ok):
        return None
    dtype = plan.dtype
    if type(x) is not Tensor or x.dtype is not dtype or not x.is_cpu or x.layout is not _strided:
        return None
    shape = x.shape
    if len(shape) == 2:
        B, I = shape
        if I != plan.I or B == 0:
            return None
        unbatched = 0
    elif len(shape) == 1:
        if shape[0] != plan.I:
            return None
        B = unbatched = 1
    else:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    if state is None:
        parts = (None,) * plan.K
    else:
        parts = (state,) if type(state) is Tensor else state
        if type(parts) not in (tuple, list) or len(parts) != plan.K:
            return None
        shapes = plan.shapes1 if unbatched else ((plan.L, B, s) for s in plan.sizes)
        for s, want in zip(parts, shapes, strict=True):
            if type(s) is not Tensor or s.dtype is not dtype or not s.is_cpu or \
                    s.layout is not _strided or s.shape != want:
                return None
        if not all(s.is_contiguous() for s in parts):
            parts = [s.contiguous() for s in parts]
    if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in plan.params)
            or (state is not None and any(s.requires_grad for s in parts))):
        return None
    if plan.run_all:
        out = plan.mod.run(plan.cap, B, unbatched, _ptr(x), *map(_ptr0, parts))
        return out[0], (out[1] if plan.K == 1 else out[1:])
    return _step_layers(plan, x, parts, B, unbatched)


def _ptr0(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _step_layers(plan: _Plan, x: Tensor, parts, B: int, unbatched: int):
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
