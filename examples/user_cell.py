"""A user-defined cell, written outside gyre, running in every gyre layer and backend.

The cell is the "multiplicative integration" RNN of Wu et al. (2016):

    h_t = tanh(a * (W_ih x_t) * (W_hh h_{t-1}) + b1 * W_ih x_t + b2 * W_hh h_{t-1} + b)

Only the math is written: gyre computes ``W_ih x_t`` for all steps in one matrix product, the
recurrent product per step, stacking, directions, lengths, dropout and streaming. The code from
``from dataclasses`` to ``layer = ...`` is the README's snippet, verbatim (a test checks it).

Run: ``.venv/bin/python examples/user_cell.py``
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gyre.cells import Cell, ParamSpec
from gyre.nn import Recurrent


@dataclass(frozen=True)
class MIRNN(Cell):
    """h_t = tanh(alpha*u*v + beta1*u + beta2*v + b), u = W_ih x_t, v = W_hh h_{t-1}"""

    name = "mi_rnn"
    gates = 1

    def param_specs(self, input_size, hidden_size, bias=True):
        return {"weight_ih": ParamSpec((hidden_size, input_size)),
                "weight_hh": ParamSpec((hidden_size, hidden_size)),
                "alpha": ParamSpec((hidden_size,), init="ones"),
                "beta1": ParamSpec((hidden_size,), init="ones"),
                "beta2": ParamSpec((hidden_size,), init="ones"),
                # bias=True: a layer built with bias=False leaves it out
                "bias": ParamSpec((hidden_size,), init="zeros", bias=True)}

    def input_preact(self, x, p):          # all time steps at once
        return F.linear(x, p["weight_ih"])

    def recurrent(self, h, p):             # once per step
        return F.linear(h, p["weight_hh"])

    def pointwise(self, xp, hp, state, p):  # elementwise: pre-activations, old state -> new state
        pre = p["alpha"] * xp * hp + p["beta1"] * xp + p["beta2"] * hp
        return (torch.tanh(pre + p["bias"] if "bias" in p else pre),)


layer = Recurrent(MIRNN(), input_size=8, hidden_size=16, num_layers=2, bidirectional=True)


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
