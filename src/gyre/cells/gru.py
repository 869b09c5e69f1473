"""Gated recurrent units in both conventions."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from . import activations
from .base import ParamSpec, _drop_bias
from .lstm import LayerNormProducts


@dataclass(frozen=True)
class GRU(LayerNormProducts):
    r"""GRU in torch's convention (``reset_after=True``, as ``torch.nn.GRU`` and cuDNN) or the
    original Cho et al. (2014) convention (``reset_after=False``); optional layer norm.

    Gate order in ``weight_ih (3H, I)``, ``weight_hh (3H, H)``, ``bias_ih``, ``bias_hh``:
    ``r, z, n`` (torch's).

    .. math::
        r_t = \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr})

        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})

        n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn}))
              \quad\text{reset\_after=True}

        n_t = \tanh(W_{in} x_t + b_{in} + W_{hn} (r_t \odot h_{t-1}) + b_{hn})
              \quad\text{reset\_after=False}

        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}

    ``activation`` names the candidate's nonlinearity (``tanh`` above, the default) and
    ``recurrent_activation`` the gates' :math:`\sigma` (default ``"sigmoid"``), as Keras's
    arguments of the same names; any name in :data:`gyre.cells.activations.ACTIVATIONS`.
    torch's kernels run only the defaults.

    ``layer_norm=True`` (reset_after only) replaces ``W_{ih} x_t`` by
    ``ln_ih_weight * LN(W_{ih} x_t)`` and ``W_{hh} h_{t-1}`` by ``ln_hh_weight * LN(W_{hh} h_{t-1})``,
    each normalised over its whole ``3H`` vector before the biases are added (Ba et al. 2016).
    """

    reset_after: bool = True
    layer_norm: bool = False
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    name = "gru"
    gates = 3

    def __post_init__(self):
        activations.check(self.activation, "activation")
        activations.check(self.recurrent_activation, "recurrent_activation")
        if self.layer_norm and not self.reset_after:
            raise ValueError("layer_norm: got True with reset_after=False; layer norm is defined "
                             "for the reset_after=True (torch) convention only")

    def param_specs(self, input_size, hidden_size, bias=True):
        specs = super().param_specs(input_size, hidden_size, bias=True)
        if self.layer_norm:
            specs["ln_ih_weight"] = ParamSpec((3 * hidden_size,), init="ones")
            specs["ln_hh_weight"] = ParamSpec((3 * hidden_size,), init="ones")
        return _drop_bias(specs, bias)

    def pointwise(self, xp, hp, state, p):
        (h,) = state
        xr, xz, xn = self.input_norm(xp, p).chunk(3, dim=-1)
        hr, hz, hn = hp.chunk(3, dim=-1)
        act, gate = activations.get(self.activation), activations.get(self.recurrent_activation)
        r = gate(xr + hr)
        z = gate(xz + hz)
        n = act(xn + r * hn)
        return ((1 - z) * n + z * h,)

    def step(self, xp, state, p, drop=None):
        if self.reset_after:
            return super().step(xp, state, p, drop)
        (h,) = state
        hd = h if drop is None else h * drop
        w_rz, w_n = p["weight_hh"].split([2 * h.shape[-1], h.shape[-1]])
        b = p.get("bias_hh")
        b_rz, b_n = (None, None) if b is None else b.split([2 * h.shape[-1], h.shape[-1]])
        xr, xz, xn = xp.chunk(3, dim=-1)
        hr, hz = F.linear(hd, w_rz, b_rz).chunk(2, dim=-1)
        act, gate = activations.get(self.activation), activations.get(self.recurrent_activation)
        r = gate(xr + hr)
        z = gate(xz + hz)
        n = act(xn + F.linear(r * hd, w_n, b_n))
        return ((1 - z) * n + z * h,)

    def describe(self):
        acts = activations.describe(self)
        return "gru" + ("" if self.reset_after else "(reset_after=False)") + (
            "(layer_norm)" if self.layer_norm else "") + (f"({', '.join(acts)})" if acts else "")

