"""Cells: each recurrence's math, written once.

``get(name)`` builds a built-in cell by name; a user cell subclasses :class:`Cell` (see
``examples/user_cell.py``) and is passed as an instance wherever a name is accepted.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Cell, Params, ParamSpec, State, init_parameter, layer_specs
from .gru import GRU
from .lstm import LSTM
from .minimal import MinGRU, MinLSTM
from .reference_texts import GRU001, GRU002, Gated004
from .rnn import RNN, OutputRNN

#: name -> factory(**options) of every built-in cell
REGISTRY: dict[str, Callable[..., Cell]] = {
    "rnn": RNN,
    "rnn_tanh": lambda **kw: RNN(nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: RNN(nonlinearity="relu", **kw),
    "rnn_output": OutputRNN,
    "lstm": LSTM,
    "peephole": lambda **kw: LSTM(peephole=True, **kw),
    "ln_lstm": lambda **kw: LSTM(layer_norm=True, **kw),
    "gru": GRU,
    "gru_cho": lambda **kw: GRU(reset_after=False, **kw),
    "ln_gru": lambda **kw: GRU(layer_norm=True, **kw),
    "gated_004": Gated004,
    "gru_001": GRU001,
    "gru_002": GRU002,
    "mingru": MinGRU,
    "minlstm": MinLSTM,
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get(cell: str | Cell, **options) -> Cell:
    """A cell from its name (with options, e.g. ``get("lstm", proj_size=16)``) or as given."""
    if isinstance(cell, Cell):
        if options:
            raise TypeError(f"cell: options {sorted(options)} given with a Cell instance; "
                            "set them on the instance instead")
        return cell
    if not isinstance(cell, str):
        raise TypeError(f"cell: got {type(cell).__name__}, expected a cell name or a Cell instance")
    if cell not in REGISTRY:
        raise ValueError(f"cell: got {cell!r}, expected one of {', '.join(names())} "
                         "or a gyre.cells.Cell instance")
    return REGISTRY[cell](**options)


__all__ = [
    "Cell", "ParamSpec", "Params", "State", "init_parameter", "layer_specs", "REGISTRY", "names", "get",
    "RNN", "OutputRNN", "LSTM", "GRU", "Gated004", "GRU001", "GRU002", "MinGRU", "MinLSTM",
]
