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
from ..engine import autotune
from ..nn import Recurrent

#: the cells the benchmark knows, in table order
CELLS = ("rnn", "lstm", "gru", "peephole", "ln_lstm", "gated_004", "gru_001", "gru_002",
         "rnn_output", "mingru", "minlstm")
#: cells torch.nn has exactly (weights load from torch's state dict)
TORCH_EXACT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
SHAPES = ((100, 32, 64, 128), (200, 16, 32, 64), (100, 64, 256, 256), (50, 128, 512, 512))
STREAM_SHAPE = (1, 1, 64, 128)
#: ``train``: forward+backward with the input's gradient too (what every layer of a stack above
#: the first and any model with an embedding or a convolution before the recurrence computes);
#: ``train-params``: the parameters' gradients only
MODES = ("fwd", "train", "train-params")
TRAIN_MODES = ("train", "train-params")
#: the stacked configuration each standard shape also times: (cell, layers, bidirectional)
STACKS = (("lstm", 2, True),)
#: the long-sequence section: sequence lengths at (B, I, H), and what it times
LONG_LENGTHS = (1024, 4096, 16384)
LONG_SHAPE = (8, 256, 256)
LONG_IMPLS = (("mingru", "scan"), ("mingru", "fused"), ("minlstm", "scan"), ("minlstm", "fused"),
              ("lstm", "auto"), ("lstm", "torch"))


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


def flops_stack(cell: str, T: int, B: int, I: int, H: int, layers: int = 1,
                bidirectional: bool = False) -> float:
    """:func:`flops_fwd` summed over a stack: every direction of every layer, the layers above
    the first reading the ``D*H``-wide output below."""
    D = 2 if bidirectional else 1
    return sum(D * flops_fwd(cell, T, B, I if layer == 0 else D * H, H)
               for layer in range(layers))


def flops_params(cell: str, T: int, B: int, I: int, H: int) -> float:
    """Forward FLOPs from the cell's parameter specs: ``2*T*B*rows*cols`` for every matrix
    parameter (each is one product per row and step)."""
    specs = _cells.get(cell).param_specs(I, H, True)
    return sum(2.0 * T * B * s.shape[0] * s.shape[1] for s in specs.values()
               if len(s.shape) == 2)


def gyre_backend(cell: str, impl: str, mode: str = "fwd", B: int = 1, H: int = 1) -> str | None:
    """The engine backend ``impl`` runs for ``cell`` in ``mode`` at batch ``B`` and hidden size
    ``H`` (None: this backend cannot run it)."""
    backend = "reference" if impl == "eager" else impl
    try:
        return engine.select_backend(_cells.get(cell), backend, size=(B, H),
                                     grad=mode in TRAIN_MODES)
    except ValueError:
        return None


def auto_backend(m: Recurrent, mode: str, x: Tensor) -> str:
    """The backend ``m`` (built with ``backend="auto"``) runs in ``mode`` on ``x``: one call of
    :func:`make_fn`'s callable, and the choice :func:`gyre.engine.autotune.choose` made for it
    (measured now, or found in its cache); where autotune made none (it is off, or one backend
    is eligible, or the mode runs ``step``), the static rule's."""
    seen: list[str] = []
    choose = autotune.choose

    def spy(key, candidates, measure):
        winner = choose(key, candidates, measure)
        seen.append(winner)
        return winner

    autotune.choose = spy
    try:
        make_fn(m, mode, x)()
    finally:
        autotune.choose = choose
    if seen:
        return seen[-1]
    return engine.select_backend(m.cell, "auto", size=(x.shape[1], m.hidden_size),
                                 grad=mode in TRAIN_MODES)


def build(cell: str, impl: str, I: int, H: int, seed: int = 0, layers: int = 1,
          bidirectional: bool = False) -> nn.Module:
    """A module of ``layers`` layers, weights drawn from ``seed``: the same weights for every gyre
    impl of a cell, and for the torch layer of a cell torch has exactly."""
    torch.manual_seed(seed)
    shape = dict(num_layers=layers, bidirectional=bidirectional)
    if impl == "torch":
        return torch_class(cell)(I, H, **shape)
    twin = torch_class(cell)(I, H, **shape) if cell in TORCH_EXACT else None  # "torch"'s draw
    backend = "reference" if impl == "eager" else impl
    m = Recurrent(cell, I, H, **shape, backend=backend)
    if twin is not None:
        m.load_state_dict(twin.state_dict())
    return m


def inputs(T: int, B: int, I: int, seed: int = 1) -> Tensor:
    return torch.randn(T, B, I, generator=torch.Generator().manual_seed(seed))


def make_fn(m: nn.Module, mode: str, x: Tensor) -> Callable[[], object]:
    """One forward (``fwd``, no grad) or forward+backward of ``output.sum()`` (``train``: the
    gradients of the parameters and of ``x``; ``train-params``: of the parameters only) of ``m``
    on ``x``; for ``stream``, ``x`` ``(steps, B, I)`` is fed one step at a time with carried
    state."""
    if mode == "fwd":
        m.eval()

        def fwd():
            with torch.no_grad():
                return m(x)[0]
        return fwd
    if mode in TRAIN_MODES:
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        inp = x.detach().clone().requires_grad_(mode == "train")

        def train():
            for p in params:
                p.grad = None
            inp.grad = None
            m(inp)[0].sum().backward()
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
    raise ValueError(f"mode: got {mode!r}, expected 'fwd', 'train', 'train-params' or 'stream'")


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
    itself tested against torch and the cells' formulas). ``fwd``: outputs; ``train``: outputs,
    every parameter gradient and the input's (max abs error relative to ``max(1, max|grad|)``;
    ``train-params`` the parameters' only); ``stream``: the streamed outputs and final state
    over up to 20 steps."""
    exact = cell in TORCH_EXACT
    ref = build(cell, "torch" if exact else "eager", m.input_size, m.hidden_size, seed,
                m.num_layers, m.bidirectional)
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
    train = mode in TRAIN_MODES
    ref.train(train)
    m.train(train)
    with torch.enable_grad():
        xm, xr = (x.detach().clone().requires_grad_(mode == "train") for _ in range(2))
        out_m, out_r = m(xm)[0], ref(xr)[0]
        result["out_max_abs_err"] = (out_m - out_r).abs().max().item()
        if train:
            pm = dict(m.named_parameters())
            pr = dict(ref.named_parameters())
            if mode == "train":
                pm["input"], pr["input"] = xm, xr
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

