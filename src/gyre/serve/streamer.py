"""``Streamer``: many concurrent streams through one model, their pending steps batched.

Each stream owns a slot in preallocated state tensors (bounded: ``max_streams``); one batched
call gathers the slots of the streams that have a step to run, runs the layers' ``step()`` once
for all of them, and scatters the new states back. A stream's output at each step is the
model's head on the state so far (see :class:`Streamer`).
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import Recurrent


class StreamError(ValueError):
    """A request the streamer cannot take; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _unsupported(model) -> str | None:
    rnn = model if isinstance(model, Recurrent) else getattr(model, "rnn", None)
    if not isinstance(rnn, Recurrent):
        return (f"model: got {type(model).__name__}, expected a gyre.nn.Recurrent or a task model "
                "with a gyre.nn.Recurrent .rnn and an export_head(out, x, lengths) method")
    if rnn.bidirectional:
        return ("the model is bidirectional: its reverse direction reads a sequence from its end, "
                "which a stream does not have yet; serve a run trained with bidirectional=False")
    if rnn is not model and not callable(getattr(model, "export_head", None)):
        return f"model: {type(model).__name__} has no export_head(out, x, lengths) to serve"
    refusal = getattr(model, "stream_unsupported", lambda: None)()
    return refusal or None


class _Stream:
    __slots__ = ("id", "slot", "last", "steps", "hist_out", "hist_x")

    def __init__(self, sid: str, slot: int, window: int | None, max_steps: int):
        self.id = sid
        self.slot = slot
        self.last = time.monotonic()
        self.steps = 0
        n = max_steps if window is None else window
        self.hist_out: collections.deque = collections.deque(maxlen=n)
        self.hist_x: collections.deque = collections.deque(maxlen=n)


class Streamer:
    """Streams of one model stepped in batches.

    ``model``: a :class:`gyre.nn.Recurrent` (a stream's output is the layer's per-step output)
    or a task model with the export hook (``rnn``, ``export_head``; see :mod:`gyre.export.onnx`),
    whose output at step ``t`` is ``export_head`` over the outputs so far, exactly what the model
    gives for the sequence cut after step ``t``; a model with ``stream_window = w`` keeps only
    the last ``w`` steps for it. ``output``: applied to each output (e.g. softmax), ``input``:
    to each step's features before the model (e.g. the run's scaler); both on ``(B, ...)``.

    ``max_streams`` bounds the open streams (their state is preallocated), ``max_steps`` the
    steps of a stream whose head reads every step so far (mean/max pooling). ``idle_timeout``
    seconds without a step closes a stream at the next :meth:`evict_idle`.

    Python use::

        s = Streamer(model)
        a, b = s.open(), s.open()
        ys = s.step({a: x_a, b: x_b})  # x_*: (n, F) rows, one per step; one batched call per step
    """

    def __init__(self, model: nn.Module, *, max_streams: int = 4096, max_batch: int = 1024,
                 max_steps: int = 100_000, idle_timeout: float = 300.0,
                 input: Callable[[Tensor], Tensor] | None = None,
                 output: Callable[[Tensor], Tensor] | None = None) -> None:
        refusal = _unsupported(model)
        if refusal:
            raise ValueError(f"serve: {refusal}")
        for name, v in (("max_streams", max_streams), ("max_batch", max_batch),
                        ("max_steps", max_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: got {v!r}, expected an int >= 1")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout: got {idle_timeout!r}, expected seconds > 0")
        self.model = model.eval()
        self.rnn: Recurrent = model if isinstance(model, Recurrent) else model.rnn
        self.head = None if model is self.rnn else model.export_head
        self.window = 1 if self.head is None else getattr(model, "stream_window", None)
        # a model of token ids (export_tokens): a step is one id, embedded by its export_pre
        self.tokens = self.head is not None and bool(getattr(model, "export_tokens", False))
        self.vocab = model.embedding.weight.shape[0] if self.tokens else None
        self.input_size = 1 if self.tokens else self.rnn.input_size
        self.max_streams, self.max_batch, self.max_steps = max_streams, max_batch, max_steps
        self.idle_timeout = float(idle_timeout)
        self.transform_in, self.transform_out = input, output
        p = next(self.rnn.parameters())
        self.dtype = p.dtype
        self.np_dtype = torch.empty(0, dtype=p.dtype).numpy().dtype
        L = self.rnn.num_layers
        # slot-major state: one row per stream slot, per component (L, max_streams, S)
        self.states = [torch.zeros(L, max_streams, s, dtype=p.dtype)
                       for s in self.rnn.state_sizes]
        self.free = list(range(max_streams - 1, -1, -1))
        self.streams: dict[str, _Stream] = {}
        self.lock = threading.Lock()
        self.batch_sizes: collections.Counter = collections.Counter()

    # -- streams ------------------------------------------------------------------------------
    def open(self) -> str:
        """A new stream's id (its state zeros)."""
        with self.lock:
            if not self.free:
                raise StreamError(f"streams: all {self.max_streams} stream slots are in use; close "
                                  "streams (DELETE) or wait for idle ones to be evicted", 503)
            slot = self.free.pop()
            for s in self.states:
                s[:, slot] = 0
            sid = secrets.token_hex(8)
            self.streams[sid] = _Stream(sid, slot, self.window, self.max_steps)
            return sid

    def close(self, sid: str) -> None:
        with self.lock:
            st = self.streams.pop(self._known(sid).id)
            self.free.append(st.slot)

    def _known(self, sid) -> _Stream:
        st = self.streams.get(sid) if isinstance(sid, str) else None
        if st is None:
            raise StreamError(f"stream: no open stream with id {sid!r} (closed, evicted after "
                              f"{self.idle_timeout:g} s idle, or never opened)", 404)
        return st

    def evict_idle(self, now: float | None = None, busy=()) -> list[str]:
        """Close every stream idle for longer than ``idle_timeout`` (its last step or checked
        request), except those in ``busy`` (steps still queued for them); returns their ids."""
        now = time.monotonic() if now is None else now
        with self.lock:
            old = [sid for sid, st in self.streams.items()
                   if now - st.last > self.idle_timeout and sid not in busy]
            for sid in old:
                self.free.append(self.streams.pop(sid).slot)
        return old

    @property
    def active(self) -> int:
        return len(self.streams)

    def check_steps(self, sid: str, x) -> Tensor:
        """``x`` as a ``(n, input_size)`` tensor, or a :class:`StreamError` naming the problem."""
        return torch.from_numpy(self.check_rows(sid, x))

    def check_rows(self, sid: str, x) -> np.ndarray:
        """As :meth:`check_steps`, the rows as a contiguous numpy array (the server joins a
        round's rows in numpy and makes one tensor of them).

        Lists go through numpy (a few microseconds per request, against tens through
        ``torch.tensor``: this runs once per HTTP request)."""
        st = self._known(sid)
        if isinstance(x, Tensor):
            t = x.detach().to(self.dtype).numpy(force=True)
        else:
            try:
                t = np.asarray(x, dtype=self.np_dtype)
            except (TypeError, ValueError, OverflowError):
                raise StreamError("x: expected a list of steps, each a list of numbers "
                                  "([[f1, f2, ...], ...])") from None
        if t.ndim == 1 and t.size == self.input_size:
            t = t[None]
        if t.ndim != 2 or t.shape[0] == 0:
            raise StreamError(f"x: got shape {list(t.shape)}, expected [steps >= 1, "
                              f"{self.input_size}] (one row of features per step)")
        if t.shape[1] != self.input_size:
            raise StreamError(f"x: got {t.shape[1]} features per step, expected "
                              f"{self.input_size}", 422)
        if not np.isfinite(t).all():
            raise StreamError("x: got a value that is not a finite number", 422)
        if self.tokens and ((t != np.floor(t)).any() or t.min() < 0 or t.max() >= self.vocab):
            raise StreamError(f"x: expected token ids, integers from 0 to {self.vocab - 1} (one "
                              "per step: [[id], ...])", 422)
        st.last = time.monotonic()  # a request is activity, even before its steps run
        if self.window is None and st.steps + t.shape[0] > self.max_steps:
            raise StreamError(f"x: the stream would exceed max_steps={self.max_steps} steps "
                              "(the head pools every step so far); open a new stream", 413)
        return np.ascontiguousarray(t)

    def _one_step_rows_ok(self, x: Tensor) -> bool:
        if not bool(torch.isfinite(x).all()):
            return False
        return not self.tokens or bool((x == x.floor()).all() and x.min() >= 0
                                       and x.max() < self.vocab)

    def _one_step_each(self, steps: Mapping) -> Tensor | None:
        """``steps``' values as one checked ``(B, input_size)`` tensor when each is a tensor
        of one step (``(F,)`` or ``(1, F)``) of open streams, all valid; None otherwise (then
        :meth:`check_steps` checks each and names what is wrong)."""
        F = self.input_size
        vals = list(steps.values())
        if not vals or not all(isinstance(v, Tensor) and (v.shape == (F,) or v.shape == (1, F))
                               for v in vals):
            return None
        x = torch.stack([v.detach().reshape(F) for v in vals]).to(self.dtype)
        if not self._one_step_rows_ok(x):
            return None
        sts = [self.streams.get(sid) if isinstance(sid, str) else None for sid in steps]
        if any(st is None or (self.window is None and st.steps + 1 > self.max_steps)
               for st in sts):
            return None
        now = time.monotonic()
        for st in sts:
            st.last = now
        return x

    # -- stepping -----------------------------------------------------------------------------
    @torch.no_grad()
    def step_rows(self, sids: list[str], x: Tensor) -> Tensor:
        """One step of each stream in ``sids`` (distinct) in one batched call: ``x`` ``(B,
        input_size)``, row ``b`` for ``sids[b]``. Returns the outputs ``(B, ...)``, in order."""
        with self.lock:
            streams = self.streams
            sts = []
            for sid in sids:
                st = streams.get(sid)
                if st is None:
                    self._known(sid)  # raises the unknown-stream error
                sts.append(st)
            idx = torch.tensor([st.slot for st in sts])
            if len(set(idx.tolist())) != len(sts):
                raise StreamError("step: a stream appears twice in one batch")
            x_in = x if self.transform_in is None else self.transform_in(x)
            if self.tokens:
                x_in = self.model.export_pre(x_in.long().view(-1, 1), None)[0][:, 0]
            state = tuple(s.index_select(1, idx) for s in self.states)
            y, new = self.rnn.step(x_in, state[0] if len(state) == 1 else state)
            new = (new,) if isinstance(new, Tensor) else new
            for s, n in zip(self.states, new, strict=True):
                s.index_copy_(1, idx, n)
            now = time.monotonic()
            for st in sts:
                st.last = now
                st.steps += 1
            # a token model's head reads the ids (B, T), as its forward does; others the inputs
            out = y if self.head is None else self._head(
                sts, y, x.long().view(-1, 1) if self.tokens else x_in)
            if self.transform_out is not None:
                out = self.transform_out(out)
            self.batch_sizes[len(sts)] += 1
            return out

    def _head(self, sts: list[_Stream], y: Tensor, x: Tensor) -> Tensor:
        if self.window == 1:
            n = torch.ones(len(sts), dtype=torch.int64)
            return self.head(y[:, None], x[:, None, 0] if self.tokens else x[:, None], n)
        for st, yi, xi in zip(sts, y, x, strict=True):
            st.hist_out.append(yi)
            st.hist_x.append(xi)
        n = torch.tensor([len(st.hist_out) for st in sts])
        T = int(n.max())
        outs = y.new_zeros(len(sts), T, y.shape[1])
        xs = x.new_zeros(len(sts), T, x.shape[1])
        for b, st in enumerate(sts):
            k = len(st.hist_out)
            outs[b, :k] = torch.stack(tuple(st.hist_out))
            xs[b, :k] = torch.stack(tuple(st.hist_x))
        return self.head(outs, xs[..., 0] if self.tokens else xs, n)

    def run(self, sids: list[str], xs: list[Tensor]) -> list[Tensor]:
        """The next steps of each stream in ``sids`` (distinct): ``xs[b]`` ``(n_b, input_size)``
        for ``sids[b]``, checked (:meth:`check_steps`). Step ``t`` of every stream that has one
        runs in one batched call, so ``max(n_b)`` calls in all. Returns each stream's outputs
        ``(n_b, ...)``, in order."""
        if all(x.shape[0] == 1 for x in xs):  # the common case: one step each, one call
            ys = self.step_rows(sids, torch.cat(xs) if len(xs) > 1 else xs[0])
            return list(ys.split(1))
        outs: list[list[Tensor]] = [[] for _ in sids]
        for t in range(max(x.shape[0] for x in xs)):
            ready = [b for b, x in enumerate(xs) if t < x.shape[0]]
            ys = self.step_rows([sids[b] for b in ready], torch.stack([xs[b][t] for b in ready]))
            for b, y in zip(ready, ys.unbind(0), strict=True):
                outs[b].append(y)
        return [torch.stack(o) for o in outs]

    def step(self, steps: Mapping[str, Tensor | list]) -> dict[str, Tensor]:
        """Run every stream's steps (``{id: x (n, input_size)}``), batched across streams (at most
        ``max_batch`` per call); returns ``{id: outputs (n, ...)}``."""
        rows = self._one_step_each(steps)
        if rows is not None:  # one step per stream: checked at once, one call per max_batch
            sids = list(steps)
            out = {}
            for i in range(0, len(sids), self.max_batch):
                chunk = sids[i:i + self.max_batch]
                ys = self.step_rows(chunk, rows[i:i + self.max_batch])
                out.update(zip(chunk, ys.split(1), strict=True))
            return out
        xs = {sid: self.check_steps(sid, x) for sid, x in steps.items()}
        sids = list(xs)
        out: dict[str, Tensor] = {}
        for i in range(0, len(sids), self.max_batch):
            chunk = sids[i:i + self.max_batch]
            out.update(zip(chunk, self.run(chunk, [xs[sid] for sid in chunk]), strict=True))
        return out
