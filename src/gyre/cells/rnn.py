"""Vanilla recurrent cells."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import ACTIVATIONS as _ACTIVATIONS
from .activations import check as _activation
from .base import Cell, Params, ParamSpec, State, _drop_bias


@dataclass(frozen=True)
class RNN(Cell):
    r"""Elman RNN, as ``torch.nn.RNN``.

    .. math::
        h_t = \phi(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})

    ``nonlinearity`` names :math:`\phi`: torch's ``"tanh"`` or ``"relu"``, or any other name in
    :data:`gyre.cells.activations.ACTIVATIONS` (``"linear"``, ``"sigmoid"``, ...; torch's own
    kernels run only the first two).
    Parameters: ``weight_ih (H, I)``, ``weight_hh (H, H)``, ``bias_ih (H)``, ``bias_hh (H)``.
    """

    nonlinearity: str = "tanh"
    name = "rnn"
    gates = 1

    def __post_init__(self):
        _activation(self.nonlinearity, "nonlinearity")

    def pointwise(self, xp: Tensor, hp: Tensor, state: State, p: Params) -> State:
        return (_ACTIVATIONS[self.nonlinearity](xp + hp),)


@dataclass(frozen=True)
class OutputRNN(Cell):
    r"""RNN with an output layer, as written in reference texts 000, 002 and 003.

    .. math::
        h_t = f(W_{hh} h_{t-1} + W_{xh} x_t + b_h)

        y_t = g(W_{hy} h_t + b_y)

    ``f`` is ``activation``, a name in :data:`gyre.cells.activations.ACTIVATIONS`; ``g`` is
    ``"softmax"`` (over features) or ``"identity"``.
    Parameters: ``weight_xh (H, I)``, ``weight_hh (H, H)``, ``bias_h (H)``,
    ``weight_hy (O, H)``, ``bias_y (O)``. The layer's output is ``y``; its state is ``h``.
    ``y`` is computed after the loop for all steps in one matrix product.
    """

    out_features: int = 0
    activation: str = "tanh"
    output_activation: str = "identity"
    name = "rnn_output"
    gates = 1

    def __post_init__(self):
        _activation(self.activation, "activation")
        if self.output_activation not in ("softmax", "identity"):
            raise ValueError(
                f"output_activation: got {self.output_activation!r}, expected 'softmax' or 'identity'"
            )
        if not isinstance(self.out_features, int) or self.out_features < 0:
            raise ValueError(f"out_features: got {self.out_features!r}, expected an int >= 0 "
                             "(0 means the hidden size)")

    def _out(self, hidden_size: int) -> int:
        return self.out_features or hidden_size

    def param_specs(self, input_size, hidden_size, bias=True):
        o = self._out(hidden_size)
        return _drop_bias({
            "weight_xh": ParamSpec((hidden_size, input_size)),
            "weight_hh": ParamSpec((hidden_size, hidden_size)),
            "bias_h": ParamSpec((hidden_size,), bias=True),
            "weight_hy": ParamSpec((o, hidden_size)),
            "bias_y": ParamSpec((o,), bias=True),
        }, bias)

    def output_size(self, hidden_size: int) -> int:
        return self._out(hidden_size)

    def input_preact(self, x, p):
        return F.linear(x, p["weight_xh"], p.get("bias_h"))

    def recurrent(self, h, p):
        return F.linear(h, p["weight_hh"])

    def pointwise(self, xp, hp, state, p):
        return (_ACTIVATIONS[self.activation](hp + xp),)

    def readout(self, h, p):
        y = F.linear(h, p["weight_hy"], p.get("bias_y"))
        return torch.softmax(y, dim=-1) if self.output_activation == "softmax" else y
