"""Pointwise activations a built-in cell can be given by name (``activation=``,
``recurrent_activation=``, RNN's ``nonlinearity=``).

Each is written in the torch ops every backend runs (the ``fused`` backend traces them into its
compiled loop like the rest of the cell's math), with Keras's definitions where Keras has the
name: ``hard_sigmoid(x) = clip(x / 6 + 1/2, 0, 1)`` (``relu6(x + 3) / 6``),
``softsign(x) = x / (1 + |x|)``, ``silu(x) = swish(x) = x * sigmoid(x)``, ``linear(x) = x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor) -> Tensor:
    return x


def hard_sigmoid(x: Tensor) -> Tensor:
    # min(relu(y), 1) written as 1 - relu(1 - relu(y)): only ops the fused tracer knows
    return 1 - torch.relu(1 - torch.relu(x / 6 + 0.5))


def softsign(x: Tensor) -> Tensor:
    return x / (1 + torch.abs(x))


#: name -> function of every activation a built-in cell accepts
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "linear": linear,
    "hard_sigmoid": hard_sigmoid,
    "softsign": softsign,
    "silu": F.silu,
    "swish": F.silu,
}


def check(name, arg: str) -> str:
    """``name`` when it names an activation, else one ValueError naming ``arg``."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{arg}: got {name!r}, expected one of {', '.join(sorted(ACTIVATIONS))}")
    return name


def get(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[name]


def describe(cell) -> list[str]:
    """``activation=...`` / ``recurrent_activation=...`` parts of a cell's description, for the
    fields that differ from the defaults (``tanh``, ``sigmoid``)."""
    parts = []
    if cell.activation != "tanh":
        parts.append(f"activation={cell.activation}")
    if cell.recurrent_activation != "sigmoid":
        parts.append(f"recurrent_activation={cell.recurrent_activation}")
    return parts
