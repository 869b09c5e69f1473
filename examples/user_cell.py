"""A user-defined cell, written outside gyre, running in every gyre layer and backend.

The cell is the "multiplicative integration" RNN of Wu et al. (2016):

    h_t = tanh(a * (W_ih x_t) * (W_hh h_{t-1}) + b1 * W_ih x_t + b2 * W_hh h_{t-1} + b)

Only the math is written: gyre computes ``W_ih x_t`` for all steps in one matrix product, the
recurrent product per step, stacking, directions, lengths, dropout and streaming.

Run: ``.venv/bin/python examples/user_cell.py``
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gyre.cells import Cell, ParamSpec
from gyre.nn import Recurrent


@dataclass(frozen=True)
class MIRNN(Cell):
    r"""Multiplicative-integration RNN (Wu et al. 2016).

    .. math::
        h_t = \tanh(\alpha \odot u_t \odot v_t + \beta_1 \odot u_t + \beta_2 \odot v_t + b),\quad
        u_t = W_{ih} x_t,\ v_t = W_{hh} h_{t-1}

    Parameters: ``weight_ih (H, I)``, ``weight_hh (H, H)``, ``alpha, beta1, beta2, bias (H)``.
    """

    name = "mi_rnn"
    gates = 1

    def param_specs(self, input_size, hidden_size, bias=True):
        specs = {
            "weight_ih": ParamSpec((hidden_size, input_size)),
            "weight_hh": ParamSpec((hidden_size, hidden_size)),
            "alpha": ParamSpec((hidden_size,), init="ones"),
            "beta1": ParamSpec((hidden_size,), init="ones"),
            "beta2": ParamSpec((hidden_size,), init="ones"),
        }
        if bias:
            specs["bias"] = ParamSpec((hidden_size,), init="zeros", bias=True)
        return specs

    def input_preact(self, x, p):
        return F.linear(x, p["weight_ih"])

    def recurrent(self, h, p):
        return F.linear(h, p["weight_hh"])

    def pointwise(self, xp, hp, state, p):
        pre = p["alpha"] * xp * hp + p["beta1"] * xp + p["beta2"] * hp
        if "bias" in p:
            pre = pre + p["bias"]
        return (torch.tanh(pre),)


def main() -> None:
    torch.manual_seed(0)
    layer = Recurrent(MIRNN(), input_size=8, hidden_size=16, num_layers=2, bidirectional=True,
                      batch_first=True, recurrent_dropout=0.1, zoneout=0.1)
    x = torch.randn(4, 20, 8)
    out, h_n = layer(x, lengths=[20, 17, 9, 3])
    out.sum().backward()
    print("output", tuple(out.shape), "h_n", tuple(h_n.shape),
          "grad norm", float(layer.weight_hh_l0.grad.norm()))


if __name__ == "__main__":
    main()
