"""State and gate maps, read from each cell's own formula.

A cell's ``step`` / ``pointwise`` names its intermediates as local variables (an LSTM's ``i``,
``f``, ``g``, ``o``, a GRU's ``r``, ``z``, ``n``, a user cell's own names). :func:`record` runs every
:class:`gyre.nn.Recurrent` of a model on the reference backend (the plain loop over the cell's
``step``) under a profile hook that, when a cell's ``step`` returns, keeps the tensors its frame
(and that of the ``pointwise`` it called) holds by name. Nothing of any cell's math is written
here, so a new cell gets its maps without code of its own.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from ..cells import Cell
from ..nn import Recurrent

_METHODS = ("step", "pointwise")


class _Tap:
    """A profile hook collecting one record per outermost ``step`` call of ``cell``."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.records: list[dict[str, Tensor]] = []
        self._depth = 0
        self._pending: dict[str, Tensor] = {}

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if code.co_name not in _METHODS or frame.f_locals.get("self") is not self.cell:
            return
        if event == "call" and code.co_name == "step":
            self._depth += 1
        elif event == "return":
            inputs = {id(v) for k, v in frame.f_locals.items()
                      if k in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]}
            for k in ("state", "p"):
                v = frame.f_locals.get(k)
                if isinstance(v, tuple | list):
                    inputs |= {id(t) for t in v}
                elif isinstance(v, dict):
                    inputs |= {id(t) for t in v.values()}
            named = {k: v.detach() for k, v in frame.f_locals.items()
                     if isinstance(v, Tensor) and v.dim() == 2 and id(v) not in inputs
                     and not k.startswith("_")}
            for k, v in named.items():
                self._pending.setdefault(k, v)
            if code.co_name == "step":
                self._depth -= 1
                if self._depth == 0:
                    if isinstance(arg, tuple):  # the new state, by the cell's state names
                        for name, v in zip(self.cell.state_names, arg, strict=False):
                            self._pending[name] = v.detach()
                    self.records.append(self._pending)
                    self._pending = {}


@contextmanager
def _profiled(tap: _Tap):
    previous = sys.getprofile()
    sys.setprofile(tap)
    try:
        yield
    finally:
        sys.setprofile(previous)


def _inputs_of(model: nn.Module, run) -> dict[str, tuple]:
    """The arguments of the first forward call of every Recurrent in ``model`` during ``run()``."""
    seen: dict[str, tuple] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, Recurrent):
            def hook(mod, args, kwargs, name=name):
                seen.setdefault(name, (args, dict(kwargs)))
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def record(model: nn.Module, run) -> dict[str, np.ndarray]:
    """Per-step states and named intermediates of every recurrent layer of ``model``.

    ``run()`` calls the model (e.g. ``lambda: model(x, lengths=lengths)``). Each
    :class:`~gyre.nn.Recurrent` inside is then run again on the inputs it received, on the
    reference backend, and every cell step recorded. Returns ``{"MODULE.lL[_reverse].NAME":
    (B, T, k) array}``, batch-first, in the input's time order (a reverse direction's steps put
    back in place), zero at padded steps; ``NAME`` is a state component (``h``, ``c``) or a local
    variable of the cell's step (``i``, ``f``, ``o``... for an LSTM; ``r``, ``z``, ``n`` for a GRU).
    """
    was = model.training
    model.eval()
    try:
        calls = _inputs_of(model, run)
        out: dict[str, np.ndarray] = {}
        for name, (args, kwargs) in calls.items():
            rnn = model.get_submodule(name)
            out.update(_record_layer(rnn, name or "rnn", args, kwargs))
        return out
    finally:
        model.train(was)


def _record_layer(rnn: Recurrent, name: str, args, kwargs) -> dict[str, np.ndarray]:
    x = args[0]
    if not isinstance(x, Tensor):
        raise TypeError(f"states: {name} was called with {type(x).__name__}; state maps need a "
                        "padded tensor input")
    T, B = (x.shape[1], x.shape[0]) if rnn.batch_first else (x.shape[0], x.shape[1])
    lengths = kwargs.get("lengths")
    lens = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths).cpu()
    tap = _Tap(rnn.cell)
    backend = rnn.backend
    rnn.backend = "reference"
    try:
        with _profiled(tap):
            rnn(*args, **kwargs)
    finally:
        rnn.backend = backend
    dirs = 2 if rnn.bidirectional else 1
    groups = rnn.num_layers * dirs
    if len(tap.records) != groups * T:
        raise RuntimeError(f"states: recorded {len(tap.records)} steps of {name}, expected "
                           f"{groups * T} ({rnn.num_layers} layers x {dirs} directions x {T} steps)")
    valid = torch.arange(T)[:, None] < lens[None, :]  # (T, B)
    out = {}
    for g in range(groups):
        layer, d = divmod(g, dirs)
        recs = tap.records[g * T:(g + 1) * T]
        keys = [k for k in recs[0] if all(k in r and r[k].shape[0] == B for r in recs)]
        for k in keys:
            m = torch.stack([r[k].float() for r in recs])  # (T, B, k), in the order run
            if d == 1:  # run over each sequence reversed within its length: put back
                t = torch.arange(T)[:, None]
                src = torch.where(valid, lens[None, :] - 1 - t, t)
                m = m.gather(0, src[..., None].expand_as(m))
            m = m * valid[..., None]
            out[f"{name}.l{layer}{'_reverse' if d else ''}.{k}"] = m.transpose(0, 1).numpy()
    return out


__all__ = ["record"]
