"""Minimal recurrences of Feng et al. (2024), "Were RNNs All We Needed?": no recurrent weights,
linear in the state, so a parallel scan can compute them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Cell, Params, ParamSpec, _drop_bias


def _log_sigmoid(x: Tensor) -> Tensor:
    """``log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))`` with ``min(x, 0) = (x - |x|) / 2``;
    finite for every finite ``x``."""
    return (x - x.abs()) * 0.5 - torch.log(1 + torch.exp(-x.abs()))


@dataclass(frozen=True)
class MinGRU(Cell):
    r"""minGRU (Feng et al. 2024, section 3.1.3). Gate order in ``weight_ih (2H, I)``,
    ``bias_ih (2H)``: ``z, h~``.

    .. math::
        z_t = \sigma(W_{iz} x_t + b_{iz})\qquad \tilde h_t = W_{ih} x_t + b_{ih}

        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t

    There is no recurrent matrix, so recurrent dropout has nothing to act on and is ignored.
    The step is :meth:`linear_form`'s ``a_t * h_{t-1} + b_t``, which the ``scan`` backend solves
    for all steps at once.
    """

    name = "mingru"
    gates = 2

    def param_specs(self, input_size, hidden_size, bias=True):
        return _drop_bias({
            "weight_ih": ParamSpec((2 * hidden_size, input_size)),
            "bias_ih": ParamSpec((2 * hidden_size,), bias=True),
        }, bias)

    def linear_form(self, xp: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        """``(a_t, b_t)`` with ``h_t = a_t * h_{t-1} + b_t``: ``a = 1 - z``, ``b = z * h~``.
        ``xp`` may carry any leading dims (the ``scan`` backend passes all steps at once)."""
        az, h_tilde = xp.chunk(2, dim=-1)
        z = torch.sigmoid(az)
        return 1 - z, z * h_tilde

    def step(self, xp, state, p, drop=None):
        a, b = self.linear_form(xp, p)
        return (a * state[0] + b,)


@dataclass(frozen=True)
class MinLSTM(Cell):
    r"""minLSTM (Feng et al. 2024, section 3.2.3). Gate order in ``weight_ih (3H, I)``,
    ``bias_ih (3H)``: ``f, i, h~``.

    .. math::
        f_t = \sigma(W_{if} x_t + b_{if})\qquad i_t = \sigma(W_{ii} x_t + b_{ii})\qquad
        \tilde h_t = W_{ih} x_t + b_{ih}

        f'_t = f_t / (f_t + i_t)\qquad i'_t = i_t / (f_t + i_t)

        h_t = f'_t \odot h_{t-1} + i'_t \odot \tilde h_t

    The step is :meth:`linear_form`'s ``a_t * h_{t-1} + b_t`` (no recurrent matrix: recurrent
    dropout is ignored), which the ``scan`` backend solves for all steps at once.
    """

    name = "minlstm"
    gates = 3

    def param_specs(self, input_size, hidden_size, bias=True):
        return _drop_bias({
            "weight_ih": ParamSpec((3 * hidden_size, input_size)),
            "bias_ih": ParamSpec((3 * hidden_size,), bias=True),
        }, bias)

    def linear_form(self, xp: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        """``(a_t, b_t)`` with ``h_t = a_t * h_{t-1} + b_t``: ``a = f'``, ``b = i' * h~``.
        ``xp`` may carry any leading dims (the ``scan`` backend passes all steps at once)."""
        af, ai, h_tilde = xp.chunk(3, dim=-1)
        # f / (f + i) = sigmoid(log f - log i): the same value, but finite when both gates
        # underflow (f + i = 0 gave 0/0 = NaN below about -88 in float32)
        d = _log_sigmoid(af) - _log_sigmoid(ai)
        return torch.sigmoid(d), torch.sigmoid(-d) * h_tilde

    def step(self, xp, state, p, drop=None):
        a, b = self.linear_form(xp, p)
        return (a * state[0] + b,)
