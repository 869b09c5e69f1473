"""The ``scan`` backend: cells linear in their state, solved for all steps at once.

A cell that defines ``linear_form(xp, p) -> (a, b)`` (minGRU and minLSTM, Feng et al. 2024)
promises that its step is ``h_t = a_t * h_{t-1} + b_t`` with ``a_t, b_t`` computed from the
input pre-activations alone. Then a whole layer is

1. one GEMM for the input pre-activations of every step (as every backend);
2. ``a, b`` for every step at once from the cell's own :meth:`linear_form` (the cell's math,
   written once, also defines its ``step``);
3. the first-order linear recurrence solved by :func:`linear_recurrence`, an autograd function
   whose backward is the reverse recurrence ``g_t = dL/dh_t + a_{t+1} g_{t+1}`` and then
   ``dL/db_t = g_t``, ``dL/da_t = g_t h_{t-1}``, ``dL/dh_0 = a_1 g_1`` (no graph per step).

Options fold into the coefficients, so the recurrence stays linear:

* zoneout with weight ``m`` (mask or rate): ``m h + (1-m)(a h + b)`` is ``a' = m + (1-m) a``,
  ``b' = (1-m) b``;
* variable lengths: past a sequence's end ``a = 1, b = 0`` (state carried), output zeroed;
* recurrent dropout: these cells have no recurrent matrix for it to act on (their ``step``
  ignores the mask too).

Solvers for the recurrence. Both form the same products and sums as the sequential loop: no
logarithms and no division, so nothing overflows where gates are tiny (products underflow to 0,
which is their limit). The log-space formulation of Heinsen 2023 / Feng et al. 2024 (appendix
B) loses about ``eps * |sum log a|`` relative accuracy (3-7e-5 in fp32 at T=100-200 with gates
in (0.05, 0.95), measured here: above the 1e-5 the backends must meet), and ``logcumsumexp``
was 10-100x slower on this CPU than either solver below.

* ``"parallel"``: a parallel associative scan over time, the odd-even (Blelloch-style)
  recursive doubling on the operator ``(a1, b1) o (a2, b2) = (a2 a1, a2 b1 + b2)``:
  ``O(log T)`` depth, ``O(T)`` work, about ten tensor ops per level.
* ``"sequential"``: ``T`` fused multiply-adds ``h_t = b_t + a_t * h_{t-1}`` written in place
  under ``no_grad``: one small kernel call per step, one pass over memory in all.

``"auto"`` takes ``"parallel"`` on accelerators (the time axis is the parallelism left there)
and on CPU when a step holds fewer than :data:`PARALLEL_BELOW` numbers (``B*H``), where the
sequential solver is bound by its ``T`` calls; else ``"sequential"``: once ``B*H`` fills the
cores, each level of the parallel scan is one more pass over memory. Measured on the 2-core
CPU (ms, sequential / parallel): T,B,H = 1000,1,128: 4.9 / 0.7; 200,16,64: 1.3 / 1.0;
100,32,128: 0.6 / 0.8; 100,64,256: 1.5 / 4.2; 50,128,512: 2.2 / 10.1 (1 thread; with 2 the
gap at large B*H grows to 8-17x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells import Cell, Params, State
from . import reference

SOLVERS = ("auto", "parallel", "sequential")
#: on CPU, ``"auto"`` solves with the parallel scan when one step holds fewer numbers than this
PARALLEL_BELOW = 2048


def unsupported_reason(cell: Cell) -> str | None:
    """Why ``scan`` cannot run ``cell``, or None when it can. Every layer option (lengths,
    bidirectional, stacking, residual, dropout, zoneout, per-step states) is supported."""
    if not callable(getattr(cell, "linear_form", None)):
        return f"{cell.describe()} is not linear in its state (it defines no linear_form)"
    if len(cell.state_names) != 1:
        return f"{cell.describe()} has {len(cell.state_names)} state components, scan needs one"
    return None


def unsupported(cell: Cell, options, device: str) -> str | None:
    """The backend contract (:mod:`gyre.engine.contract`): every option and device is supported;
    only the cell decides."""
    return unsupported_reason(cell)


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
    """Same contract as :func:`gyre.engine.reference.run_layer`, for a cell with
    ``linear_form``. ``drop`` is accepted and has no effect (no recurrent matrix)."""
    reason = unsupported_reason(cell)
    if reason is not None:
        raise ValueError(f"cell: the scan backend cannot run it ({reason})")
    xp = cell.input_preact(x, p)  # (T, B, G*H): one GEMM for all steps
    a, b = cell.linear_form(xp, p)  # (T, B, H) each
    (h0,) = state
    m = None if zone is None else zone[0]
    if m is not None:  # zoneout: m * h + (1 - m) * (a h + b)
        a = m + (1 - m) * a
        b = (1 - m) * b
    if valid is not None:  # past a sequence's end: h_t = h_{t-1}
        v = valid.unsqueeze(-1)
        a = torch.where(v, a, torch.ones((), dtype=a.dtype, device=a.device))
        b = torch.where(v, b, torch.zeros((), dtype=b.dtype, device=b.device))
    a, b = torch.broadcast_tensors(a, b)
    h = linear_recurrence(a, b, h0)  # (T, B, H): every step's state
    out, states = reference.zero_padding(cell.readout(h, p), (h,), valid)
    return out, (h[-1],), (states if return_states else None)


def linear_recurrence(a: Tensor, b: Tensor, h0: Tensor, solver: str = "auto") -> Tensor:
    """Every ``h_t = a_t * h_{t-1} + b_t`` for ``t = 0..T-1`` from ``h_{-1} = h0``.

    ``a``, ``b`` ``(T, *S)``, ``h0`` ``S``; returns ``(T, *S)``. Differentiable in all three
    (to any order: the backward is again a linear recurrence). ``solver`` is one of
    :data:`SOLVERS`; ``"auto"`` is described in the module docstring.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: got {solver!r}, expected one of {', '.join(SOLVERS)}")
    if a.dim() < 1 or a.shape != b.shape or a.shape[1:] != h0.shape:
        raise ValueError(f"a, b, h0: got shapes {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(h0.shape)}, expected (T, *S), (T, *S), S")
    if solver == "auto":
        small = b[0].numel() < PARALLEL_BELOW if b.shape[0] else False
        solver = "parallel" if a.device.type != "cpu" or small else "sequential"
    return _LinearRecurrence.apply(a, b, h0, solver)


class _LinearRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, solver):
        h = _solve(a, b, h0, solver)
        ctx.save_for_backward(a, h0, h)
        ctx.solver = solver
        return h

    @staticmethod
    def backward(ctx, gh):
        a, h0, h = ctx.saved_tensors
        # g_t = gh_t + a_{t+1} g_{t+1}, g_{T-1} = gh_{T-1}: the same recurrence backwards in time
        # with coefficients shifted by one (the last one meets g_T = 0, so its value is moot).
        coef = torch.cat([a[1:], torch.zeros_like(a[:1])])
        if torch.is_grad_enabled():  # create_graph: stay differentiable for higher orders
            g = linear_recurrence(coef.flip(0), gh.flip(0), torch.zeros_like(h0),
                                  ctx.solver).flip(0)
        else:
            # batched output gradients (is_grads_batched: a vmap over this backward) take the
            # parallel solver: the sequential one writes in place (out=), which vmap cannot batch
            batched = torch._C._functorch.is_legacy_batchedtensor(gh) or \
                torch._C._functorch.maybe_current_level() is not None
            g = _solve(coef, gh.contiguous(), torch.zeros_like(h0),
                       "parallel" if batched else ctx.solver, reverse=True)
        h_prev = torch.cat([h0.unsqueeze(0), h[:-1]])
        grad_a = g * h_prev if ctx.needs_input_grad[0] else None
        grad_h0 = a[0] * g[0] if ctx.needs_input_grad[2] else None
        return grad_a, g, grad_h0, None


@torch.no_grad()
def _solve(a: Tensor, b: Tensor, h0: Tensor, solver: str, reverse: bool = False) -> Tensor:
    """The recurrence without autograd. ``reverse``: run from ``t = T-1`` down to 0 (then
    ``h0`` is ``h_T``)."""
    if solver == "sequential":
        h = torch.empty_like(b)
        prev = h0
        for t in (range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0])):
            torch.addcmul(b[t], a[t], prev, out=h[t])
            prev = h[t]
        return h
    if reverse:
        return _solve(a.flip(0), b.flip(0), h0, solver).flip(0)
    # fold h0 into the first step: then the scan of (a, b) from h_{-1} = 0 is the answer
    b = torch.cat([torch.addcmul(b[:1], a[:1], h0.unsqueeze(0)), b[1:]])
    return _odd_even_scan(a, b)


def _odd_even_scan(a: Tensor, b: Tensor) -> Tensor:
    """Inclusive scan of ``h_t = a_t h_{t-1} + b_t`` from ``h_{-1} = 0``: combine neighbouring
    pairs, scan the half-length sequence recursively (the odd steps' states), then fill in the
    even steps from their left neighbour. Depth ``O(log T)``, work ``O(T)``."""
    T = b.shape[0]
    if T <= 1:
        return b
    if T % 2:  # pad with the identity step (a = 1, b = 0)
        a = torch.cat([a, torch.ones_like(a[:1])])
        b = torch.cat([b, torch.zeros_like(b[:1])])
    a0, a1, b0, b1 = a[0::2], a[1::2], b[0::2], b[1::2]
    odd = _odd_even_scan(a1 * a0, torch.addcmul(b1, a1, b0))  # h_1, h_3, ...
    # h_0, h_2, ...: h_{2k} = a_{2k} h_{2k-1} + b_{2k} (no out=: batchable under vmap)
    even = torch.cat([b0[:1], torch.addcmul(b0[1:], a0[1:], odd[:-1])])
    return torch.stack([even, odd], dim=1).reshape(b.shape)[:T]


__all__ = ["SOLVERS", "linear_recurrence", "run_layer", "unsupported", "unsupported_reason"]
