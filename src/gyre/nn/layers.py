"""``gyre.nn.RNN``, ``LSTM``, ``GRU``: drop-in replacements for ``torch.nn``'s, with the gyre
extras (``lengths=``, residual, recurrent dropout, zoneout, ``step()``, peepholes, layer norm)."""

from __future__ import annotations

from collections.abc import Sequence

from ..cells import GRU as GRUCell
from ..cells import LSTM as LSTMCell
from ..cells import RNN as RNNCell
from .recurrent import Recurrent


class RNN(Recurrent):
    r"""Elman RNN, ``torch.nn.RNN``'s signature and parameters (see :class:`gyre.cells.RNN`);
    ``nonlinearity`` also takes every name in :data:`gyre.cells.activations.ACTIVATIONS`."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 residual: bool = False, recurrent_dropout: float = 0.0,
                 zoneout: float | Sequence[float] = 0.0, backend: str = "auto",
                 proj_size: int | None = None) -> None:
        _no_projection(proj_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: Unknown nonlinearity {nonlinearity!r}. Select from "
                             "'tanh' or 'relu'.")
        super().__init__(RNNCell(nonlinearity=nonlinearity), input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, residual=residual,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout, backend=backend,
                         device=device, dtype=dtype)
        self.nonlinearity = nonlinearity


class LSTM(Recurrent):
    r"""LSTM, ``torch.nn.LSTM``'s signature and parameters (see :class:`gyre.cells.LSTM`), plus
    ``peephole=``, ``layer_norm=``, ``activation=`` (cell input and output, default tanh) and
    ``recurrent_activation=`` (the gates, default sigmoid)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, peephole: bool = False,
                 layer_norm: bool = False, residual: bool = False, recurrent_dropout: float = 0.0,
                 zoneout: float | Sequence[float] = 0.0, backend: str = "auto",
                 activation: str = "tanh", recurrent_activation: str = "sigmoid") -> None:
        if isinstance(proj_size, int) and not isinstance(proj_size, bool) and proj_size < 0:
            raise ValueError(f"proj_size should be a positive integer or zero to disable "
                             f"projections, got {proj_size}")
        super().__init__(LSTMCell(peephole=peephole, proj_size=proj_size, layer_norm=layer_norm,
                                  activation=activation, recurrent_activation=recurrent_activation),
                         input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, residual=residual, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout, backend=backend, device=device, dtype=dtype)
        self.proj_size = proj_size


class GRU(Recurrent):
    r"""GRU, ``torch.nn.GRU``'s signature and parameters (see :class:`gyre.cells.GRU`), plus
    ``reset_after=False`` for the original Cho et al. (2014) convention, ``layer_norm=``,
    ``activation=`` (the candidate, default tanh) and ``recurrent_activation=`` (the gates,
    default sigmoid)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, reset_after: bool = True, layer_norm: bool = False,
                 residual: bool = False, recurrent_dropout: float = 0.0,
                 zoneout: float | Sequence[float] = 0.0, backend: str = "auto",
                 proj_size: int | None = None, activation: str = "tanh",
                 recurrent_activation: str = "sigmoid") -> None:
        _no_projection(proj_size)
        super().__init__(GRUCell(reset_after=reset_after, layer_norm=layer_norm, activation=activation,
                                 recurrent_activation=recurrent_activation), input_size,
                         hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         residual=residual, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
                         backend=backend, device=device, dtype=dtype)


def _no_projection(proj_size) -> None:
    """``proj_size`` is accepted by name, as torch's ``RNN`` and ``GRU`` accept it, to refuse it
    with torch's ``ValueError``."""
    if proj_size is not None:
        raise ValueError(f"proj_size: got {proj_size!r}; proj_size argument is only supported for "
                         "LSTM, not RNN or GRU")
