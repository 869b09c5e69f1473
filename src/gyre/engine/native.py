"""The ``native`` backend: torch's own fused kernels (``torch._VF.lstm/gru/rnn_*``).

Used for exactly the configurations torch implements: ``LSTM`` (with or without ``proj_size``,
no peepholes, no layer norm), ``GRU`` with ``reset_after=True`` and no layer norm, both
with the default activations, ``RNN`` with tanh or relu; no recurrent dropout, zoneout,
residual connections or per-step states.
On CPU torch runs oneDNN for LSTM; on CUDA, cuDNN.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..cells import GRU, LSTM, RNN, Cell, Params, State


def mode(cell: Cell) -> str | None:
    """torch's name for ``cell`` when torch has exactly this cell, else None."""
    torch_acts = getattr(cell, "activation", "tanh") == "tanh" and \
        getattr(cell, "recurrent_activation", "sigmoid") == "sigmoid"
    if type(cell) is LSTM and not cell.peephole and not cell.layer_norm and torch_acts:
        return "lstm"
    if type(cell) is GRU and cell.reset_after and not cell.layer_norm and torch_acts:
        return "gru"
    if type(cell) is RNN and cell.nonlinearity in ("tanh", "relu"):
        return f"rnn_{cell.nonlinearity}"
    return None


def unsupported_reason(cell: Cell, *, residual: bool, drop, zone, return_states: bool) -> str | None:
    if mode(cell) is None:
        return f"torch has no fused kernel for {cell.describe()}"
    if residual:
        return "residual connections"
    if drop is not None:
        return "recurrent dropout"
    if zone is not None:
        return "zoneout"
    if return_states:
        return "per-step states"
    return None


def unsupported(cell: Cell, options, device: str) -> str | None:
    """The backend contract (:mod:`gyre.engine.contract`): why ``native`` cannot run ``cell``
    with ``options`` on ``device``, or None."""
    return unsupported_reason(cell, residual=options.residual, drop=True if options.drop else None,
                              zone=True if options.zone else None,
                              return_states=options.return_states)


def _onednn_guard(x: Tensor):
    """oneDNN builds its low-precision LSTM primitive only on CPUs with bf16/fp16 support
    (AVX-512 BF16, AMX); elsewhere torch's own LSTM under CPU autocast raises "could not create a
    primitive descriptor". There torch's plain ATen kernel runs instead (in float32, as
    autocast then leaves it), so ``bf16=True`` training works on every CPU."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return contextlib.nullcontext()
    low = torch.get_autocast_dtype("cpu")
    ops = torch.ops.mkldnn
    ok = ops._is_mkldnn_bf16_supported() if low == torch.bfloat16 else \
        ops._is_mkldnn_fp16_supported()
    return contextlib.nullcontext() if ok else _without_onednn()


@contextlib.contextmanager
def _without_onednn():
    # torch.backends.mkldnn.flags() also resets the TF32 flag and warns about Intel GPUs.
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


def _flat_weights(cell: Cell, params: list[list[Params]]) -> list[Tensor]:
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    if isinstance(cell, LSTM) and cell.proj_size:
        names.append("weight_hr")
    return [p[n] for layer in params for p in layer for n in names if n in p]


def run(
    cell: Cell,
    params: list[list[Params]],
    x: Tensor,
    hx: State,
    *,
    lengths: Tensor | None,
    bidirectional: bool,
    dropout: float,
    training: bool,
) -> tuple[Tensor, State]:
    """``x`` ``(T, B, I)``, ``hx`` per component ``(L*D, B, S_k)``; returns ``(out, h_n)``."""
    with _onednn_guard(x):
        return _run(cell, params, x, hx, lengths=lengths, bidirectional=bidirectional,
                    dropout=dropout, training=training)


def _run(cell, params, x, hx, *, lengths, bidirectional, dropout, training):
    kind = mode(cell)
    weights = _flat_weights(cell, params)
    has_bias = "bias_ih" in params[0][0]
    fn = getattr(torch._VF, kind)
    num_layers = len(params)
    if lengths is None or x.shape[1] == 0:  # no sequences: nothing to pack (torch refuses)
        args = (weights, has_bias, num_layers, dropout, training, bidirectional, False)
        if kind == "lstm":
            out, h, c = fn(x, hx, *args)
            return out, (h, c)
        out, h = fn(x, hx[0], *args)
        return out, (h,)
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    order, back = packed.sorted_indices, packed.unsorted_indices
    hx_sorted = tuple(s.index_select(1, order) for s in hx)
    args = (weights, has_bias, num_layers, dropout, training, bidirectional)
    if kind == "lstm":
        data, h, c = fn(packed.data, packed.batch_sizes, hx_sorted, *args)
        final = (h, c)
    else:
        data, h = fn(packed.data, packed.batch_sizes, hx_sorted[0], *args)
        final = (h,)
    out_packed = packed._replace(data=data)
    out, _ = pad_packed_sequence(out_packed, total_length=x.shape[0])
    return out, tuple(s.index_select(1, back) for s in final)
