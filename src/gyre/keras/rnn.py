"""Keras recurrent layers whose loop over time is :func:`gyre.engine.run`.

Each layer keeps Keras's own weights in Keras's layout and hands the engine a view of them in
gyre's (torch's) layout on every call, so gradients, regularizers, constraints, ``get_weights``
/ ``set_weights`` and saving are Keras's own:

* ``LSTM``: ``kernel (I, 4H)``, ``recurrent_kernel (H, 4H)``, ``bias (4H)``, gates ``i, f, c, o``
  (torch's ``i, f, g, o``): ``weight_ih = kernel^T``, ``weight_hh = recurrent_kernel^T``,
  ``bias_ih = bias``, ``bias_hh = 0``.
* ``GRU``: gates ``z, r, h`` (torch's ``r, z, n``, so the blocks are swapped); with
  ``reset_after=True`` (torch's convention) ``bias (2, 3H)`` is ``bias_ih, bias_hh``; with
  ``reset_after=False`` (Cho et al.) ``bias (3H)`` is ``bias_ih``.
* ``SimpleRNN``: ``kernel (I, H)``, ``recurrent_kernel (H, H)``, ``bias (H)``.

Masks (``Masking``, ``Embedding(mask_zero=True)``, or ``mask=``) may be any pattern, as in Keras:
a masked step leaves the state unchanged and outputs the previous step's output (zeros with
``zero_output_for_mask``, which ``Bidirectional`` sets when returning sequences). Padding at the
end becomes gyre's ``lengths=`` as it is; any other mask (padding in front, as
``pad_sequences`` writes by default, or gaps) is equivalent to moving each sequence's unmasked
steps to its front in order, which is done with one gather before the engine and one after, so
the result equals Keras's for every mask.

Dropout is Keras's, mask for mask: the masks are the Keras cell's own (``get_dropout_mask``,
``get_recurrent_dropout_mask``, drawn by its seeded generator once per batch and shared by every
step), so a Keras layer and a gyre one with the same ``seed`` drop the same units and train to
the same weights. ``dropout`` alone (Keras's ``implementation=2``) is one input mask ``(B, I)``
for all gates. ``recurrent_dropout > 0`` makes Keras's LSTM/GRU cells ``implementation=1``,
where every gate has its own masks: gate ``g``'s input product sees ``x * dp_g`` and its
recurrent product ``h_{t-1} * rdp_g`` (4 masks of each kind for LSTM, ``i, f, c, o``; 3 for GRU,
``z, r, h``; with ``reset_after=False`` the candidate's product is ``W_h (r * h_{t-1} * rdp_h)``),
as Gal & Ghahramani (2016) draw them. gyre's engine takes one recurrent mask per state, so these
training calls run the per-gate cells below on the ``reference`` backend (Keras's own loop is an
eager per-step loop there too); inference, and training without recurrent dropout, run on the
fast backends. ``SimpleRNN`` has one mask of each kind, as in Keras. :class:`Recurrent` (any gyre
cell) keeps gyre's variational dropout: one recurrent mask shared by all gates. ``unroll`` is
accepted and has no effect (the loop runs in gyre's engine either way).

Precision: Keras 3 computes ``keras.ops.matmul`` of two float64 tensors in float32
(``keras.backend.result_type`` maps 64-bit types to 32-bit, "aligned with JAX's default"), and
its cells' ``call`` uses it, so Keras's own float64 layers are float32-accurate (about 1e-7)
wherever its generic loop runs: masks, ``SimpleRNN``, GRU ``reset_after=False``,
``implementation=1``. Its LSTM/GRU without a mask run torch ops at the kernel's dtype. gyre's
engine computes in the input's dtype throughout.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import keras
import torch
import torch.nn.functional as F

from .. import cells as _cells
from .. import engine
from ..cells import activations as _acts
from ..cells import lstm as _lstm_cells

__all__ = ["LSTM", "GRU", "SimpleRNN", "Recurrent"]

_register = keras.saving.register_keras_serializable(package="gyre")


def _activation_name(fn, arg: str) -> str:
    try:
        name = keras.activations.serialize(fn)
    except Exception:  # a user function Keras cannot name
        name = getattr(fn, "__name__", repr(fn))
    if not isinstance(name, str) or name not in _acts.ACTIVATIONS:
        raise ValueError(f"{arg}: got {name!r}, expected one of {', '.join(sorted(_acts.ACTIVATIONS))} "
                         "(the activations gyre's cells run on every backend)")
    return name


def _check_backend(backend) -> str:
    if backend not in engine.BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {', '.join(engine.BACKENDS)}")
    return backend


def _zoneout(rate, n: int) -> tuple[float, ...]:
    rates = (rate,) * n if isinstance(rate, numbers.Real) else tuple(rate)
    if len(rates) != n:
        raise ValueError(f"zoneout: got {len(rates)} rates, expected 1 or {n} (one per state)")
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 <= r < 1:
            raise ValueError(f"zoneout: got {r!r}, expected a number in [0, 1)")
    return tuple(float(r) for r in rates)


def _val(v) -> torch.Tensor:
    return v.value if isinstance(v, keras.Variable) else v


#: Keras's float dtype names -> torch's, for the checks of :meth:`_EngineLoop.call`
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32, "float64": torch.float64}


class _EngineLoop:
    """Mixin for ``keras.layers.RNN`` subclasses: ``inner_loop`` (the part of ``RNN.call`` that
    runs the cell over time) on gyre's engine. A subclass sets ``gyre_cell``, ``gyre_backend``,
    ``zoneout`` and implements ``_gyre_params``."""

    gyre_cell: _cells.Cell
    gyre_backend: str
    zoneout: tuple[float, ...]

    def _gyre_params(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    #: Keras's gate order -> the gyre cell's (torch's) gate order, for per-gate masks
    gate_order: tuple[int, ...] = (0,)

    def _dropout_masks(self, x0, h0, training):
        """Keras's masks for this batch: each None, one tensor, or (``implementation=1``) a list
        of one per gate in Keras's order."""
        kc = self.cell
        dp = rdp = None
        if training and 0 < kc.dropout < 1:
            dp = kc.get_dropout_mask(x0)
        if training and 0 < kc.recurrent_dropout < 1:
            rdp = kc.get_recurrent_dropout_mask(h0)
        return dp, rdp

    def call(self, sequences, initial_state=None, mask=None, training=False):
        """Keras's ``RNN.call``, with its common case taken directly: no initial state given,
        not stateful, no dropout (a Keras cell with dropout draws its masks from its seed
        generator on every call, training or not, which Keras's ``RNN.call`` does), one dtype
        for variables, computation and input. There ``RNN.call`` only makes zero states and
        converts and casts tensors that already have their dtype; this makes the zero states
        and returns what it returns. Every other call is Keras's own ``RNN.call``."""
        kc = self.cell
        dtype = self.compute_dtype
        if (initial_state is not None or self.stateful or self.unroll
                or getattr(kc, "dropout", 0) or getattr(kc, "recurrent_dropout", 0)
                or dtype != self.variable_dtype or not isinstance(sequences, torch.Tensor)
                or _TORCH_DTYPES.get(dtype) != sequences.dtype):
            return super().call(sequences, initial_state=initial_state, mask=mask,
                                training=training)
        sizes = kc.state_size if isinstance(kc.state_size, list | tuple) else [kc.state_size]
        B = sequences.shape[0]
        zeros = [sequences.new_zeros(B, s) for s in sizes]
        last, outputs, states = self.inner_loop(sequences, zeros, mask, training=training)
        output = outputs if self.return_sequences else last
        return (output, *states) if self.return_state else output

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if isinstance(mask, list | tuple):
            mask = mask[0]
        training = bool(training)
        initial_state = list(initial_state) if isinstance(initial_state, list | tuple) else [initial_state]
        initial_state = [_val(s) for s in initial_state]
        x = sequences  # (B, T, I)
        dp, rdp = self._dropout_masks(x[:, 0, :], initial_state[0], training)
        cell, backend = self.gyre_cell, self.gyre_backend
        if isinstance(dp, list | tuple) or isinstance(rdp, list | tuple):
            # one mask per gate (Keras's implementation=1): gate g's copy of the input, and its
            # recurrent mask, in the gyre cell's gate order
            order = self.gate_order
            if isinstance(dp, list | tuple):
                x = torch.cat([x * _val(dp[k]).unsqueeze(1) for k in order], dim=-1)
            if isinstance(rdp, list | tuple):
                rdp = torch.cat([_val(rdp[k]) for k in order], dim=-1)
            cell = _per_gate(cell, per_gate_input=isinstance(dp, list | tuple))
            backend = "reference"
        elif dp is not None:
            x = x * _val(dp).unsqueeze(1)
        x = x.transpose(0, 1)  # (T, B, I): the engine is time-major
        T, B = x.shape[:2]
        if mask is not None:
            mask = torch.as_tensor(mask, device=x.device).to(torch.bool)
        if self.go_backwards:  # Keras reverses the padded sequence (and its mask) as it is
            x = x.flip(0)
            mask = None if mask is None else mask.flip(1)
        lengths = valid = lens = None
        if mask is not None:
            valid = mask.t()  # (T, B)
            lens = valid.sum(0)
            steps = torch.arange(T, device=x.device)
            if not bool((valid == (steps[:, None] < lens[None, :])).all()):
                # unmasked steps to the front, in order: masked steps change nothing
                order = torch.sort((~valid).to(torch.int8), dim=0, stable=True).indices
                x = x.gather(0, order.unsqueeze(-1).expand_as(x))
            lengths = lens.clamp(min=1).cpu()
        hx = tuple(s.unsqueeze(0) for s in initial_state)
        result = engine.run(
            cell, [[self._gyre_params()]], x, hx, lengths=lengths,
            drop=None if rdp is None else [[_val(rdp)]], zone=self._zone(x, training),
            training=training, backend=backend,
        )
        out = result.output  # (T, B, O)
        states = [s[0] for s in result.state]
        last = out[-1]
        if valid is not None:
            count = valid.cumsum(0)  # valid steps up to and including t
            out = out.gather(0, (count - 1).clamp(min=0).unsqueeze(-1).expand_as(out))
            seen = (count > 0).unsqueeze(-1).to(out.dtype)
            last = out[-1] * seen[-1]
            keep = valid.unsqueeze(-1).to(out.dtype) if self.zero_output_for_mask else seen
            out = out * keep
            empty = (lens == 0).unsqueeze(-1)
            states = [torch.where(empty, s0, s) for s, s0 in zip(states, initial_state, strict=True)]
        return last, out.transpose(0, 1), states

    def _zone(self, x, training):
        if not any(self.zoneout):
            return None
        T, B = x.shape[:2]
        sizes = self.gyre_cell.state_sizes(self.units)
        if training:
            masks = tuple(None if r == 0 else x.new_empty(T, B, s).bernoulli_(r)
                          for r, s in zip(self.zoneout, sizes, strict=True))
        else:
            masks = tuple(None if r == 0 else x.new_tensor(r) for r in self.zoneout)
        return [[masks]]

    def _gyre_config(self) -> dict:
        return {"zoneout": list(self.zoneout), "backend": self.gyre_backend}


class _PerGate:
    """Mixin for a gated cell (LSTM, GRU) with one dropout mask per gate, as Keras's
    ``implementation=1``: with ``per_gate_input`` the input is ``G`` copies side by side
    ``(..., G*I)``, copy ``g`` masked for gate ``g``; ``drop`` is ``(B, G*H)``, block ``g`` the
    mask on ``h_{t-1}`` wherever it enters gate ``g``'s recurrent product (None: no mask).
    Parameters, gate order and the rest of the math are the cell's own."""

    per_gate_input: bool

    def _gate_products(self, v, w, b):
        """``W_g v_g (+ b_g)`` per gate, from ``v`` ``(..., G*K)`` and ``w`` ``(G*H, K)``."""
        vs = v.chunk(self.gates, dim=-1)
        ws = w.chunk(self.gates, dim=0)
        bs = (None,) * self.gates if b is None else b.chunk(self.gates, dim=-1)
        return torch.cat([F.linear(vg, wg, bg) for vg, wg, bg in zip(vs, ws, bs, strict=True)],
                         dim=-1)

    def input_preact(self, x, p):
        if not self.per_gate_input:
            return super().input_preact(x, p)
        bias = None if self.layer_norm else p.get("bias_ih")  # with layer norm: bias after LN
        return self._gate_products(x, p["weight_ih"], bias)

    def recurrent(self, h, p):
        """``h``: ``(B, G*H)``, gate g's (masked) copy of ``h_{t-1}`` in block g."""
        if not self.layer_norm:
            return self._gate_products(h, p["weight_hh"], p.get("bias_hh"))
        return _lstm_cells._ln(self._gate_products(h, p["weight_hh"], None), p["ln_hh_weight"],
                               p.get("bias_hh"))

    def step(self, xp, state, p, drop=None):
        h = state[0].repeat(1, self.gates)  # (B, G*H)
        if drop is not None:
            h = h * drop
        if getattr(self, "reset_after", True):
            return self.pointwise(xp, self.recurrent(h, p), state, p)
        # GRU, reset_after=False: n's product is W_hn (r * h_{t-1} * rdp_n)
        H = state[0].shape[-1]
        hr, hz, hn = h.chunk(3, dim=-1)
        w_r, w_z, w_n = p["weight_hh"].chunk(3, dim=0)
        b = p.get("bias_hh")
        b_r, b_z, b_n = (None,) * 3 if b is None else b.split(H)
        xr, xz, xn = xp.chunk(3, dim=-1)
        act = _acts.get(self.activation)
        gate = _acts.get(self.recurrent_activation)
        r = gate(xr + F.linear(hr, w_r, b_r))
        z = gate(xz + F.linear(hz, w_z, b_z))
        n = act(xn + F.linear(r * hn, w_n, b_n))
        return ((1 - z) * n + z * state[0],)


@dataclasses.dataclass(frozen=True)
class _PerGateLSTM(_PerGate, _cells.LSTM):
    per_gate_input: bool = False


@dataclasses.dataclass(frozen=True)
class _PerGateGRU(_PerGate, _cells.GRU):
    per_gate_input: bool = False


def _per_gate(cell, per_gate_input: bool):
    cls = {_cells.LSTM: _PerGateLSTM, _cells.GRU: _PerGateGRU}[type(cell)]
    fields = {f.name: getattr(cell, f.name) for f in dataclasses.fields(cell)}
    return cls(**fields, per_gate_input=per_gate_input)


def _zeros(b: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(b, requires_grad=False)


def _uniform(hidden: int):
    k = 1.0 / math.sqrt(hidden)
    return keras.initializers.RandomUniform(-k, k)


@_register
class LSTM(_EngineLoop, keras.layers.LSTM):
    """``keras.layers.LSTM`` (every argument, the same weights and semantics) run by gyre's
    engine, plus gyre's keywords: ``peephole`` (weights ``weight_ci, weight_cf, weight_co (H,)``),
    ``layer_norm`` (``ln_ih_weight (4H)``, ``ln_hh_weight (4H)``, ``ln_c_weight (H)``,
    ``ln_c_bias (H)``, gates in Keras's order ``i, f, c, o``; see :class:`gyre.cells.LSTM`),
    ``zoneout`` (a rate, or ``(h_rate, c_rate)``) and ``backend``."""

    gate_order = (0, 1, 2, 3)  # Keras's i, f, c, o == torch's i, f, g, o

    def __init__(self, units, *args, peephole: bool = False, layer_norm: bool = False,
                 zoneout: float | Sequence[float] = 0.0, backend: str = "auto", **kwargs):
        super().__init__(units, *args, **kwargs)
        self.peephole = bool(peephole)
        self.layer_norm = bool(layer_norm)
        self.zoneout = _zoneout(zoneout, 2)
        self.gyre_backend = _check_backend(backend)
        self.gyre_cell = _cells.LSTM(
            peephole=self.peephole, layer_norm=self.layer_norm,
            activation=_activation_name(self.cell.activation, "activation"),
            recurrent_activation=_activation_name(self.cell.recurrent_activation,
                                                  "recurrent_activation"))

    def build(self, sequences_shape, initial_state_shape=None):
        super().build(sequences_shape, initial_state_shape)
        H = self.units
        if self.peephole:
            for g in ("i", "f", "o"):
                setattr(self, f"weight_c{g}", self.add_weight(
                    shape=(H,), name=f"weight_c{g}", initializer=_uniform(H)))
        if self.layer_norm:
            self.ln_ih_weight = self.add_weight(shape=(4 * H,), name="ln_ih_weight", initializer="ones")
            self.ln_hh_weight = self.add_weight(shape=(4 * H,), name="ln_hh_weight", initializer="ones")
            self.ln_c_weight = self.add_weight(shape=(H,), name="ln_c_weight", initializer="ones")
            self.ln_c_bias = self.add_weight(shape=(H,), name="ln_c_bias", initializer="zeros")

    def _gyre_params(self):
        c = self.cell
        p = {"weight_ih": _val(c.kernel).t(), "weight_hh": _val(c.recurrent_kernel).t()}
        if c.use_bias:
            p["bias_ih"] = _val(c.bias)
            p["bias_hh"] = _zeros(p["bias_ih"])
        names = (["weight_ci", "weight_cf", "weight_co"] if self.peephole else []) + (
            ["ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias"] if self.layer_norm else [])
        for n in names:
            p[n] = _val(getattr(self, n))
        return p

    def get_config(self):
        return {**super().get_config(), "peephole": self.peephole, "layer_norm": self.layer_norm,
                **self._gyre_config()}


@_register
class GRU(_EngineLoop, keras.layers.GRU):
    """``keras.layers.GRU`` (every argument, ``reset_after`` both ways) run by gyre's engine,
    plus gyre's keywords ``layer_norm`` (``reset_after=True`` only; weights ``ln_ih_weight``,
    ``ln_hh_weight (3H)`` in Keras's gate order ``z, r, h``), ``zoneout`` and ``backend``."""

    def __init__(self, units, *args, layer_norm: bool = False,
                 zoneout: float | Sequence[float] = 0.0, backend: str = "auto", **kwargs):
        super().__init__(units, *args, **kwargs)
        self.layer_norm = bool(layer_norm)
        self.zoneout = _zoneout(zoneout, 1)
        self.gyre_backend = _check_backend(backend)
        self.gyre_cell = _cells.GRU(
            reset_after=self.cell.reset_after, layer_norm=self.layer_norm,
            activation=_activation_name(self.cell.activation, "activation"),
            recurrent_activation=_activation_name(self.cell.recurrent_activation,
                                                  "recurrent_activation"))

    def build(self, sequences_shape, initial_state_shape=None):
        super().build(sequences_shape, initial_state_shape)
        if self.layer_norm:
            self.ln_ih_weight = self.add_weight(shape=(3 * self.units,), name="ln_ih_weight",
                                                initializer="ones")
            self.ln_hh_weight = self.add_weight(shape=(3 * self.units,), name="ln_hh_weight",
                                                initializer="ones")

    gate_order = (1, 0, 2)  # Keras's z, r, h masks -> torch's r, z, n

    def _swap(self, m: torch.Tensor) -> torch.Tensor:
        """Keras's ``z, r, h`` blocks (last dim) in torch's ``r, z, n`` order."""
        H = self.units
        return torch.cat([m[..., H:2 * H], m[..., :H], m[..., 2 * H:]], dim=-1)

    def _gyre_params(self):
        c = self.cell
        p = {"weight_ih": self._swap(_val(c.kernel)).t(),
             "weight_hh": self._swap(_val(c.recurrent_kernel)).t()}
        if c.use_bias:
            b = self._swap(_val(c.bias))
            if c.reset_after:
                p["bias_ih"], p["bias_hh"] = b[0], b[1]
            else:
                p["bias_ih"], p["bias_hh"] = b, _zeros(b)
        if self.layer_norm:
            p["ln_ih_weight"] = self._swap(_val(self.ln_ih_weight))
            p["ln_hh_weight"] = self._swap(_val(self.ln_hh_weight))
        return p

    def get_config(self):
        return {**super().get_config(), "layer_norm": self.layer_norm, **self._gyre_config()}


@_register
class SimpleRNN(_EngineLoop, keras.layers.SimpleRNN):
    """``keras.layers.SimpleRNN`` run by gyre's engine, plus ``zoneout`` and ``backend``."""

    def __init__(self, units, *args, zoneout: float = 0.0, backend: str = "auto", **kwargs):
        super().__init__(units, *args, **kwargs)
        self.zoneout = _zoneout(zoneout, 1)
        self.gyre_backend = _check_backend(backend)
        self.gyre_cell = _cells.RNN(nonlinearity=_activation_name(self.cell.activation, "activation"))

    def _gyre_params(self):
        c = self.cell
        p = {"weight_ih": _val(c.kernel).t(), "weight_hh": _val(c.recurrent_kernel).t()}
        if c.bias is not None:
            p["bias_ih"] = _val(c.bias)
            p["bias_hh"] = _zeros(p["bias_ih"])
        return p

    def get_config(self):
        return {**super().get_config(), **self._gyre_config()}


@_register
class GyreCell(keras.layers.Layer):
    """A gyre cell (by name, with its options) as a Keras RNN cell: its parameters in gyre's own
    layout and names (``cell.param_specs``), gyre's initialisation, one step in :meth:`call`.
    :class:`Recurrent` runs it over time on the engine."""

    def __init__(self, cell: str, units: int, use_bias: bool = True, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, cell_options: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(cell, str):
            raise TypeError(f"cell: got {type(cell).__name__}, expected a cell name "
                            f"({', '.join(_cells.names())}) that Keras can save")
        if isinstance(units, bool) or not isinstance(units, numbers.Integral) or units < 1:
            raise ValueError(f"units: got {units!r}, expected an int >= 1")
        for arg, v in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
                raise ValueError(f"{arg}: got {v!r}, expected a number in [0, 1)")
        self.cell_name = cell
        self.cell_options = dict(cell_options or {})
        self.gyre_cell = _cells.get(cell, **self.cell_options)
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.dropout = float(dropout)
        self.recurrent_dropout = float(recurrent_dropout)
        sizes = list(self.gyre_cell.state_sizes(self.units))
        self.state_size = sizes if len(sizes) > 1 else sizes[0]
        self.output_size = self.gyre_cell.output_size(self.units)

    def build(self, input_shape):
        init = {"uniform": _uniform(self.units), "ones": "ones", "zeros": "zeros"}
        self.param_names = []
        for name, spec in self.gyre_cell.param_specs(input_shape[-1], self.units, self.use_bias).items():
            setattr(self, name, self.add_weight(shape=spec.shape, name=name, initializer=init[spec.init]))
            self.param_names.append(name)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: _val(getattr(self, n)) for n in self.param_names}

    def call(self, inputs, states, training=False):
        p = self.params()
        states = tuple(_val(s) for s in (states if isinstance(states, list | tuple) else [states]))
        new = self.gyre_cell.step(self.gyre_cell.input_preact(inputs, p), states, p)
        return self.gyre_cell.readout(new[0], p), list(new)

    def get_config(self):
        return {**super().get_config(), "cell": self.cell_name, "units": self.units,
                "use_bias": self.use_bias, "dropout": self.dropout,
                "recurrent_dropout": self.recurrent_dropout, "cell_options": self.cell_options}


@_register
class Recurrent(_EngineLoop, keras.layers.RNN):
    """Any gyre cell by name as a Keras layer: ``Recurrent("gru_cho", 64, return_sequences=True)``,
    options of the cell in ``cell_options`` (``{"proj_size": 16}``), Keras's ``RNN`` arguments
    (``return_sequences``, ``return_state``, ``go_backwards``, ``stateful``, masking) and gyre's
    ``dropout``, ``recurrent_dropout``, ``zoneout``, ``backend``. Weights are in gyre's layout
    and names (``weight_ih (G*H, I)``, ...), the order of ``cell.param_specs``."""

    def __init__(self, cell, units: int | None = None, *, use_bias: bool = True,
                 dropout: float = 0.0, recurrent_dropout: float = 0.0, cell_options: dict | None = None,
                 zoneout: float | Sequence[float] = 0.0, backend: str = "auto", seed=None, **kwargs):
        if not isinstance(cell, GyreCell):
            if units is None:
                raise ValueError("units: got None, expected an int >= 1")
            cell = GyreCell(cell, units, use_bias=use_bias, dropout=dropout,
                            recurrent_dropout=recurrent_dropout, cell_options=cell_options)
        super().__init__(cell, **kwargs)
        self.gyre_cell = cell.gyre_cell
        self.zoneout = _zoneout(zoneout, len(self.gyre_cell.state_names))
        self.gyre_backend = _check_backend(backend)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.seed = seed

    @property
    def units(self):
        return self.cell.units

    def _dropout_masks(self, x0, h0, training):
        kc = self.cell

        def draw(t, rate):
            return keras.random.dropout(torch.ones_like(t), rate, seed=self.seed_generator)

        dp = draw(x0, kc.dropout) if training and kc.dropout > 0 else None
        rdp = draw(h0, kc.recurrent_dropout) if training and kc.recurrent_dropout > 0 else None
        return dp, rdp

    def _gyre_params(self):
        return self.cell.params()

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, **self._gyre_config()}
