"""What is timed: layers built with shared weights, the callables that run them, their FLOPs,
and the numerics check of every timed gyre layer against torch (weights copied).

Implementations (``impl``):

* ``"torch"``: ``torch.nn.RNN/LSTM/GRU``, the one that corresponds to the cell; cells torch does
  not have (peephole and layer-norm LSTM, the reference-text cells, minGRU/minLSTM) are
  compared with ``torch.nn.LSTM`` at the same shape, as the speed to beat.
* ``"eager"``: an eager torch loop of the same cell, which is exactly gyre's ``reference``
  backend (autograd over a Python loop, input projection hoisted into one GEMM).
* ``"auto"``: gyre's default, the backend ``backend="auto"`` picks.
* any other name: that gyre backend forced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import cells as _cells
from .. import engine
from ..nn import Recurrent

#: the cells the benchmark knows, in table order
CELLS = ("rnn", "lstm", "gru", "peephole", "ln_lstm", "gated_004", "gru_001", "gru_002",
         "rnn_output", "mingru", "minlstm")
#: cells torch.nn has exactly (weights load from torch's state dict)
TORCH_EXACT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
SHAPES = ((100, 32, 64, 128), (200, 16, 32, 64), (100, 64, 256, 256), (50, 128, 512, 512))
STREAM_SHAPE = (1, 1, 64, 128)
MODES = ("fwd", "train")


def torch_class(cell: str) -> type[nn.Module]:
    """The torch.nn layer a cell is compared with."""
    return TORCH_EXACT.get(cell, nn.LSTM)


def flops_fwd(cell: str, T: int, B: int, I: int, H: int) -> float:
    """Forward FLOPs of the matrix products: ``2*T*B*G*H*(I+H)`` (LSTM G=4, GRU 3, RNN 1); cells
    without a recurrent matrix (minGRU, minLSTM) count ``I`` only; ``rnn_output`` adds its
    read-out ``2*T*B*H*H``. Training counts 3x forward."""
    c = _cells.get(cell)
    G = c.gates
    recurrent = 0 if cell in ("mingru", "minlstm") else H
    f = 2.0 * T * B * G * H * (I + recurrent)
    if cell == "rnn_output":
        f += 2.0 * T * B * H * H
    return f


def gyre_backend(cell: str, impl: str, mode: str = "fwd", B: int = 1, H: int = 1) -> str | None:
    """The engine backend ``impl`` runs for ``cell`` in ``mode`` at batch ``B`` and hidden size
    ``H`` (None: this backend cannot run it)."""
    backend = "reference" if impl == "eager" else impl
    try:
        return engine.select_backend(_cells.get(cell), backend, size=(B, H),
                                     grad=mode == "train")
    except ValueError:
        return None


def build(cell: str, impl: str, I: int, H: int, seed: int = 0) -> nn.Module:
    """A one-layer module, weights drawn from ``seed``: the same weights for every gyre impl of
    a cell, and for the torch layer of a cell torch has exactly."""
    torch.manual_seed(seed)
    if impl == "torch":
        return torch_class(cell)(I, H)
    twin = torch_class(cell)(I, H) if cell in TORCH_EXACT else None  # same draw as "torch"
    backend = "reference" if impl == "eager" else impl
    m = Recurrent(cell, I, H, backend=backend)
    if twin is not None:
        m.load_state_dict(twin.state_dict())
    return m


def inputs(T: int, B: int, I: int, seed: int = 1) -> Tensor:
    return torch.randn(T, B, I, generator=torch.Generator().manual_seed(seed))


def make_fn(m: nn.Module, mode: str, x: Tensor) -> Callable[[], object]:
    """One forward (``fwd``, no grad) or forward+backward (``train``, gradients of the
    parameters of ``output.sum()``) of ``m`` on ``x``; for ``stream``, ``x`` ``(steps, B, I)``
    is fed one step at a time with carried state."""
    if mode == "fwd":
        m.eval()

        def fwd():
            with torch.no_grad():
                return m(x)[0]
        return fwd
    if mode == "train":
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]

        def train():
            for p in params:
                p.grad = None
            m(x)[0].sum().backward()
        return train
    if mode == "stream":
        m.eval()
        step = _stepper(m)

        def stream():
            state = None
            with torch.no_grad():
                for t in range(x.shape[0]):
                    y, state = step(x[t], state)
            return y
        return stream
    raise ValueError(f"mode: got {mode!r}, expected 'fwd', 'train' or 'stream'")


def _stepper(m: nn.Module):
    """``(x_t (B, I), state) -> (y (B, O), state)``: ``layer.step`` for gyre, a ``T=1`` call
    for torch."""
    if isinstance(m, Recurrent):
        return m.step

    def step(x_t, state):
        out, state = m(x_t.unsqueeze(0), state)
        return out[0], state
    return step


def check(cell: str, m: nn.Module, mode: str, x: Tensor, seed: int = 0) -> dict:
    """Compare a gyre layer with its reference on ``x``: ``torch.nn`` with the same weights for
    the cells torch has, else the eager loop of the same cell (gyre's ``reference`` backend,
    itself tested against torch and the cells' formulas). ``fwd``: outputs; ``train``: outputs
    and every parameter gradient (max abs error relative to ``max(1, max|grad|)``); ``stream``:
    the streamed outputs and final state over up to 20 steps."""
    exact = cell in TORCH_EXACT
    ref = build(cell, "torch" if exact else "eager", m.input_size, m.hidden_size, seed)
    if not exact:
        ref.load_state_dict(m.state_dict())
    against = torch_class(cell).__name__ if exact else "eager loop (gyre reference)"
    result = {"against": ("torch.nn." + against) if exact else against}
    if mode == "stream":
        xs = x[:20]
        ys, s_ref = _stream_all(ref, xs)
        ys_m, s_m = _stream_all(m, xs)
        result["out_max_abs_err"] = (ys_m - ys).abs().max().item()
        result["state_max_abs_err"] = max((a - b).abs().max().item()
                                          for a, b in zip(_tuple(s_m), _tuple(s_ref), strict=True))
        return result
    ref.train(mode == "train")
    m.train(mode == "train")
    with torch.enable_grad():
        out_m, out_r = m(x)[0], ref(x)[0]
        result["out_max_abs_err"] = (out_m - out_r).abs().max().item()
        if mode == "train":
            pm = dict(m.named_parameters())
            pr = dict(ref.named_parameters())
            gm = torch.autograd.grad(out_m.sum(), list(pm.values()))
            gr = dict(zip(pr, torch.autograd.grad(out_r.sum(), list(pr.values())), strict=True))
            errs = []
            for name, g in zip(pm, gm, strict=True):
                r = gr[name]
                errs.append((g - r).abs().max().item() / max(1.0, r.abs().max().item()))
            result["grad_max_rel_err"] = max(errs)
    return result


def _stream_all(m, xs):
    step = _stepper(m)
    m.eval()
    state, ys = None, []
    with torch.no_grad():
        for t in range(xs.shape[0]):
            y, state = step(xs[t], state)
            ys.append(y)
    return torch.stack(ys), state


def _tuple(s):
    return (s,) if isinstance(s, Tensor) else tuple(s)

