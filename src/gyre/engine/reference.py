"""The ``reference`` backend: autograd over a Python loop through time.

The ground truth every other backend is tested against. It still follows the vectorized
schedule's first step: the input pre-activations of all steps come from one matrix product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells import Cell, Params, State


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
    """Run ``cell`` over ``x`` ``(T, B, I)`` (time-major, one direction) from ``state``.

    ``valid`` ``(T, B)`` bool: where False the state is carried unchanged and the output is 0.
    ``drop`` ``(B, S_0)``: recurrent-dropout mask. ``zone``: per state component, the weight of
    the old state in ``new = m * old + (1 - m) * new`` (zoneout), shaped ``(T, B, S_k)`` (a mask
    per step, training) or ``()`` (the expectation, evaluation), or None.

    Returns the per-step outputs ``(T, B, O)``, the final state, and, when asked, the per-step
    states (one ``(T, B, S_k)`` tensor per component).
    """
    xp = cell.input_preact(x, p)  # (T, B, G*H): one GEMM for all steps
    states = state_sequences(cell, p, xp, state, valid=valid, drop=drop, zone=zone)
    final = tuple(s[-1] for s in states)
    out, states = zero_padding(cell.readout(states[0], p), states, valid)
    return out, final, (states if return_states else None)


def state_sequences(
    cell: Cell,
    p: Params,
    xp: Tensor,
    state: State,
    *,
    valid: Tensor | None = None,
    drop: Tensor | None = None,
    zone: tuple[Tensor | None, ...] | None = None,
) -> tuple[Tensor, ...]:
    """Every step's state, one ``(T, B, S_k)`` tensor per component, from the input
    pre-activations ``xp`` ``(T, B, G*H)``: the loop of :func:`run_layer` in differentiable torch
    ops (the fused backend recomputes through it where a derivative of its backward is needed).
    Past a sequence's end the state is carried (the last valid step's, at ``T - 1`` too)."""
    # unbind once: indexing a big tensor per step under autograd costs O(T^2) in backward
    xs = xp.unbind(0)
    vs = valid.unsqueeze(-1).unbind(0) if valid is not None else None
    zs = _per_step(zone, len(xs))
    trace: list[State] = []
    for t, xt in enumerate(xs):
        new = cell.step(xt, state, p, drop)
        if zs is not None:
            new = tuple(n if m is None else m[t] * o + (1 - m[t]) * n
                        for n, o, m in zip(new, state, zs, strict=True))
        if vs is not None:
            new = tuple(torch.where(vs[t], n, o) for n, o in zip(new, state, strict=True))
        state = new
        trace.append(state)
    return tuple(torch.stack(s) for s in zip(*trace, strict=True))


def zero_padding(out: Tensor, states: tuple[Tensor, ...], valid: Tensor | None):
    """``out`` and the per-step ``states`` with the steps past each sequence's end
    (``valid`` False) set to 0, as every backend returns them."""
    if valid is None:
        return out, states
    mask = valid.unsqueeze(-1)
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    return torch.where(mask, out, zero), tuple(torch.where(mask, s, zero) for s in states)


def _per_step(zone, steps):
    """Per component, a sequence indexable by t (a (T,...) tensor or a repeated scalar)."""
    if zone is None or all(m is None for m in zone):
        return None
    return tuple(None if m is None else (m if m.dim() == 3 else [m] * steps) for m in zone)


def unsupported(cell: Cell, options, device: str) -> str | None:
    """The backend contract (:mod:`gyre.engine.contract`): the reference loop runs every cell
    with every option on every device."""
    return None
