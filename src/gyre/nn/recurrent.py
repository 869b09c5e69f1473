"""``Recurrent``: a torch.nn-compatible layer for any cell."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import cells as _cells
from .. import engine
from ..cells import Cell, init_parameter

HiddenState = Tensor | tuple[Tensor, ...]


class RNNInputError(ValueError, RuntimeError):
    """An input, state or length of the wrong size or device: a ``ValueError`` by gyre's rule
    for bad input, and the ``RuntimeError`` that ``torch.nn``'s recurrent layers raise for the
    same mistake (so code written against either catches it)."""


class RNNDTypeError(TypeError, ValueError):
    """An input or state of the wrong dtype: a ``TypeError`` by gyre's rule, and the
    ``ValueError`` that ``torch.nn``'s recurrent layers raise."""


class Recurrent(nn.Module):
    r"""A stack of recurrent layers of any cell, drop-in for ``torch.nn.RNN/LSTM/GRU``.

    Args:
        cell: a built-in cell name (``gyre.cells.names()``) or a :class:`gyre.cells.Cell`.
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as torch.
        residual: add each stacked layer's input to its output (from the second layer on).
        recurrent_dropout: rate of variational dropout on ``h_{t-1}`` where it enters the
            recurrent product, one mask per sequence and layer (Gal & Ghahramani 2016); training only.
        zoneout: rate (or one rate per state component, e.g. ``(h_rate, c_rate)`` for LSTM) at which
            a unit keeps its previous value (Krueger et al. 2016). In training a fresh random mask
            per step; in evaluation the expectation ``rate * old + (1 - rate) * new``.
        backend: ``"auto"`` (fastest correct) or one of ``gyre.engine.BACKENDS``
            (``"reference"``, ``"native"``, ``"fused"``, ``"scan"``).
        activation, recurrent_activation: names from :data:`gyre.cells.activations.ACTIVATIONS`
            replacing the cell's own (``None``: keep them): for LSTM/GRU the cell and the gate
            activations, for RNN its nonlinearity (``activation`` only); any cell with fields of
            these names takes them.

    ``forward(input, hx=None, *, lengths=None, enforce_sorted=False)`` returns
    ``(output, h_n)``, where ``h_n`` is a tensor for one-component states and a tuple otherwise
    (``(h_n, c_n)`` for LSTM), with torch's shapes. ``input`` may be a ``PackedSequence``; or pass
    a padded batch with ``lengths=`` (no packing needed): padded steps give zero output and leave
    the state unchanged. :meth:`forward_with_states` also returns every step's state;
    :meth:`step` runs one time step for streaming.
    """

    def __init__(
        self,
        cell: str | Cell,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        residual: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float | Sequence[float] = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
        activation: str | None = None,
        recurrent_activation: str | None = None,
    ) -> None:
        super().__init__()
        self.cell = _with_activations(_cells.get(cell), activation, recurrent_activation)
        _check_bool("bias", bias)
        _check_bool("batch_first", batch_first)
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        _check_dropout(dropout, num_layers)
        _check_rate("recurrent_dropout", recurrent_dropout)
        if backend not in engine.BACKENDS:
            raise ValueError(f"backend: got {backend!r}, expected one of {', '.join(engine.BACKENDS)}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.residual = bool(residual)
        self.recurrent_dropout = float(recurrent_dropout)
        self.backend = backend
        self.state_sizes = self.cell.state_sizes(hidden_size)
        self.zoneout = _zoneout_rates(zoneout, len(self.state_sizes))
        self.output_size = self.cell.output_size(hidden_size)
        num_dirs = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        self._names: list[list[dict[str, str]]] = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else num_dirs * self.output_size
            specs = _cells.layer_specs(self.cell, layer_in, hidden_size, self.bias)
            dirs = []
            for d in range(num_dirs):
                names = {}
                for name, spec in specs.items():
                    attr = f"{name}_l{layer}{'_reverse' if d else ''}"
                    t = torch.empty(spec.shape, **factory)
                    init_parameter(t, spec, hidden_size)
                    self.register_parameter(attr, nn.Parameter(t))
                    names[name] = attr
                dirs.append(names)
            self._names.append(dirs)

    # -- torch compatibility -------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda(), ... may swap each parameter's tensor in place
        # (torch.__future__.set_swap_module_params_on_conversion), which needs no other
        # reference held to it: the streaming plan goes, and is made again on the next step
        self.__dict__.pop("_gyre_stream", None)
        return super()._apply(fn, recurse)

    def flatten_parameters(self) -> None:
        """Kept for ``torch.nn`` compatibility: gyre uses its parameters as they are."""

    @property
    def step_compiled(self) -> bool:
        """Whether the engine chose a compiled one-step entry for this layer's streaming (as of
        its latest ``step`` or one-step ``forward``; see :func:`gyre.engine.stream`)."""
        s = self.__dict__.get("_gyre_stream")
        return s is not None and s.plan is not None

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, a) for a in names.values()] for layer in self._names for names in layer]

    def extra_repr(self) -> str:
        s = f"{self.cell.describe()}, {self.input_size}, {self.hidden_size}"
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
                    "bidirectional": False, "residual": False, "recurrent_dropout": 0.0,
                    "backend": "auto"}
        for k, v in defaults.items():
            if getattr(self, k) != v:
                s += f", {k}={getattr(self, k)!r}"
        if any(self.zoneout):
            s += f", zoneout={self.zoneout!r}"
        return s

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self, input: Tensor | PackedSequence, hx: HiddenState | None = None, *,
        lengths: Sequence[int] | Tensor | None = None, enforce_sorted: bool = False,
    ):
        if lengths is None and type(input) is Tensor:
            one = self._forward_one(input, hx)
            if one is not None:
                return one
        output, state, _ = self._forward(input, hx, lengths, enforce_sorted, return_states=False)
        return output, state

    def forward_with_states(
        self, input: Tensor | PackedSequence, hx: HiddenState | None = None, *,
        lengths: Sequence[int] | Tensor | None = None, enforce_sorted: bool = False,
    ):
        """``(output, h_n, states)``: ``states`` has, per state component, the last layer's state
        after every step, ``(T, B, D*S_k)`` (batch-first when ``batch_first``); for LSTM
        ``states[1]`` is every ``c_t``. Not available for ``PackedSequence`` input."""
        if isinstance(input, PackedSequence):
            raise TypeError("input: per-step states need a padded tensor; got a PackedSequence "
                            "(pass the padded batch with lengths= instead)")
        return self._forward(input, hx, lengths, enforce_sorted, return_states=True)

    def step(self, input: Tensor, state: HiddenState | None = None):
        """One time step with carried state, for streaming: ``input`` ``(B, I)`` or ``(I,)``,
        ``state`` as ``h_n`` from ``forward`` or a previous ``step`` (None: zeros).
        Returns ``(y, state)`` with ``y`` ``(B, O)`` (or ``(O,)``).

        The engine chooses how (:func:`gyre.engine.stream`): without autograd (grad disabled,
        or nothing involved requiring grad) on CPU, one call runs the whole stack in compiled
        code; ``forward`` on a one-step input takes the same path. Every call returns new
        tensors, never the previous step's."""
        s = self.__dict__.get("_gyre_stream")
        if s is not None and s.fast is not None and s.backend == self.backend and \
                s.training == self.training and _level() is None and not _tracing() and \
                not _compiling():
            # every check in C++ (parameters unchanged, grad, dtypes, shapes); None: unusual
            fast = s.fast(self._parameters, input, state)
            if fast is not None:
                return fast
        fast = self._step_planned(input, state)
        if fast is not None:
            return fast
        if self.bidirectional:
            raise ValueError("step: the layer is bidirectional; a reverse direction needs the whole "
                             "sequence, so streaming needs bidirectional=False")
        if self.training and self.recurrent_dropout > 0:
            raise ValueError("step: recurrent_dropout needs one mask per sequence, which a single "
                             "step cannot hold; call eval() before streaming")
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            got = f"rank {input.dim()}" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"input: got {got}, expected (B, I) or (I,) for one step")
        x = input.unsqueeze(0)  # (1, B, I) or (1, I): time-major, one step
        if self.batch_first and x.dim() == 3:
            x = x.transpose(0, 1)
        out, state, _ = self._forward(x, state, None, False, return_states=False)
        if isinstance(out, Tensor) and out.dim() == 3:
            out = out[:, 0] if self.batch_first else out[0]
        else:
            out = out[0]
        return out, state

    # -- internals -----------------------------------------------------------------------------
    def _forward_one(self, input: Tensor, hx):
        """``forward`` of a one-step ``input`` by the streaming path (as :meth:`step`), or None
        for the general path."""
        shape = input.shape
        n = len(shape)
        if n == 3:
            first = self.batch_first
            if shape[1 if first else 0] != 1:
                return None
            x = input.select(1, 0) if first else input[0]
        elif n == 2 and shape[0] == 1:  # unbatched (1, I)
            first = False
            x = input[0]
        else:
            return None
        s = self.__dict__.get("_gyre_stream")
        out = None
        if s is not None and s.fast is not None and s.backend == self.backend and \
                s.training == self.training and _level() is None and not _tracing() and \
                not _compiling():
            out = s.fast(self._parameters, x, hx)
        if out is None:
            out = self._step_planned(x, hx)
            if out is None:
                return None
        y, state = out
        return (y.unsqueeze(1) if first else y[None]), state

    def _step_planned(self, x: Tensor, state):
        """The same with every check in Python, (re)making the engine's choice when the
        configuration or a parameter changed."""
        if not _plain_call():
            return None
        params = self._registered_params()
        flat = None if params is None else tuple(t for layer in params for d in layer
                                                 for t in d.values())
        if flat is not None and torch.is_grad_enabled() and any(p.requires_grad for p in flat):
            return None  # autograd: the general path (no plan made, none holding the weights)
        s = self.__dict__.get("_gyre_stream")
        if s is None or s.backend != self.backend or s.training != self.training or \
                not s.current(flat):
            plan = None
            if params is not None:
                random = self.training and (any(self.zoneout) or self.recurrent_dropout > 0 or
                                            (self.dropout > 0 and self.num_layers > 1))
                plan = engine.stream(self.cell, params, self.input_size, self.hidden_size,
                                     residual=self.residual,
                                     zoneout=self.zoneout if any(self.zoneout) else None,
                                     random=random, backend=self.backend)
            s = self.__dict__["_gyre_stream"] = _Streaming(self.backend, self.training, flat, plan)
        return None if s.plan is None else s.plan.step(x, state)

    def _registered_params(self) -> list[list[dict[str, Tensor]]] | None:
        """The parameters as :meth:`_params`, or None where one is not a registered parameter
        (a parametrized weight is recomputed on every access, which a one-step plan holding
        its memory would not see)."""
        out = []
        for layer in self._names:
            dirs = []
            for names in layer:
                p = {n: self._parameters.get(a) for n, a in names.items()}
                if any(v is None for v in p.values()):
                    return None
                dirs.append(p)
            out.append(dirs)
        return out

    def _params(self) -> list[list[dict[str, Tensor]]]:
        return [[{n: getattr(self, a) for n, a in names.items()} for names in layer]
                for layer in self._names]

    def _forward(self, input, hx, lengths, enforce_sorted, return_states):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths: got lengths with a PackedSequence input, which carries "
                                 "its own; pass one or the other")
            x, lens = pad_packed_sequence(input, batch_first=False)
            unbatched = False
        else:
            x = self._check_input(input)
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
            lens = None if lengths is None else _check_lengths(lengths, x.shape[0], x.shape[1],
                                                               enforce_sorted)
        self._check_tensor_match("input", x)
        T, B = x.shape[:2]
        hx = self._check_hx(hx, B, unbatched, x)
        drop, zone = self._masks(T, B, x)
        result = engine.run(
            self.cell, self._params(), x, hx, lengths=lens, bidirectional=self.bidirectional,
            dropout=self.dropout, training=self.training, residual=self.residual, drop=drop,
            zone=zone, return_states=return_states, backend=self.backend,
        )
        out, state, states = result.output, result.state, result.states
        if packed:
            out = _repack(out, input)
        elif unbatched:
            out = out.squeeze(1)
            state = tuple(s.squeeze(1) for s in state)
            states = None if states is None else tuple(s.squeeze(1) for s in states)
        elif self.batch_first:
            out = out.transpose(0, 1)
            states = None if states is None else tuple(s.transpose(0, 1) for s in states)
        state = state[0] if len(state) == 1 else state
        return out, state, states

    def _check_input(self, input) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"input: got {type(input).__name__}, expected a Tensor or PackedSequence")
        if input.dim() not in (2, 3):
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"input: got a tensor of rank {input.dim()} with shape "
                             f"{tuple(input.shape)}, expected {layout} or (T, I) unbatched "
                             f"(Expected input to be 2D or 3D, got {input.dim()}D)")
        if input.shape[-1] != self.input_size:
            raise RNNInputError(
                f"input: got feature size {input.shape[-1]} (shape {tuple(input.shape)}), "
                f"expected input_size={self.input_size} (input.size(-1) must be equal to "
                f"input_size. Expected {self.input_size}, got {input.shape[-1]})")
        if input.shape[1 if (input.dim() == 3 and self.batch_first) else 0] == 0:
            raise RNNInputError(f"input: got a sequence of length 0 (shape {tuple(input.shape)}), "
                                "expected at least one step (Expected sequence length to be "
                                "larger than 0 in RNN)")
        return input

    def _check_tensor_match(self, arg: str, t: Tensor) -> None:
        w = next(iter(self.parameters()))
        if not t.is_floating_point():
            raise TypeError(f"{arg}: got dtype {t.dtype}, expected a floating dtype ({w.dtype})")
        if t.dtype != w.dtype:
            raise RNNDTypeError(
                f"{arg}: got dtype {t.dtype}, expected the layer's dtype {w.dtype} (RNN input "
                f"dtype ({t.dtype}) does not match weight dtype ({w.dtype}). Convert input: "
                f"input.to({w.dtype}), or convert model: model.to({t.dtype}))")
        if t.device != w.device:
            raise RNNInputError(f"{arg}: got a tensor on {t.device}, expected the layer's device "
                                f"{w.device} (move one with .to(); Input and parameter tensors "
                                "are not at the same device)")

    def _check_hx(self, hx, B: int, unbatched: bool, x: Tensor) -> tuple[Tensor, ...]:
        k = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            return tuple(x.new_zeros(k, B, s) for s in self.state_sizes)
        parts = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        n = len(self.state_sizes)
        if len(parts) != n or not all(isinstance(p, Tensor) for p in parts):
            want = "a Tensor" if n == 1 else f"a tuple of {n} Tensors {self.cell.state_names}"
            raise RNNInputError(f"hx: got {_describe(hx)}, expected {want}")
        out = []
        for name, part, size in zip(self.cell.state_names, parts, self.state_sizes, strict=True):
            want = (k, size) if unbatched else (k, B, size)
            if tuple(part.shape) != want:
                raise RNNInputError(
                    f"hx: state '{name}' has shape {tuple(part.shape)}, expected {want} "
                    f"(num_layers*num_directions, {'' if unbatched else 'batch, '}{name}_size; "
                    f"Expected hidden size {want}, got {list(part.shape)})")
            self._check_tensor_match(f"hx ('{name}')", part)
            out.append(part.unsqueeze(1) if unbatched else part)
        return tuple(out)

    def _masks(self, T: int, B: int, x: Tensor):
        num_dirs = 2 if self.bidirectional else 1
        drop = zone = None
        if self.training and self.recurrent_dropout > 0:
            keep = 1.0 - self.recurrent_dropout
            drop = [[x.new_empty(B, self.state_sizes[0]).bernoulli_(keep) / keep
                     for _ in range(num_dirs)] for _ in range(self.num_layers)]
        if any(self.zoneout):
            def masks():
                if self.training:
                    return tuple(None if r == 0 else x.new_empty(T, B, s).bernoulli_(r)
                                 for r, s in zip(self.zoneout, self.state_sizes, strict=True))
                return tuple(None if r == 0 else x.new_tensor(r) for r in self.zoneout)
            zone = [[masks() for _ in range(num_dirs)] for _ in range(self.num_layers)]
        return drop, zone


class _Streaming:
    """A layer's streaming choice: the engine's one-step plan (None: the general path) and what
    it was made for (the backend, the training mode, the parameters)."""

    __slots__ = ("backend", "training", "params", "ptrs", "plan", "fast")

    def __init__(self, backend, training, params, plan):
        self.backend, self.training, self.params, self.plan = backend, training, params, plan
        self.ptrs = None if params is None else tuple(p.data_ptr() for p in params)
        self.fast = None if plan is None else plan.fast

    def current(self, params) -> bool:
        if self.plan is not None:
            return params is not None and self.plan.current(params)
        if params is None or self.params is None:
            return params is self.params
        return len(params) == len(self.params) and all(
            a is b for a, b in zip(params, self.params, strict=True)) and \
            tuple(p.data_ptr() for p in params) == self.ptrs

    def __reduce__(self):  # copy.deepcopy / pickle of the layer: chosen again on its next step
        return (_none, ())


def _none():
    return None


_level = torch._C._functorch.maybe_current_level
_tracing = torch._C._is_tracing
_compiling = torch.compiler.is_compiling


def _plain_call() -> bool:
    """Not under torch.func, the JIT tracer or torch.compile, which see only torch ops (the
    general path's), not the one-step entry's compiled call."""
    return _level() is None and not _tracing() and not _compiling()


def _with_activations(cell: Cell, activation: str | None, recurrent_activation: str | None) -> Cell:
    """``cell`` with its activation fields replaced by those given (RNN's is ``nonlinearity``)."""
    changes = {}
    for arg, value in (("activation", activation), ("recurrent_activation", recurrent_activation)):
        if value is None:
            continue
        field = arg
        if arg == "activation" and isinstance(cell, _cells.RNN):
            field = "nonlinearity"
        if field not in {f.name for f in dataclasses.fields(cell)}:
            raise ValueError(f"{arg}: got {value!r} for the cell {cell.describe()}, which has no "
                             f"{arg} (expected None)")
        changes[field] = value
    return dataclasses.replace(cell, **changes) if changes else cell


def _repack(out: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack ``out`` ``(T, B, F)`` (original batch order) the way ``like`` is packed."""
    if like.sorted_indices is not None:
        out = out.index_select(1, like.sorted_indices)
    lens = _batch_sizes_to_lengths(like.batch_sizes)
    data = pack_padded_sequence(out, lens, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _batch_sizes_to_lengths(batch_sizes: Tensor) -> Tensor:
    steps = torch.arange(int(batch_sizes[0]))
    return (steps[:, None] < batch_sizes[None, :]).sum(1)


def _check_lengths(lengths, T: int, B: int, enforce_sorted: bool) -> Tensor:
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths: got a tensor of dtype {lengths.dtype}, expected integers")
        if lengths.dim() != 1:
            raise ValueError(f"lengths: got shape {tuple(lengths.shape)}, expected ({B},)")
        lens = lengths.detach().to("cpu", torch.int64)
    else:
        try:
            items = list(lengths)
        except TypeError:
            raise TypeError(f"lengths: got {type(lengths).__name__}, expected a sequence of ints "
                            "or a 1-D integer tensor") from None
        bad = [v for v in items if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"lengths: got non-integer value {bad[0]!r}, expected integers")
        lens = torch.tensor([int(v) for v in items], dtype=torch.int64)
    if lens.numel() != B:
        raise ValueError(f"lengths: got {lens.numel()} lengths, expected one per sequence ({B})")
    if (lens <= 0).any():
        raise ValueError(f"lengths: got {int(lens.min())}, expected every length >= 1")
    if (lens > T).any():
        raise ValueError(f"lengths: got {int(lens.max())}, longer than the sequence ({T} steps)")
    if enforce_sorted and (lens[1:] > lens[:-1]).any():
        raise ValueError(f"lengths: got {lens.tolist()}, expected decreasing order with "
                         "enforce_sorted=True (or pass enforce_sorted=False)")
    return lens


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):  # as torch: bias=0 or batch_first="False" is a mistake
        raise TypeError(f"{name} should be of type bool, got: {type(v).__name__} ({v!r})")


def _check_size(name: str, v) -> None:
    """A size, with torch's exception types: ``TypeError`` for a non-int (``3.0`` too),
    ``ValueError`` for one below 1."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(v).__name__} ({v!r})")
    if v < 1:
        raise ValueError(f"{name} must be greater than zero, got {v}")


def _check_dropout(v, num_layers: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
        raise ValueError(f"dropout should be a number in range [0, 1] representing the "
                         f"probability of an element being zeroed, got {v!r}")
    if v > 0 and num_layers == 1:
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                      "non-zero dropout expects num_layers greater than 1, but got "
                      f"dropout={v} and num_layers={num_layers}", UserWarning, stacklevel=4)


def _check_rate(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
        raise ValueError(f"{name}: got {v!r}, expected a number in [0, 1)")


def _zoneout_rates(zoneout, n: int) -> tuple[float, ...]:
    if isinstance(zoneout, numbers.Real):
        rates = (float(zoneout),) * n
    else:
        rates = tuple(zoneout)
        if len(rates) != n:
            raise ValueError(f"zoneout: got {len(rates)} rates, expected 1 or {n} (one per state "
                             "component)")
    for r in rates:
        _check_rate("zoneout", r)
    return tuple(float(r) for r in rates)


def _describe(v) -> str:
    if isinstance(v, Tensor):
        return f"a Tensor of shape {tuple(v.shape)}"
    if isinstance(v, tuple | list):
        return f"a {type(v).__name__} of {len(v)} items"
    return type(v).__name__
