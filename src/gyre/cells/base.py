"""The cell contract: one step of a recurrence, written once as math.

A cell knows nothing about sequences, layers, directions or lengths. It declares

* its parameters (:meth:`Cell.param_specs`), named after the formula's subscripts and laid out
  like ``torch.nn`` where torch has the cell (``weight_ih`` is ``(gates*H, I)``);
* its state (:attr:`Cell.state_names`, :meth:`Cell.state_sizes`);
* the input pre-activations (:meth:`Cell.input_preact`), which the engine computes for all time
  steps in one matrix product before the loop;
* one step (:meth:`Cell.step`). Cells whose recurrence is the usual ``W_hh h + b_hh`` only write
  :meth:`Cell.pointwise`, the elementwise part; cells whose recurrent product sees a modified state
  (the original GRU, the reference-text variants) override :meth:`Cell.step` itself;
* optionally a read-out applied to all steps at once (:meth:`Cell.readout`).

Every method uses only torch ops and no Python control flow on tensor values, so every engine
backend (reference loop, torch's fused kernels, compiled loop) can run it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

State = tuple[Tensor, ...]
Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """Shape and initialisation of one parameter of a cell.

    ``init`` is ``"uniform"`` (torch's ``U(-1/sqrt(H), 1/sqrt(H))``), ``"ones"`` or ``"zeros"``.
    ``bias=True`` marks a parameter that a layer built with ``bias=False`` leaves out.
    """

    shape: tuple[int, ...]
    init: str = "uniform"
    bias: bool = False


@dataclass(frozen=True)
class Cell:
    """Base class of every cell, built-in or user-written.

    Subclasses set :attr:`gates` (how many ``H``-sized blocks ``weight_ih`` stacks) and
    :attr:`state_names`, and implement :meth:`pointwise` or :meth:`step`. The defaults describe
    ``weight_ih (G*H, I)``, ``weight_hh (G*H, H)``, ``bias_ih (G*H)``, ``bias_hh (G*H)``.
    """

    name: ClassVar[str] = ""
    gates: ClassVar[int] = 1
    state_names: ClassVar[tuple[str, ...]] = ("h",)

    # -- declarations -----------------------------------------------------------------------
    def param_specs(self, input_size: int, hidden_size: int, bias: bool = True) -> dict[str, ParamSpec]:
        gh = self.gates * hidden_size
        specs = {
            "weight_ih": ParamSpec((gh, input_size)),
            "weight_hh": ParamSpec((gh, self.state_sizes(hidden_size)[0])),
            "bias_ih": ParamSpec((gh,), bias=True),
            "bias_hh": ParamSpec((gh,), bias=True),
        }
        return _drop_bias(specs, bias)

    def state_sizes(self, hidden_size: int) -> tuple[int, ...]:
        """Feature size of each state component, in :attr:`state_names` order."""
        return (hidden_size,) * len(self.state_names)

    def output_size(self, hidden_size: int) -> int:
        """Feature size of the per-step output (what the next stacked layer receives)."""
        return self.state_sizes(hidden_size)[0]

    def initial_state(
        self, batch: int, hidden_size: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> State:
        return tuple(
            torch.zeros(batch, s, dtype=dtype, device=device) for s in self.state_sizes(hidden_size)
        )

    # -- math -------------------------------------------------------------------------------
    def input_preact(self, x: Tensor, p: Params) -> Tensor:
        """Input pre-activations; ``x`` may carry any leading dims (all steps at once)."""
        return F.linear(x, p["weight_ih"], p.get("bias_ih"))

    def recurrent(self, h: Tensor, p: Params) -> Tensor:
        """Recurrent pre-activations ``W_hh h + b_hh`` of the (possibly dropped-out) state."""
        return F.linear(h, p["weight_hh"], p.get("bias_hh"))

    def pointwise(self, xp: Tensor, hp: Tensor, state: State, p: Params) -> State:
        """Elementwise part of a step: input and recurrent pre-activations, old state -> new."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement pointwise() or override step()"
        )

    def step(self, xp: Tensor, state: State, p: Params, drop: Tensor | None = None) -> State:
        """One step. ``drop`` is the recurrent-dropout mask, applied to ``h_{t-1}`` wherever it
        enters a recurrent matrix product (Gal & Ghahramani 2016); ``None`` means no dropout."""
        h = state[0] if drop is None else state[0] * drop
        return self.pointwise(xp, self.recurrent(h, p), state, p)

    def readout(self, h: Tensor, p: Params) -> Tensor:
        """Per-step output from the first state component, for all steps at once."""
        return h

    def describe(self) -> str:
        return self.name or type(self).__name__


def layer_specs(cell: Cell, input_size: int, hidden_size: int, bias: bool) -> dict[str, ParamSpec]:
    """The parameters a layer of ``cell`` holds: its :meth:`Cell.param_specs`, and with
    ``bias=False`` none marked ``ParamSpec(bias=True)``, whether or not the cell leaves them out
    itself (the contract a user cell relies on)."""
    return _drop_bias(cell.param_specs(input_size, hidden_size, bias), bias)


def _drop_bias(specs: dict[str, ParamSpec], bias: bool) -> dict[str, ParamSpec]:
    return specs if bias else {k: v for k, v in specs.items() if not v.bias}


def init_parameter(t: Tensor, spec: ParamSpec, hidden_size: int) -> None:
    """Initialise ``t`` in place as ``spec`` says (torch's RNN initialisation for weights)."""
    with torch.no_grad():
        if spec.init == "uniform":
            k = 1.0 / math.sqrt(hidden_size)
            t.uniform_(-k, k)
        elif spec.init == "ones":
            t.fill_(1.0)
        elif spec.init == "zeros":
            t.zero_()
        else:
            raise ValueError(f"ParamSpec.init: got {spec.init!r}, expected 'uniform', 'ones' or 'zeros'")
