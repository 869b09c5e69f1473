"""What every backend is asked before it runs a layer: ``unsupported(cell, options, device)``
returns why it cannot run that configuration, or None when it can. The choice among the backends
that can is made in one place, :func:`gyre.engine.choose`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """The layer options that decide which backends can run a call, and which is fastest.

    ``grad``: ``"none"`` (forward only), ``"params"`` (parameters' gradients) or ``"input"``
    (the input's too). ``varlen``: per-sequence ``lengths``. ``drop``/``zone``: recurrent-dropout
    masks / zoneout weights present. ``size``: ``(batch, hidden)`` when known.

    ``stream``: one time step with carried state (``step()``, or ``forward`` on a one-step
    input) and no autograd graph, run by a backend's one-step entry where it has one
    (``step_entry``, see :func:`gyre.engine.stream`). ``random``: masks drawn at random on every
    call (training with zoneout, recurrent dropout or dropout between layers), which a one-step
    entry does not draw."""

    residual: bool = False
    drop: bool = False
    zone: bool = False
    return_states: bool = False
    varlen: bool = False
    layers: int = 1
    directions: int = 1
    grad: str = "none"
    size: tuple[int, int] | None = None
    stream: bool = False
    random: bool = False
