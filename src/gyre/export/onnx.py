"""ONNX export of any recurrent layer or task model, and the onnxruntime runner for the result.

The graph is built per layer and direction from two kinds of pieces:

* **ONNX's own recurrent ops** (``RNN``, ``LSTM`` with or without peepholes, ``GRU`` in both
  reset conventions) for the cells that are exactly what those ops compute (no projection, no
  layer norm, no zoneout): the weights are re-laid out (ONNX's gate orders are ``i,o,f,c`` and
  ``z,r,h``; gyre's, torch's, ``i,f,g,o`` and ``r,z,n``) and both directions run in one op.
* **A ``Scan``** for every other cell, built-in or user-written. Its body is the cell's own
  :meth:`~gyre.cells.Cell.step` (with zoneout's evaluation-mode expectation and, with lengths,
  the "padded steps keep the state" rule of every backend), traced by torch's ONNX exporter; the
  input projection of all steps (:meth:`~gyre.cells.Cell.input_preact`) and the read-out
  (:meth:`~gyre.cells.Cell.readout`) are traced the same way and run outside the loop, as in the
  engine's schedule. Nothing is written per cell.

Around the pieces the graph does what the layer does for every cell: time-major layout,
``lengths`` (a padded step gives output 0 and leaves the state unchanged), the reverse direction
reversed within each sequence's length (``ReverseSequence``), stacking, ``residual``.

Inputs: ``x`` (the layer's layout; batch-first ``(B, T, C)`` for a task model), ``lengths``
``(B,)`` int64 when exported with ``lengths=True``, and one initial state per component,
``h0`` (and ``c0``) ``(L*D, B, S)``. Outputs: ``y`` (the layer's output, or the task model's
prediction) and the final states ``h_n`` (and ``c_n``). Time and batch axes are dynamic.

A task model exports whole through one hook: it has a ``rnn`` attribute (a
:class:`gyre.nn.Recurrent` built ``batch_first=True``) and a method
``export_head(out (B, T, D*O), x (B, T, C), lengths (B,)) -> y``, and optionally
``export_pre(x, lengths) -> (x_rnn, lengths_rnn)``, such that its ``forward(x, lengths=...)`` is
``export_head(rnn(*export_pre(x, lengths))[0], x, lengths)``. Both are traced like the cell's
pieces, so they must use only torch ops (no Python branches on tensor values). A model whose
input is token ids sets ``export_tokens = True``: its graph's ``x`` is then ``(B, T)`` int64
(``export_pre`` embeds it) instead of ``(B, T, C)`` float.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import cells as _cells
from ..extras import MissingExtraError, need
from ..nn import Recurrent

#: LayerNormalization (layer-norm cells) is an ONNX op from opset 17
MIN_OPSET = 17
DEFAULT_OPSET = 17


def max_opset() -> int:
    """The highest opset torch's tracing exporter writes (20 with torch 2.13)."""
    from torch.onnx import _constants
    return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def _need(*modules: str) -> None:
    need("deploy", *modules, feature="ONNX export")


# -- what gets exported ---------------------------------------------------------------------
def _parts(model) -> tuple[Recurrent, object | None, object | None]:
    """``(rnn, export_pre, export_head)`` of a layer or of a task model with the hook."""
    if isinstance(model, Recurrent):
        return model, None, None
    rnn = getattr(model, "rnn", None)
    head = getattr(model, "export_head", None)
    if isinstance(model, nn.Module) and isinstance(rnn, Recurrent) and callable(head):
        refusal = getattr(model, "export_unsupported", lambda: None)()
        if refusal:
            raise ValueError(f"model: {type(model).__name__} does not export ({refusal})")
        if not rnn.batch_first:
            raise ValueError("model: its rnn must be built with batch_first=True to export with "
                             "its head (export_head reads (B, T, D*O))")
        return rnn, getattr(model, "export_pre", None), head
    raise TypeError(f"model: got {type(model).__name__}, expected a gyre.nn.Recurrent (RNN, "
                    "LSTM, GRU, ...) or a task model with a gyre.nn.Recurrent .rnn and an "
                    "export_head(out, x, lengths) method (see gyre.export.onnx)")


def _native_kind(rnn: Recurrent) -> str | None:
    """``"RNN"``/``"LSTM"``/``"GRU"`` when ONNX's own op computes exactly this layer's cell."""
    cell = type(rnn.cell)
    if any(rnn.zoneout):
        return None
    if cell is _cells.RNN:
        return "RNN"
    if cell is _cells.LSTM and not rnn.cell.proj_size and not rnn.cell.layer_norm:
        return "LSTM"
    if cell is _cells.GRU and not rnn.cell.layer_norm:
        return "GRU"
    return None


def _check_args(model, opset, lengths) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"opset: got {opset!r}, expected an int from {MIN_OPSET} (gyre's graphs "
                         f"use LayerNormalization and Scan of opset {MIN_OPSET}) to "
                         f"{max_opset()} (the highest torch's exporter writes)")
    if not isinstance(lengths, bool):
        raise TypeError(f"lengths: got {type(lengths).__name__}, expected a bool (True: the graph "
                        "takes a lengths input)")
    params = list(model.parameters())
    if params and params[0].dtype != torch.float32:
        raise TypeError(f"model: got parameters of dtype {params[0].dtype}, expected float32 "
                        "(onnxruntime runs the exported graph in float32; call .float() first)")
    if params and params[0].device.type != "cpu":
        raise ValueError(f"model: got parameters on {params[0].device}, expected cpu (move it "
                         "with .cpu() before export)")


# -- tracing torch code into ONNX nodes -------------------------------------------------------
class _Fn(nn.Module):
    def __init__(self, fn, params: dict[str, Tensor], owner: nn.Module | None = None):
        super().__init__()
        self.fn = fn
        self.owner = owner  # a module whose parameters fn reads: traced as initializers
        for k, v in params.items():
            self.register_buffer("p_" + k, v.detach().clone())
        self.keys = list(params)

    def forward(self, *args):
        p = {k: getattr(self, "p_" + k) for k in self.keys}
        return self.fn(p, *args)


class _Builder:
    """Collects the outer graph's nodes and initializers; names every piece uniquely."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list = []
        self.inits: list = []
        self.count = 0
        self.ranks: dict[str, int] = {}

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        from onnx import helper
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), **attrs))
        return outs

    def const(self, value, dtype=None) -> str:
        import numpy as np
        from onnx import numpy_helper
        name = self.fresh("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def trace(self, fn, params: dict[str, Tensor], args: tuple, in_names: list[str],
              dynamic: dict[str, dict[int, str]], n_out: int, *, subgraph: bool = False,
              owner: nn.Module | None = None):
        """Trace ``fn(params, *args)`` with torch's exporter. ``subgraph=False``: its nodes join
        the outer graph reading ``in_names`` (outer values), and the names of its ``n_out``
        outputs are returned. ``subgraph=True``: an ONNX ``GraphProto`` whose inputs are
        ``args`` in order (its parameters moved to the outer graph's initializers, which the
        body reads from the enclosing scope) is returned."""
        import onnx
        from onnx import helper
        tag = self.fresh("piece")
        local_in = [f"in{i}" for i in range(len(args))]
        local_out = [f"out{i}" for i in range(n_out)]
        buf = io.BytesIO()
        with warnings.catch_warnings(), _layer_norm_over_last_axes(self.opset):
            warnings.simplefilter("ignore")
            torch.onnx.export(_Fn(fn, params, owner).eval(), args, buf, dynamo=False,
                              input_names=local_in, output_names=local_out,
                              dynamic_axes={local_in[i]: ax for i, ax in enumerate(dynamic.values())
                                            if ax} | {o: {} for o in local_out},
                              opset_version=self.opset, do_constant_folding=True)
        g = onnx.load_from_string(buf.getvalue()).graph
        names: dict[str, str] = {}
        for i, ln in enumerate(local_in):
            names[ln] = in_names[i] if not subgraph else f"{tag}_{ln}"
        for i, lo in enumerate(local_out):
            names[lo] = self.fresh(f"{tag}_y{i}") if not subgraph else f"{tag}_{lo}"

        def rename(n: str) -> str:
            if n == "":
                return n
            if n not in names:
                names[n] = f"{tag}/{n}"
            return names[n]

        for init in g.initializer:
            init.name = rename(init.name)
            self.inits.append(init)
        nodes = []
        for node in g.node:
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            node.name = f"{tag}/{node.name}"
            nodes.append(node)
        if not subgraph:
            self.nodes.extend(nodes)
            for o in g.output:
                self.ranks[names[o.name]] = len(o.type.tensor_type.shape.dim)
            return [names[lo] for lo in local_out]
        ranks = {o.name: len(o.type.tensor_type.shape.dim) for o in g.output}
        types = {o.name: o.type.tensor_type.elem_type for o in g.output}
        inputs = []
        for i, ln in enumerate(local_in):
            t = args[i]
            inputs.append(helper.make_tensor_value_info(
                names[ln], _onnx_dtype(t), [None] * t.dim()))
        # every axis of a step's values is the batch or a fixed feature size: left unnamed
        outputs = [helper.make_tensor_value_info(names[lo], types[lo], [None] * ranks[lo])
                   for lo in local_out]
        return helper.make_graph(nodes, tag, inputs, outputs)


class _layer_norm_over_last_axes:
    """While tracing: ``aten::layer_norm`` becomes ``LayerNormalization`` over as many last axes
    as ``normalized_shape`` has entries. torch's own rule needs ``normalized_shape`` constant,
    but the tracer records ``(v.shape[-1],)`` (how cells write it) as a computed size."""

    def __init__(self, opset: int):
        self.opset = opset

    def __enter__(self):
        from torch.onnx import symbolic_helper as sh

        def layer_norm(g, x, normalized_shape, weight, bias, eps, cudnn_enable):
            node = normalized_shape.node()
            if node.kind() == "prim::ListConstruct":
                axes = len(list(node.inputs()))
            else:
                axes = len(sh._get_const(normalized_shape, "is", "normalized_shape"))
            args = [x, weight] + ([] if sh._is_none(bias) else [bias])
            if sh._is_none(weight):
                raise ValueError("layer_norm without a weight is not exported")
            return g.op("LayerNormalization", *args, axis_i=-axes,
                        epsilon_f=sh._get_const(eps, "f", "eps"))

        torch.onnx.register_custom_op_symbolic("aten::layer_norm", layer_norm, self.opset)
        return self

    def __exit__(self, *exc):
        torch.onnx.unregister_custom_op_symbolic("aten::layer_norm", self.opset)
        return False


def _onnx_dtype(t: Tensor) -> int:
    from onnx import TensorProto
    return {torch.float32: TensorProto.FLOAT, torch.bool: TensorProto.BOOL,
            torch.int64: TensorProto.INT64}[t.dtype]


# -- the recurrent stack ----------------------------------------------------------------------
_GATES = {  # gyre's (torch's) gate blocks in ONNX's order
    "LSTM": [0, 3, 1, 2],  # i,f,g,o -> i,o,f,c
    "GRU": [1, 0, 2],  # r,z,n -> z,r,h
    "RNN": [0],
}


def _reorder(w: Tensor, kind: str) -> Tensor:
    blocks = w.chunk(len(_GATES[kind]), dim=0)
    return torch.cat([blocks[i] for i in _GATES[kind]], dim=0)


def _native_layer(b: _Builder, rnn: Recurrent, kind: str, layer: int, x: str, seq_lens: str | None,
                  h0: list[str]) -> tuple[str, list[str]]:
    """One layer (both directions) through ONNX's own op: ``(output (T, B, D*H), finals)``."""
    D = 2 if rnn.bidirectional else 1
    H = rnn.hidden_size
    ps = rnn._params()[layer]
    W = torch.stack([_reorder(p["weight_ih"], kind) for p in ps])
    R = torch.stack([_reorder(p["weight_hh"], kind) for p in ps])
    inputs = [x, b.const(W.detach().numpy()), b.const(R.detach().numpy())]
    if rnn.bias:
        B = torch.stack([torch.cat([_reorder(p["bias_ih"], kind), _reorder(p["bias_hh"], kind)])
                         for p in ps])
        inputs.append(b.const(B.detach().numpy()))
    else:
        inputs.append("")
    inputs.append(seq_lens or "")
    sl = slice(layer * D, (layer + 1) * D)
    starts = [b.op("Slice", [s, b.const([sl.start], "int64"), b.const([sl.stop], "int64"),
                             b.const([0], "int64")])[0] for s in h0]
    inputs += starts
    attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
    if kind == "LSTM":
        if rnn.cell.peephole:
            P = torch.stack([torch.cat([p["weight_ci"], p["weight_co"], p["weight_cf"]]) for p in ps])
            inputs.append(b.const(P.detach().numpy()))
        n_out = 3
    else:
        n_out = 2
    if kind == "RNN":
        attrs["activations"] = [{"tanh": "Tanh", "relu": "Relu"}[rnn.cell.nonlinearity]] * D
    if kind == "GRU":
        attrs["linear_before_reset"] = 1 if rnn.cell.reset_after else 0
    outs = b.op(kind, inputs, n_out, **attrs)
    y = b.op("Transpose", [outs[0]], perm=[0, 2, 1, 3])[0]  # (T, D, B, H) -> (T, B, D, H)
    y = b.op("Reshape", [y, b.const([0, 0, -1], "int64")])[0]
    return y, outs[1:]


def _scan_direction(b: _Builder, rnn: Recurrent, layer: int, d: int, x: str, valid: str | None,
                    h0: list[str], in_size: int) -> tuple[str, list[str]]:
    """One direction of one layer as a Scan over the cell's own step (``x`` already in the
    direction's time order): ``(output (T, B, O), finals)``."""
    cell = rnn.cell
    p = rnn._params()[layer][d]
    sizes = rnn.state_sizes
    zone = rnn.zoneout
    G = cell.input_preact(torch.zeros(1, in_size), p).shape[-1]
    ex_x = torch.zeros(3, 2, in_size)
    xp = b.trace(lambda q, v: cell.input_preact(v, q), p, (ex_x,), [x],
                 {"x": {0: "T", 1: "B"}}, 1)[0]
    n = len(sizes)

    def body(q, *args):
        state, xt = tuple(args[:n]), args[n]
        new = cell.step(xt, state, q)
        # zoneout in evaluation: its expectation rate * old + (1 - rate) * new
        new = tuple(nw if r == 0 else r * o + (1 - r) * nw
                    for nw, o, r in zip(new, state, zone, strict=True))
        if valid is not None:
            new = tuple(torch.where(args[n + 1], nw, o) for nw, o in zip(new, state, strict=True))
        return (*new, new[0])

    ex = tuple(torch.zeros(2, s) for s in sizes) + (torch.zeros(2, G),)
    if valid is not None:
        ex = ex + (torch.ones(2, 1, dtype=torch.bool),)
    graph = b.trace(body, p, ex, [], {f"a{i}": {0: "B"} for i in range(len(ex))}, n + 1,
                    subgraph=True)
    k = layer * (2 if rnn.bidirectional else 1) + d
    starts = [b.op("Gather", [s, b.const(k, "int64")], axis=0)[0] for s in h0]
    scan_in = [xp] + ([valid] if valid is not None else [])
    outs = b.op("Scan", starts + scan_in, n + 1, body=graph, num_scan_inputs=len(scan_in))
    finals, hs = outs[:n], outs[n]
    ex_h = torch.zeros(3, 2, sizes[0])
    y = b.trace(lambda q, h: cell.readout(h, q), p, (ex_h,), [hs], {"h": {0: "T", 1: "B"}}, 1)[0]
    if valid is not None:
        mask = b.op("Cast", [valid], to=1)[0]  # FLOAT
        y = b.op("Mul", [y, mask])[0]
    return y, finals


def _stack(b: _Builder, rnn: Recurrent, x: str, lengths: str | None, h0: list[str]):
    """The whole stack over time-major ``x`` ``(T, B, I)``: ``(output, finals per component)``."""
    kind = _native_kind(rnn)
    D = 2 if rnn.bidirectional else 1
    valid = seq_lens = full_lens = None
    if lengths is not None:
        seq_lens = b.op("Cast", [lengths], to=6)[0]  # INT32, as ONNX's recurrent ops take it
        if kind is None:
            T = b.op("Gather", [b.op("Shape", [x])[0], b.const(0, "int64")], axis=0)[0]
            steps = b.op("Range", [b.const(0, "int64"), T, b.const(1, "int64")])[0]
            steps = b.op("Unsqueeze", [steps, b.const([1], "int64")])[0]  # (T, 1)
            lens = b.op("Unsqueeze", [lengths, b.const([0], "int64")])[0]  # (1, B)
            valid = b.op("Less", [steps, lens])[0]
            valid = b.op("Unsqueeze", [valid, b.const([2], "int64")])[0]  # (T, B, 1)
    if kind is None and D == 2:
        if lengths is not None:
            full_lens = lengths
        else:  # every sequence is T long
            shape = b.op("Shape", [x])[0]
            T = b.op("Slice", [shape, b.const([0], "int64"), b.const([1], "int64")])[0]
            B = b.op("Slice", [shape, b.const([1], "int64"), b.const([2], "int64")])[0]
            full_lens = b.op("Expand", [T, B])[0]
    finals: list[list[str]] = [[] for _ in rnn.state_sizes]
    layer_in = x
    for layer in range(rnn.num_layers):
        in_size = rnn.input_size if layer == 0 else D * rnn.output_size
        if kind is not None:
            out, fin = _native_layer(b, rnn, kind, layer, layer_in, seq_lens, h0)
            for acc, f in zip(finals, fin, strict=True):
                acc.append(f)  # (D, B, S)
        else:
            outs = []
            for d in range(D):
                seq = layer_in if d == 0 else b.op("ReverseSequence", [layer_in, full_lens],
                                                   batch_axis=1, time_axis=0)[0]
                v = valid
                y, fin = _scan_direction(b, rnn, layer, d, seq, v, h0, in_size)
                if d == 1:
                    y = b.op("ReverseSequence", [y, full_lens], batch_axis=1, time_axis=0)[0]
                outs.append(y)
                for acc, f in zip(finals, fin, strict=True):
                    acc.append(b.op("Unsqueeze", [f, b.const([0], "int64")])[0])
            out = outs[0] if D == 1 else b.op("Concat", outs, axis=-1)[0]
        if rnn.residual and layer > 0:
            out = b.op("Add", [out, layer_in])[0]
        layer_in = out
    return layer_in, [b.op("Concat", f, axis=0)[0] if len(f) > 1 else f[0] for f in finals]


# -- the public entry ---------------------------------------------------------------------------
def onnx(model, path: str | os.PathLike, *, lengths: bool = False,
         opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (a :class:`gyre.nn.Recurrent` or a task model with the export hook, see
    the module docstring) as an ONNX file at ``path`` and return the path.

    ``lengths=True`` adds a ``lengths`` ``(B,)`` int64 input (variable length without packing;
    a task model always takes it). The graph's inputs are ``x``, [``lengths``], ``h0`` [,
    ``c0``] ``(L*D, B, S)``; its outputs ``y``, ``h_n`` [, ``c_n``]. Time and batch are dynamic.
    The model is exported as in evaluation mode (no dropout; zoneout's expectation).
    """
    _need("onnx")
    import onnx as onnx_lib
    from onnx import TensorProto, helper

    rnn, pre, head = _parts(model)
    _check_args(model, opset, lengths)
    whole = head is not None
    lengths = lengths or whole
    b = _Builder(opset)
    comps = rnn.cell.state_names
    D = 2 if rnn.bidirectional else 1
    K = rnn.num_layers * D
    tokens = whole and bool(getattr(model, "export_tokens", False))
    if whole:
        n_feat = _raw_features(rnn, pre)
        x_shape = ["B", "T"] if tokens else ["B", "T", n_feat]
    else:
        n_feat = rnn.input_size
        x_shape = ["B", "T", n_feat] if rnn.batch_first else ["T", "B", n_feat]
    x_type = TensorProto.INT64 if tokens else TensorProto.FLOAT
    g_inputs = [helper.make_tensor_value_info("x", x_type, x_shape)]
    if lengths:
        g_inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["B"]))
    for c, s in zip(comps, rnn.state_sizes, strict=True):
        g_inputs.append(helper.make_tensor_value_info(f"{c}0", TensorProto.FLOAT, [K, "B", s]))
    h0 = [f"{c}0" for c in comps]

    x, lens = "x", "lengths" if lengths else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ex_x = torch.zeros(2, 5, dtype=torch.int64) if tokens else torch.zeros(2, 5, n_feat)
            if pre is not None:
                ex = (ex_x, torch.tensor([5, 3]))
                x, lens = b.trace(lambda q, v, n: pre(v, n), {}, ex, [x, lens],
                                  {"x": {0: "B", 1: "T"}, "n": {0: "B"}}, 2, owner=model)
            if whole or rnn.batch_first:
                x = b.op("Transpose", [x], perm=[1, 0, 2])[0]
            out, finals = _stack(b, rnn, x, lens, h0)
            if whole or rnn.batch_first:
                out = b.op("Transpose", [out], perm=[1, 0, 2])[0]
            if whole:
                ex = (torch.zeros(2, 5, D * rnn.output_size), ex_x, torch.tensor([5, 3]))
                out = b.trace(lambda q, o, v, n: head(o, v, n), {}, ex, [out, "x", "lengths"],
                              {"o": {0: "B", 1: "T"}, "v": {0: "B", 1: "T"}, "n": {0: "B"}}, 1,
                              owner=model)[0]
    finally:
        model.train(was_training)
    b.nodes.append(helper.make_node("Identity", [out], ["y"], name="y"))
    y_rank = b.ranks.get(out, 3)
    g_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * y_rank)]
    for c, f, s in zip(comps, finals, rnn.state_sizes, strict=True):
        b.nodes.append(helper.make_node("Identity", [f], [f"{c}_n"], name=f"{c}_n"))
        g_outputs.append(helper.make_tensor_value_info(f"{c}_n", TensorProto.FLOAT, [K, "B", s]))
    graph = helper.make_graph(b.nodes, "gyre", g_inputs, g_outputs, initializer=b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="gyre")
    m.ir_version = min(m.ir_version, 10)  # onnxruntime 1.2x reads IR <= 10
    onnx_lib.checker.check_model(m)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx_lib.save(m, tmp)
    os.replace(tmp, path)
    return path


def _raw_features(rnn: Recurrent, pre) -> int:
    """The task model's input feature count (before ``export_pre``)."""
    owner = getattr(pre, "__self__", None)
    n = None
    if owner is not None:  # export_features: x's columns where they differ from n_inputs
        n = getattr(owner, "export_features", getattr(owner, "n_inputs", None))
    if n is None and owner is not None and hasattr(owner, "frame"):
        n = rnn.input_size // owner.frame
    return int(n if n is not None else rnn.input_size)


# -- running an exported file ---------------------------------------------------------------
class OnnxModel:
    """An exported file run by onnxruntime with the layer's (or task model's) call:
    ``model(x, state=None, *, lengths=None) -> (y, state)`` on torch tensors (CPU, float32);
    ``state`` as the layer returns it (a tensor, or a tuple for LSTM)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        _need("onnxruntime")
        import onnxruntime as ort
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: {str(path)!r} does not exist; expected an .onnx file "
                                    "written by gyre export")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.session.get_inputs()}
        self.takes_lengths = "lengths" in ins
        self.state_inputs = [n for n in ins if n not in ("x", "lengths")]
        self.state_shapes = [ins[n].shape for n in self.state_inputs]
        self.x_shape = ins["x"].shape
        self.tokens = ins["x"].type == "tensor(int64)"  # token ids (export_tokens)

    training = False

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("mode: an exported model runs in evaluation mode only; got True")
        return self

    def __call__(self, x: Tensor, state=None, *, lengths=None):
        import numpy as np
        xs = x.detach().cpu()
        xs = xs.long().numpy() if self.tokens else xs.float().numpy()
        batch_axis = 0 if self.x_shape[0] == "B" else 1
        B, T = xs.shape[batch_axis], xs.shape[1 - batch_axis]
        feed = {"x": xs}
        if self.takes_lengths:
            n = np.full(B, T, np.int64) if lengths is None else np.asarray(
                torch.as_tensor(lengths).cpu().numpy(), np.int64)
            feed["lengths"] = n
        elif lengths is not None:
            raise ValueError("lengths: this file was exported without a lengths input "
                             "(export with lengths=True)")
        parts = (() if state is None else (state,) if isinstance(state, Tensor) else tuple(state))
        for i, (name, shape) in enumerate(zip(self.state_inputs, self.state_shapes, strict=True)):
            feed[name] = (parts[i].detach().cpu().float().numpy() if parts else
                          np.zeros((shape[0], B, shape[2]), np.float32))
        outs = self.session.run(None, feed)
        y = torch.from_numpy(outs[0])
        st = tuple(torch.from_numpy(o) for o in outs[1:])
        return y, st[0] if len(st) == 1 else st

    forward = __call__

    def eval(self):
        return self


# -- torch.export -----------------------------------------------------------------------------
def torch_export(model: nn.Module, args: tuple, kwargs: dict | None = None):
    """``torch.export.export`` of a layer or model, every :class:`gyre.nn.Recurrent` in it run on
    the ``reference`` backend (torch ops only, so the exporter traces the step; the compiled
    backends are opaque to it). The time loop is unrolled over the example's sequence length,
    so the program is specialised to that length; batch stays whatever the example has."""
    layers = [m for m in model.modules() if isinstance(m, Recurrent)]
    if not layers:
        raise TypeError(f"model: got {type(model).__name__} with no gyre.nn.Recurrent inside")
    saved = [m.backend for m in layers]
    try:
        for m in layers:
            m.backend = "reference"
        return torch.export.export(model, args, kwargs or {})
    finally:
        for m, s in zip(layers, saved, strict=True):
            m.backend = s


__all__ = ["onnx", "OnnxModel", "torch_export", "MIN_OPSET", "DEFAULT_OPSET", "max_opset",
           "MissingExtraError"]
