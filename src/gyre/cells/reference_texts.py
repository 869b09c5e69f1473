"""Recurrences exactly as written in the project's reference texts (../shared/reference-texts).

These are not the textbook cells: each differs from LSTM/GRU in where a gate or bias enters.
They are kept as named cells so that a result quoted from those texts can be reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Cell, ParamSpec, _drop_bias


def _gated_specs(gates: int, input_size: int, hidden_size: int) -> dict[str, ParamSpec]:
    gh = gates * hidden_size
    return {
        "weight_ih": ParamSpec((gh, input_size)),
        "weight_hh": ParamSpec((gh, hidden_size)),
        "bias": ParamSpec((gh,), bias=True),
    }


@dataclass(frozen=True)
class Gated004(Cell):
    r"""Gated cell without a cell state, reference text 004 (its section 3, steps a-e).

    Gate order in ``weight_ih (4H, I)`` (the ``W``), ``weight_hh (4H, H)`` (the ``U``) and
    ``bias (4H)``: ``i, f, o, c``.

    .. math::
        i_t = \sigma(W_i x_t + U_i h_{t-1} + b_i)\qquad
        f_t = \sigma(W_f x_t + U_f h_{t-1} + b_f)\qquad
        o_t = \sigma(W_o x_t + U_o h_{t-1} + b_o)

        \tilde h_t = \tanh(W_c x_t + U_c (f_t \odot h_{t-1}) + b_c)

        h_t = o_t \odot \tanh(h_{t-1}) + i_t \odot \tilde h_t
    """

    name = "gated_004"
    gates = 4

    def param_specs(self, input_size, hidden_size, bias=True):
        return _drop_bias(_gated_specs(4, input_size, hidden_size), bias)

    def input_preact(self, x, p):
        return F.linear(x, p["weight_ih"], p.get("bias"))

    def step(self, xp, state, p, drop=None):
        (h,) = state
        hd = h if drop is None else h * drop
        u_ifo, u_c = p["weight_hh"].split([3 * h.shape[-1], h.shape[-1]])
        xi, xf, xo, xc = xp.chunk(4, dim=-1)
        hi, hf, ho = F.linear(hd, u_ifo).chunk(3, dim=-1)
        i, f, o = torch.sigmoid(xi + hi), torch.sigmoid(xf + hf), torch.sigmoid(xo + ho)
        h_tilde = torch.tanh(xc + F.linear(f * hd, u_c))
        return (o * torch.tanh(h) + i * h_tilde,)


@dataclass(frozen=True)
class GRU001(Cell):
    r"""GRU variant of reference text 001 (section 3.4).

    Gate order in ``weight_ih (3H, I)`` (the ``W_x*``), ``weight_hh (3H, H)`` (the ``W_h*``) and
    ``bias (3H)``: ``z, r, h~``.

    .. math::
        z_t = \sigma(W_{xz} x_t + W_{hz} h_{t-1} + b_z)\qquad
        r_t = \sigma(W_{xr} x_t + W_{hr} h_{t-1} + b_r)

        \tilde h_t = \tanh((W_{x\tilde h} x_t) \odot r_t + (W_{h\tilde h} h_{t-1}) \odot (1 - z_t)
                     + b_{\tilde h})

        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t

    The bias of ``h~`` is added after the gate products, so the input pre-activation carries no
    bias; all three biases are added in the step.
    """

    name = "gru_001"
    gates = 3

    def param_specs(self, input_size, hidden_size, bias=True):
        return _drop_bias(_gated_specs(3, input_size, hidden_size), bias)

    def input_preact(self, x, p):
        return F.linear(x, p["weight_ih"])

    def recurrent(self, h, p):
        return F.linear(h, p["weight_hh"])

    def pointwise(self, xp, hp, state, p):
        (h,) = state
        b = p.get("bias")
        bz, br, bh = (0.0, 0.0, 0.0) if b is None else b.chunk(3, dim=-1)
        xz, xr, xh = xp.chunk(3, dim=-1)
        hz, hr, hh = hp.chunk(3, dim=-1)
        z = torch.sigmoid(xz + hz + bz)
        r = torch.sigmoid(xr + hr + br)
        h_tilde = torch.tanh(xh * r + hh * (1 - z) + bh)
        return ((1 - z) * h + z * h_tilde,)


@dataclass(frozen=True)
class GRU002(Cell):
    r"""GRU variant of reference text 002 (its GRU section).

    Gate order in ``weight_ih (3H, I)``, ``weight_hh (3H, H)`` and ``bias (3H)``: ``z, r, h~``;
    ``bias_h (H)`` is the ``b_h`` inside the candidate's recurrent product.

    .. math::
        z_t = \sigma(W_{xz} x_t + W_{hz} h_{t-1} + b_z)\qquad
        r_t = \sigma(W_{xr} x_t + W_{hr} h_{t-1} + b_r)

        \tilde h_t = \tanh(W_{x\tilde h} x_t + W_{h\tilde h}((1 - r_t) \odot h_{t-1}
                     + r_t \odot b_h) + b_{\tilde h})

        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t

    With ``bias=False`` every bias, ``b_h`` included, is absent.
    """

    name = "gru_002"
    gates = 3

    def param_specs(self, input_size, hidden_size, bias=True):
        specs = _gated_specs(3, input_size, hidden_size)
        specs["bias_h"] = ParamSpec((hidden_size,), bias=True)
        return _drop_bias(specs, bias)

    def input_preact(self, x, p):
        return F.linear(x, p["weight_ih"], p.get("bias"))

    def step(self, xp, state, p, drop=None):
        (h,) = state
        hd = h if drop is None else h * drop
        w_zr, w_h = p["weight_hh"].split([2 * h.shape[-1], h.shape[-1]])
        xz, xr, xh = xp.chunk(3, dim=-1)
        hz, hr = F.linear(hd, w_zr).chunk(2, dim=-1)
        z, r = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
        mixed = (1 - r) * hd if "bias_h" not in p else (1 - r) * hd + r * p["bias_h"]
        h_tilde = torch.tanh(xh + F.linear(mixed, w_h))
        return ((1 - z) * h + z * h_tilde,)
