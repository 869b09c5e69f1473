"""Engine: runs one cell over a sequence, for a stack of layers and both directions, and picks
a backend.

Backends, all behind :func:`run`:

* ``reference``: autograd over the Python loop (:mod:`gyre.engine.reference`); always there.
* ``native``: torch's fused kernels for exactly the configurations torch supports
  (:mod:`gyre.engine.native`).
* ``scan``: cells linear in their state (minGRU, minLSTM, any cell with ``linear_form``),
  solved for all steps at once (:mod:`gyre.engine.scan`); every layer option, zoneout included.
* ``fused``: the time loop and its backward generated as C++ from the cell's own ``step`` and
  compiled on first use (:mod:`gyre.engine.fused`); CPU, float32/float64, every layer option.

``backend="auto"`` takes ``native`` for torch's LSTM (oneDNN on CPU, cuDNN on GPU; on CPU with
``lengths`` or ``proj_size``, ``fused``, as torch's CPU kernel for those is not oneDNN's and far
slower), ``fused`` on
CPU for every other cell it can compile (torch's GRU and RNN included: their CPU kernels are not
fused; minGRU/minLSTM too, where it measured faster than ``scan``), ``scan`` for cells linear in
their state when ``fused`` is not there, and ``reference`` otherwise. With autotuning on (the
default; ``GYRE_AUTOTUNE=0`` keeps this static rule) :mod:`gyre.engine.autotune` measures the
eligible backends instead, once per key.

Streaming (``Recurrent.step`` and ``forward`` on a one-step input) asks :func:`stream`, which
makes its choice in the same place (:func:`choose` with ``Options(stream=True)``) from the cell,
its parameters and the layer options: ``fused``'s compiled one-step entry where it applies, else
the step runs as a one-step sequence through :func:`run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells import Cell, Params, State
from . import autotune, fused, native, reference, scan
from .contract import Options

BACKENDS = ("auto", "reference", "native", "scan", "fused")


@dataclass
class Result:
    """``output`` ``(T, B, D*O)``; ``state``: per component ``(L*D, B, S_k)``; ``states``: the
    last layer's per-step states per component ``(T, B, D*S_k)`` when asked, else None."""

    output: Tensor
    state: State
    states: tuple[Tensor, ...] | None = None


#: LSTM training (forward+backward) takes ``fused`` over oneDNN's LSTM on the CPU from this many
#: multiply-adds per recurrent step (batch * 4H * H): in ``gyre bench`` (BENCHMARKS.md, 2 threads)
#: 0.84x torch's time at (T,B,I,H) = (100,64,256,256) and 0.78-0.83x at (50,128,512,512), 0.84x
#: single-threaded at the first; 1.1-1.2x at (100,32,64,128) and (200,16,32,64). Inference
#: stays on oneDNN at every size.
LSTM_FUSED_TRAIN_MIN_MACS = 1 << 24


#: every backend by name, each answering the contract of :mod:`gyre.engine.contract`
MODULES = {"reference": reference, "native": native, "scan": scan, "fused": fused}


def select_backend(
    cell: Cell, backend: str = "auto", *, residual: bool = False, drop=None, zone=None,
    return_states: bool = False, varlen: bool = False, device: str = "cpu",
    size: tuple[int, int] | None = None, grad: bool = False,
) -> str:
    """The backend the static rule runs: ``backend`` itself, or for ``"auto"`` the fastest
    correct one as measured on the development machine, for a run on ``device`` (a device type),
    with ``lengths`` when ``varlen``, of ``size`` ``(batch, hidden)`` when known, with gradients
    to compute when ``grad``."""
    options = Options(residual=residual, drop=drop is not None, zone=zone is not None,
                      return_states=return_states, varlen=varlen, size=size,
                      grad="params" if grad else "none")
    return choose(cell, backend, options, device)


def eligible(cell: Cell, options: Options, device: str) -> list[str]:
    """The backends that can run this call, in the static rule's order of preference."""
    return [b for b in _preference(cell, options, device)
            if MODULES[b].unsupported(cell, options, device) is None]


def _preference(cell: Cell, options: Options, device: str) -> list[str]:
    # oneDNN/cuDNN LSTM measured faster than fused (BENCHMARKS.md); torch's CPU kernel for
    # packed (variable-length) input or with proj_size is not oneDNN's, and measured 1.1-5x
    # slower than fused for forward+backward at the bench shapes, single thread
    order = ["fused", "scan", "native", "reference"]  # fused: 1.05-2.3x scan's speed on CPU
    if options.stream:
        # fused's one-step entry: 0.02-0.1x torch.nn's one-step forward per step (BENCHMARKS.md)
        return order
    if native.mode(cell) == "lstm" and device == "cpu":
        not_onednn = options.varlen or getattr(cell, "proj_size", 0) > 0
        size = options.size
        big_training = options.grad != "none" and size is not None and \
            size[0] * 4 * size[1] * size[1] >= LSTM_FUSED_TRAIN_MIN_MACS
        if not (not_onednn or big_training):
            order = ["native", "fused", "scan", "reference"]
    elif native.mode(cell) == "lstm" or device != "cpu":
        order = ["native", "scan", "fused", "reference"] if native.mode(cell) == "lstm" else \
            ["scan", "native", "fused", "reference"]
    return order


def choose(cell: Cell, backend: str, options: Options, device: str,
           measure=None, key: str | None = None) -> str:
    """The one place a backend is chosen. A forced ``backend`` is checked against its
    ``unsupported``; ``"auto"`` takes the first eligible backend of the static rule, or with
    ``measure`` (``backend -> None``, one run) and ``key`` and autotuning on, the fastest
    eligible one measured (:mod:`gyre.engine.autotune`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        reason = MODULES[backend].unsupported(cell, options, device)
        # off the CPU or without a compiler, fused runs the reference loop after one warning
        if reason is not None and not (backend == "fused" and fused.unsupported_reason(cell)
                                       is None):
            what = "this configuration" if backend == "native" else "this cell"
            raise ValueError(f"backend: {backend!r} cannot run {what} ({reason}); "
                             "use backend='auto' or 'reference'")
        return backend
    candidates = eligible(cell, options, device)
    if len(candidates) >= 2 and candidates[-1] == "reference":
        candidates = candidates[:-1]  # the eager loop: never measured faster than a fused one
    if measure is None or key is None or not autotune.enabled() or len(candidates) < 2:
        return candidates[0]
    return autotune.choose(key, candidates, measure)


def stream(
    cell: Cell,
    params: list[list[Params]],
    input_size: int,
    hidden_size: int,
    *,
    residual: bool = False,
    zoneout: tuple[float, ...] | None = None,
    random: bool = False,
    backend: str = "auto",
):
    """The one-step entry that streams a stack of ``len(params)`` layers of ``cell``
    (``params[l][d]`` as for :func:`run`) of ``input_size`` features and ``hidden_size`` units,
    chosen in the one place (:func:`choose`, with ``Options(stream=True)``): the chosen backend's
    compiled plan (its ``step_entry``: ``plan.step(x, state)``, see
    :class:`gyre.engine.fused.stream.Plan`) where it has one that takes this configuration, else
    None, and the caller runs the step as a one-step sequence through :func:`run` (which chooses
    again, for a sequence). ``zoneout``: rates per state component, run as their expectation;
    ``random``: the call draws random masks (training with zoneout, recurrent dropout or dropout
    between layers), which no one-step entry does. A forced ``backend`` is checked as by
    :func:`run`."""
    first = next((t for layer in params for d in layer for t in d.values()), None)
    device = "cpu" if first is None else first.device.type
    options = Options(residual=residual, zone=zoneout is not None and any(zoneout),
                      layers=len(params), directions=len(params[0]) if params else 1,
                      stream=True, random=random)
    chosen = choose(cell, backend, options, device)
    module = MODULES[chosen]
    entry = getattr(module, "step_entry", None)
    if entry is None or first is None or module.unsupported(cell, options, device) is not None:
        return None
    return entry(cell, params, input_size, hidden_size, residual=residual, zoneout=zoneout)


def _tune_key(cell: Cell, x: Tensor, hx: State, options: Options, lengths) -> str:
    T, B = x.shape[:2]
    return "|".join(map(str, (
        cell.describe(), repr(cell), f"T{autotune.bucket(T)}", f"B{autotune.bucket(B)}",
        f"I{x.shape[-1]}", f"H{hx[0].shape[-1]}", str(x.dtype), x.device.type,
        f"threads{torch.get_num_threads()}", options.grad, f"L{options.layers}",
        f"D{options.directions}", options.residual, options.drop, options.zone,
        options.return_states, options.varlen)))


def run(
    cell: Cell,
    params: list[list[Params]],
    x: Tensor,
    hx: State,
    *,
    lengths: Tensor | None = None,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    residual: bool = False,
    drop: list[list[Tensor | None]] | None = None,
    zone: list[list[tuple[Tensor | None, ...]]] | None = None,
    return_states: bool = False,
    backend: str = "auto",
) -> Result:
    """Run a stack of ``len(params)`` layers of ``cell`` over ``x`` ``(T, B, I)``.

    ``params[l][d]`` holds layer ``l``'s parameters for direction ``d`` (0 forward, 1 reverse).
    ``hx``: per state component ``(L*D, B, S_k)``, torch's layout. ``lengths`` ``(B,)``: valid
    steps per sequence (padded positions give zero output and do not change the state).
    ``dropout`` acts between layers in training; ``drop[l][d]`` is a recurrent-dropout mask
    ``(B, S_0)``; ``zone[l][d]`` the zoneout weights per state component (see
    :func:`gyre.engine.reference.run_layer`). ``residual`` adds a layer's input to its output
    from the second layer on.
    """
    grad_on = torch.is_grad_enabled()
    grad = "none"
    if grad_on and any(t.requires_grad for layer in params for d in layer for t in d.values()):
        grad = "input" if x.requires_grad else "params"
    options = Options(residual=residual, drop=drop is not None, zone=zone is not None,
                      return_states=return_states, varlen=lengths is not None,
                      layers=len(params), directions=len(params[0]) if params else 1,
                      grad=grad, size=(x.shape[1], hx[0].shape[-1]))
    kwargs = dict(lengths=lengths, bidirectional=bidirectional, dropout=dropout,
                  training=training, residual=residual, drop=drop, zone=zone,
                  return_states=return_states)
    # under torch.func (vmap, grad, jacrev, ...) every backend runs the reference loop: its
    # torch ops have batching rules, the compiled kernels and the scan's solver have none
    functorch = torch._C._functorch.maybe_current_level() is not None
    measure = key = None
    if backend == "auto" and autotune.enabled() and not functorch and not torch.jit.is_tracing() \
            and not torch.compiler.is_compiling() and x.numel() > 0:
        key = _tune_key(cell, x, hx, options, lengths)

        def measure(b):
            _measure(cell, params, x, hx, grad, b, kwargs)
    chosen = "reference" if functorch else choose(cell, backend, options, x.device.type, measure, key)
    return _run_with(chosen, cell, params, x, hx, **kwargs)


def _measure(cell, params, x, hx, grad, backend, kwargs) -> None:
    """One run of this call's configuration on ``backend``, on detached copies (the caller's
    tensors, graph and random state untouched), backward included when ``grad`` asks."""
    with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(grad != "none"):
        ps = [[{k: v.detach().requires_grad_(v.requires_grad) for k, v in d.items()}
               for d in layer] for layer in params]
        xi = x.detach().requires_grad_(grad == "input")
        res = _run_with(backend, cell, ps, xi, tuple(h.detach() for h in hx), **kwargs)
        if grad != "none":
            res.output.sum().backward()


def _run_with(chosen, cell, params, x, hx, *, lengths, bidirectional, dropout, training,
              residual, drop, zone, return_states) -> Result:
    if chosen == "native":
        out, state = native.run(cell, params, x, hx, lengths=lengths, bidirectional=bidirectional,
                                dropout=dropout, training=training)
        return Result(out, state)
    layer_fn = {"scan": scan.run_layer, "fused": fused.run_layer}.get(chosen, reference.run_layer)
    return _run_stack(layer_fn, cell, params, x, hx, lengths=lengths,
                      dropout=dropout, training=training, residual=residual, drop=drop,
                      zone=zone, return_states=return_states)


def _run_stack(layer_fn, cell, params, x, hx, *, lengths, dropout, training, residual, drop,
               zone, return_states) -> Result:
    T, B = x.shape[:2]
    num_dirs = len(params[0])
    valid = None
    rev_index = None
    if lengths is not None:
        steps = torch.arange(T, device=x.device)
        lens = lengths.to(x.device)
        valid = steps[:, None] < lens[None, :]  # (T, B)
        # padding is inert: whatever its values (NaN, inf), the steps past a sequence's end see
        # zeros, so nothing non-finite reaches an output, a state or (as 0 * NaN) a gradient
        x = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if num_dirs == 2:
            # reverse each sequence within its own length; padding stays in place
            rev_index = torch.where(valid, lens[None, :] - 1 - steps[:, None], steps[:, None])
    finals: list[list[Tensor]] = [[] for _ in hx]
    layer_in = x
    states = None
    for layer, layer_params in enumerate(params):
        if layer > 0 and dropout > 0 and training:
            layer_in = F.dropout(layer_in, dropout, training=True)
        outs, layer_states = [], []
        for d, p in enumerate(layer_params):
            k = layer * num_dirs + d
            state0 = tuple(s[k] for s in hx)
            seq = layer_in if d == 0 else _reverse(layer_in, rev_index)
            out, last, st = layer_fn(
                cell, p, seq, state0, valid=valid,
                drop=None if drop is None else drop[layer][d],
                zone=None if zone is None else zone[layer][d],
                return_states=return_states and layer == len(params) - 1,
            )
            if d == 1:
                out = _reverse(out, rev_index)
                st = None if st is None else tuple(_reverse(s, rev_index) for s in st)
            outs.append(out)
            layer_states.append(st)
            for acc, s in zip(finals, last, strict=True):
                acc.append(s)
        out = outs[0] if num_dirs == 1 else torch.cat(outs, dim=-1)
        if residual and layer > 0:
            out = out + layer_in
        layer_in = out
        if return_states and layer == len(params) - 1:
            states = tuple(torch.cat(parts, dim=-1) for parts in zip(*layer_states, strict=True))
    return Result(layer_in, tuple(torch.stack(f) for f in finals), states)


def _reverse(seq: Tensor, rev_index: Tensor | None) -> Tensor:
    if rev_index is None:
        return seq.flip(0)
    return seq.gather(0, rev_index.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))


__all__ = ["BACKENDS", "MODULES", "Options", "Result", "choose", "eligible", "run",
           "select_backend", "stream"]
