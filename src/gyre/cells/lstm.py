"""Long short-term memory cells: standard, peephole, projection, layer norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from . import activations
from .base import Cell, ParamSpec, _drop_bias

LN_EPS = 1e-5


def _ln(v: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.layer_norm(v, (v.shape[-1],), weight, bias, LN_EPS)


class LayerNormProducts(Cell):
    """Mixin for cells with a ``layer_norm`` field: when set, the input and the recurrent matrix
    products are each normalised over their whole gate vector and scaled by ``ln_ih_weight`` /
    ``ln_hh_weight`` before ``bias_ih`` / ``bias_hh`` are added (Ba et al. 2016). With layer
    norm, :meth:`input_preact` is the bare product ``W_ih x`` and a subclass's ``pointwise``
    starts from :meth:`input_norm` of it."""

    layer_norm: bool

    def input_preact(self, x, p):
        if not self.layer_norm:
            return super().input_preact(x, p)
        # the product only: its layer norm and bias come per step in pointwise (input_norm),
        # where the fused backend compiles them into its loop (a pass over all steps' products
        # in torch ops cost more than the rest of the input side together)
        return F.linear(x, p["weight_ih"])

    def input_norm(self, xp, p):
        """``A(W_ih x) + b_ih`` from :meth:`input_preact`'s ``W_ih x`` with ``layer_norm``
        (the bias as layer norm's shift); ``xp`` itself otherwise. Called by ``pointwise``."""
        if not self.layer_norm:
            return xp
        return _ln(xp, p["ln_ih_weight"], p.get("bias_ih"))

    def recurrent(self, h, p):
        if not self.layer_norm:
            return super().recurrent(h, p)
        return _ln(F.linear(h, p["weight_hh"]), p["ln_hh_weight"], p.get("bias_hh"))


@dataclass(frozen=True)
class LSTM(LayerNormProducts):
    r"""LSTM, as ``torch.nn.LSTM``, with optional peepholes, projection and layer norm.

    Gate order in ``weight_ih (4H, I)``, ``weight_hh (4H, R)``, ``bias_ih``, ``bias_hh``:
    ``i, f, g, o`` (torch's). ``R`` is ``proj_size`` when set, else ``H``.

    .. math::
        a_t = A(W_{ih} x_t) + b_{ih} + B(W_{hh} h_{t-1}) + b_{hh}
              \quad\text{split into } a^i, a^f, a^g, a^o

        i_t = \sigma(a^i_t + w_{ci} \odot c_{t-1})\qquad
        f_t = \sigma(a^f_t + w_{cf} \odot c_{t-1})\qquad
        g_t = \phi(a^g_t)

        c_t = f_t \odot c_{t-1} + i_t \odot g_t

        o_t = \sigma(a^o_t + w_{co} \odot c_t)

        h_t = W_{hr}\,(o_t \odot \phi(C(c_t)))

    * ``activation`` names :math:`\phi` (default ``"tanh"``) and ``recurrent_activation`` the
      gates' :math:`\sigma` (default ``"sigmoid"``), as Keras's arguments of the same names;
      any name in :data:`gyre.cells.activations.ACTIVATIONS`. torch's kernels run only the
      defaults.

    * ``peephole=False``: the ``w_c*`` terms are absent. With ``peephole=True`` they are the
      diagonal peephole weights ``weight_ci, weight_cf, weight_co (H)`` of Gers & Schmidhuber
      (2000) and reference text 001: ``i`` and ``f`` see ``c_{t-1}``, ``o`` sees ``c_t``.
    * ``proj_size=0``: ``W_{hr}`` is the identity; else ``weight_hr (P, H)`` as torch.
    * ``layer_norm=False``: ``A``, ``B``, ``C`` are the identity. With ``layer_norm=True``
      (Ba et al. 2016, section 6): ``A(v) = ln_ih_weight * LN(v)`` and
      ``B(v) = ln_hh_weight * LN(v)`` normalise the whole ``4H`` input and recurrent
      pre-activations separately (no shift of their own: ``b_ih + b_hh`` is the shift), and
      ``C(c) = ln_c_weight * LN(c) + ln_c_bias`` normalises the cell state before the output
      ``tanh`` (the state carried to the next step is the un-normalised ``c_t``).
      ``LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5)`` over features, biased variance.
    """

    peephole: bool = False
    proj_size: int = 0
    layer_norm: bool = False
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    name = "lstm"
    gates = 4
    state_names = ("h", "c")

    def __post_init__(self):
        activations.check(self.activation, "activation")
        activations.check(self.recurrent_activation, "recurrent_activation")
        if not isinstance(self.proj_size, int) or self.proj_size < 0:
            raise ValueError(f"proj_size: got {self.proj_size!r}, expected an int >= 0")

    def state_sizes(self, hidden_size):
        if self.proj_size >= hidden_size:
            raise ValueError(
                f"proj_size: got {self.proj_size}, expected less than hidden_size={hidden_size}"
            )
        return (self.proj_size or hidden_size, hidden_size)

    def param_specs(self, input_size, hidden_size, bias=True):
        specs = super().param_specs(input_size, hidden_size, bias=True)
        h4 = 4 * hidden_size
        if self.proj_size:
            specs["weight_hr"] = ParamSpec((self.proj_size, hidden_size))
        if self.peephole:
            for gate in ("i", "f", "o"):
                specs[f"weight_c{gate}"] = ParamSpec((hidden_size,))
        if self.layer_norm:
            specs["ln_ih_weight"] = ParamSpec((h4,), init="ones")
            specs["ln_hh_weight"] = ParamSpec((h4,), init="ones")
            specs["ln_c_weight"] = ParamSpec((hidden_size,), init="ones")
            specs["ln_c_bias"] = ParamSpec((hidden_size,), init="zeros")
        return _drop_bias(specs, bias)

    def pointwise(self, xp, hp, state, p):
        _, c = state
        ai, af, ag, ao = (self.input_norm(xp, p) + hp).chunk(4, dim=-1)
        if self.peephole:
            ai = ai + p["weight_ci"] * c
            af = af + p["weight_cf"] * c
        act, gate = activations.get(self.activation), activations.get(self.recurrent_activation)
        i, f, g = gate(ai), gate(af), act(ag)
        c_new = f * c + i * g
        if self.peephole:
            ao = ao + p["weight_co"] * c_new
        c_out = _ln(c_new, p["ln_c_weight"], p["ln_c_bias"]) if self.layer_norm else c_new
        o = gate(ao)
        h_new = o * act(c_out)
        if self.proj_size:
            h_new = F.linear(h_new, p["weight_hr"])
        return (h_new, c_new)

    def describe(self):
        parts = [n for n, on in (("peephole", self.peephole), ("layer_norm", self.layer_norm)) if on]
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
        parts += activations.describe(self)
        return "lstm" + (f"({', '.join(parts)})" if parts else "")
