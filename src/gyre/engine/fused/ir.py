"""From a cell's Python step to a small program of per-unit scalar operations.

The cell's :meth:`~gyre.cells.Cell.step` is run once on tiny tensors under a dispatch mode that
records every aten op. Every tensor the step touches is either

* derived from parameters only (weight slices, transposes, bias chunks): *hoisted*, i.e.
  computed once per call in Python, under autograd, and handed to the kernel;
* a row tensor ``(B, k*U)``: ``k`` blocks of a *unit* width ``U`` (the hidden size, or for a
  projected LSTM the projection size). A block-wise elementwise op becomes ``k`` scalar
  operations (*atoms*) evaluated at every ``(b, j)``, ``j < U``; chunk/split/cat only
  rearrange atoms.

Matrix products with a hoisted matrix and layer norms over a whole row are *boundaries*: the
atoms before one are materialized into a buffer, the boundary runs (a GEMM or a row-wise norm),
and its output is loaded as new atoms. The *stage* of an atom is the number of boundaries it
sits behind, so a step is: kernel 0, boundaries of stage 1, kernel 1, ...

The step is traced at two hidden sizes ``H`` and ``H + 1`` to tell widths that scale with ``H``
from constant ones; the normalized program (in blocks, not sizes) must come out identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ...cells import layer_specs

aten = torch.ops.aten


class Unsupported(Exception):
    """The cell's step uses something the fused backend cannot compile (the message says what)."""


@dataclass(frozen=True)
class Atom:
    """One scalar operation at unit ``j`` of row ``b``.

    ``op`` is a load (``"xp"``, ``"state"``, ``"drop"``, ``"vec"``, ``"bout"``), ``"const"`` or
    an elementwise op name (see :data:`EW_OPS`). For loads ``args`` are ``(index, block)``; for
    ``const`` ``(value,)``; otherwise atom ids; ``extra`` holds scalar op parameters.
    ``fam`` is the unit family (-1 for constants), ``row`` whether it varies with ``b``.
    """

    op: str
    args: tuple
    fam: int
    row: bool
    stage: int
    extra: tuple = ()


@dataclass
class Boundary:
    kind: str  # "mm": out = in @ mats[mat]; "ln": out = LN(in) * vec[weight] + vec[bias]
    inputs: list[int]  # one atom per (block, of the input row)
    in_fam: int
    out_fam: int
    out_blocks: int
    stage: int
    mat: int = -1
    weight: int = -1
    bias: int = -1
    eps: float = 0.0


@dataclass
class Program:
    """A traced step, normalized (sizes in blocks of a family's unit)."""

    atoms: list[Atom]
    boundaries: list[Boundary]
    outputs: list[list[int]]  # per state component, one atom per block
    xp: tuple[int, int]  # (fam, blocks)
    states: list[tuple[int, int]]
    drop: tuple[int, int]
    vecs: list[tuple[int, int]]  # hoisted vectors (fam, blocks)
    mats: list[tuple[int, int, int, int]]  # hoisted matrices (in_fam, in_blocks, out_fam, out_blocks)
    nfam: int
    # not part of the normalized program: how to compute the hoisted tensors from parameters
    hoist: Hoist | None = field(default=None, compare=False, repr=False)

    @property
    def nstages(self) -> int:
        return 1 + max((b.stage for b in self.boundaries), default=0)


@dataclass
class Hoist:
    """The parameter-only part of the recorded step, replayed on real parameters."""

    ops: list  # (func, args, kwargs, out_id) with tensors replaced by ("t", id)
    param_ids: dict[str, int]
    vec_ids: list[int]
    mat_ids: list[int]

    def __call__(self, p: dict[str, torch.Tensor]) -> tuple[list, list]:
        env: dict[int, torch.Tensor] = {self.param_ids[k]: v for k, v in p.items()
                                        if k in self.param_ids}
        for func, args, kwargs, out_ids in self.ops:
            out = func(*_sub(args, env), **_sub(kwargs, env))
            if isinstance(out, torch.Tensor):
                env[out_ids] = out
            else:
                for i, o in zip(out_ids, out, strict=True):
                    env[i] = o
        return [env[i].contiguous() for i in self.vec_ids], [env[i] for i in self.mat_ids]


def _sub(a, env: dict):
    """``a`` with every ``("t", id)`` replaced by ``env[id]`` (a plain function, not a closure:
    a recursive closure is a reference cycle, which would hold the parameters in ``env`` until
    the garbage collector runs, and ``Module.to()`` swapping tensors needs them free)."""
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "t":
        return env[a[1]]
    if isinstance(a, list | tuple):
        return type(a)(_sub(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _sub(v, env) for k, v in a.items()}
    return a


# -- recording --------------------------------------------------------------------------------

class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def record_fn(fn):
    """(recorded aten ops, result) of ``fn()`` run without grad."""
    with torch.no_grad(), _Recorder() as rec:
        out = fn()
    return rec.ops, out


def record(cell, xp, state, p, drop):
    with torch.no_grad(), _Recorder() as rec:
        new = cell.step(xp, state, p, drop)
    if not isinstance(new, tuple) or len(new) != len(state):
        raise Unsupported(f"step returned {type(new).__name__}, expected a tuple of "
                          f"{len(state)} tensors")
    return rec.ops, new


# -- elementwise ops --------------------------------------------------------------------------

#: aten op -> (name, number of tensor-or-scalar operands); scalar parameters go to ``extra``
_EW = {
    aten.add.Tensor: "add", aten.add.Scalar: "add",
    aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
    aten.rsub.Scalar: "rsub", aten.rsub.Tensor: "rsub",
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    aten.div.Tensor: "div", aten.div.Scalar: "div",
    aten.neg.default: "neg", aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh",
    aten.relu.default: "relu", aten.exp.default: "exp", aten.log.default: "log",
    aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt", aten.reciprocal.default: "reciprocal",
    aten.silu.default: "silu", aten.abs.default: "abs",
    aten.maximum.default: "maximum", aten.minimum.default: "minimum",
    aten.pow.Tensor_Scalar: "pow",
}
EW_OPS = sorted(set(_EW.values()))
_IDENTITY = {aten.clone.default, aten.alias.default, aten.contiguous.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
           aten.unbind.int}


def _is_tensor(a) -> bool:
    return isinstance(a, torch.Tensor)


def _width_classes(ops0, ops1, inputs0, inputs1, param_ids0):
    """Check both traces did the same ops; return the constant unit (gcd of constant widths)."""
    if len(ops0) != len(ops1) or any(a[0] is not b[0] for a, b in zip(ops0, ops1, strict=True)):
        raise Unsupported("the step runs different ops at different hidden sizes")
    consts = []
    for t0, t1 in zip(inputs0, inputs1, strict=True):
        if t0.shape[-1] == t1.shape[-1]:
            consts.append(t0.shape[-1])
    derived = set(param_ids0)
    for (func, args, _, out0), (_, _, _, out1) in zip(ops0, ops1, strict=True):
        ins = [id(a) for a in _flat(args) if _is_tensor(a)]
        outs0 = [out0] if _is_tensor(out0) else [o for o in out0 if _is_tensor(o)]
        outs1 = [out1] if _is_tensor(out1) else [o for o in out1 if _is_tensor(o)]
        if ins and all(i in derived for i in ins) or not ins:
            derived.update(id(o) for o in outs0)
            continue
        if func in (aten.native_layer_norm.default,):
            outs0, outs1 = outs0[:1], outs1[:1]
        for o0, o1 in zip(outs0, outs1, strict=True):
            if o0.dim() >= 1 and o0.shape[-1] == o1.shape[-1] and o0.shape[-1] > 0:
                consts.append(o0.shape[-1])
    return math.gcd(*consts) if consts else 0


def _flat(args):
    for a in args:
        if isinstance(a, list | tuple):
            yield from _flat(a)
        else:
            yield a


class _Builder:
    """Turns one recording into a :class:`Program`."""

    MAX_BLOCKS = 64

    def __init__(self, units: dict[int, int], hidden: int, hidden_other: int):
        self.units = units  # fam -> unit width at this trace
        self.hidden = hidden
        self.hidden_other = hidden_other
        self.atoms: list[Atom] = []
        self.atom_ids: dict[Atom, int] = {}
        self.boundaries: list[Boundary] = []
        self.vecs: list[tuple[int, int]] = []
        self.vec_ids: list[int] = []
        self.mats: list[tuple[int, int, int, int]] = []
        self.mat_ids: list[int] = []
        self.env: dict[int, object] = {}  # tensor id -> ("row", [atom...], fam) | ("param",)
        self.hoist_ops: list = []

    def atom(self, a: Atom) -> int:
        if a not in self.atom_ids:
            self.atom_ids[a] = len(self.atoms)
            self.atoms.append(a)
        return self.atom_ids[a]

    def classify(self, width: int, width_other: int) -> tuple[int, int]:
        if width_other != width:
            k, rem = divmod(width - width_other, self.hidden - self.hidden_other)
            if rem or k <= 0 or width != k * self.hidden:
                raise Unsupported(f"a width {width} that is not a multiple of the hidden size")
            return 0, k
        u = self.units.get(1, 0)
        if not u or width % u:
            raise Unsupported(f"a constant width {width}")
        return 1, width // u

    def blocks_of(self, width: int, fam: int) -> int:
        u = self.units[fam]
        if width % u:
            raise Unsupported(f"width {width} is not a multiple of the unit {u}")
        k = width // u
        if k > self.MAX_BLOCKS:
            raise Unsupported(f"a row of {k} blocks")
        return k

    def row_input(self, t_id: int, op: str, index: int, fam: int, k: int):
        ids = [self.atom(Atom(op, (index, blk), fam, True, 0)) for blk in range(k)]
        self.env[t_id] = ("row", ids, fam)

    def hoisted(self, t: torch.Tensor, kind: str, fam: int = -1, k: int = 0,
                mat: tuple | None = None) -> int:
        key = id(t)
        if kind == "vec":
            if key in self.vec_ids:
                return self.vec_ids.index(key)
            self.vec_ids.append(key)
            self.vecs.append((fam, k))
            return len(self.vecs) - 1
        if key in self.mat_ids:
            return self.mat_ids.index(key)
        self.mat_ids.append(key)
        self.mats.append(mat)
        return len(self.mats) - 1

    def vec_atoms(self, t: torch.Tensor, fam: int, k: int) -> list[int]:
        if t.dim() != 1:
            raise Unsupported(f"a parameter-derived tensor of shape {tuple(t.shape)} in an "
                              "elementwise op (expected a vector)")
        if self.blocks_of(t.shape[0], fam) != k:
            raise Unsupported(f"a vector of width {t.shape[0]} against {k} blocks")
        i = self.hoisted(t, "vec", fam, k)
        return [self.atom(Atom("vec", (i, blk), fam, False, 0)) for blk in range(k)]

    def value(self, a):
        """('row', atoms, fam) | ('param', tensor) | ('scalar', float)."""
        if _is_tensor(a):
            v = self.env.get(id(a))
            if v is None:
                raise Unsupported("a tensor that is neither an input nor computed in the step")
            if v[0] == "param":
                return ("param", a)
            return v
        if isinstance(a, bool) or not isinstance(a, int | float):
            raise Unsupported(f"an argument of type {type(a).__name__}")
        return ("scalar", float(a))

    def ew(self, name: str, operands: list, extra: tuple = ()):
        vals = [self.value(a) for a in operands]
        rows = [v for v in vals if v[0] == "row"]
        fam, k = rows[0][2], len(rows[0][1])
        for v in rows:
            if v[2] != fam or len(v[1]) != k:
                raise Unsupported(f"'{name}' on rows of different shapes")
        lists = []
        for v in vals:
            if v[0] == "row":
                lists.append(v[1])
            elif v[0] == "param":
                lists.append(self.vec_atoms(v[1], fam, k))
            else:
                lists.append([self.atom(Atom("const", (v[1],), -1, False, 0))] * k)
        out = []
        for blk in range(k):
            args = tuple(lst[blk] for lst in lists)
            stage = max(self.atoms[i].stage for i in args)
            row = any(self.atoms[i].row for i in args)
            out.append(self.atom(Atom(name, args, fam, row, stage, extra)))
        return ("row", out, fam)

    def run(self, ops, ops_other, param_ids: set[int]):
        derived = set(param_ids)
        for i in param_ids:
            self.env[i] = ("param",)
        for (func, args, kwargs, out), other in zip(ops, ops_other, strict=True):
            tensors = [a for a in _flat(list(args) + list(kwargs.values())) if _is_tensor(a)]
            if all(id(t) in derived for t in tensors):
                outs = [out] if _is_tensor(out) else list(out)
                for o in outs:
                    derived.add(id(o))
                    self.env[id(o)] = ("param",)
                self.hoist_ops.append((func, _refs(args), _refs(kwargs),
                                       id(out) if _is_tensor(out) else [id(o) for o in out]))
                continue
            self.op(func, args, kwargs, out, other)

    def op(self, func, args, kwargs, out, other):
        if func in _EW:
            name = _EW[func]
            operands = list(args)
            alpha = kwargs.get("alpha", 1)
            extra: tuple = ()
            if name == "pow":
                operands, extra = [args[0]], (float(args[1]),)
            if name in ("add", "sub", "rsub") and alpha != 1:
                operands = [operands[0], operands[1] * alpha] if not _is_tensor(operands[1]) \
                    else None
                if operands is None:
                    raise Unsupported(f"'{name}' with alpha on a tensor")
            if kwargs.keys() - {"alpha"}:
                raise Unsupported(f"'{name}' with {sorted(kwargs)}")
            self.env[id(out)] = self.ew(name, operands, extra)
            return
        if func in _IDENTITY:
            self.env[id(out)] = self.value(args[0])
            return
        if func in _SPLITS or func in (aten.slice.Tensor, aten.cat.default):
            self.shape_op(func, args, kwargs, out)
            return
        if func in (aten.mm.default, aten.addmm.default):
            self.mm(func, args, kwargs, out, other[1][-1].shape[1])
            return
        if func is aten.native_layer_norm.default:
            self.layer_norm(args, out)
            return
        raise Unsupported(f"the op {func} (gyre's fused backend compiles elementwise ops, "
                          "chunk/split/cat, matrix products with parameters and layer norm)")

    def _last_dim(self, t: torch.Tensor, dim: int) -> None:
        if dim not in (-1, t.dim() - 1):
            raise Unsupported(f"a split/slice/cat along dim {dim} (only the feature dim)")

    def shape_op(self, func, args, kwargs, out):
        if func is aten.cat.default:
            parts = [self.value(t) for t in args[0]]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            self._last_dim(args[0][0], dim)
            if any(p[0] != "row" for p in parts) or len({p[2] for p in parts}) != 1:
                raise Unsupported("a cat of parameters with rows, or of different families")
            self.env[id(out)] = ("row", [a for p in parts for a in p[1]], parts[0][2])
            return
        src = self.value(args[0])
        if src[0] != "row":
            raise Unsupported("a split of a parameter mixed with rows")
        _, atoms, fam = src
        u = self.units[fam]
        if func is aten.slice.Tensor:
            dim, start, end = (list(args[1:]) + [0, None, None])[:3]
            step = args[4] if len(args) > 4 else 1
            self._last_dim(args[0], dim)
            start, end, step = slice(start, end, step).indices(args[0].shape[-1])
            if step != 1 or start % u or end % u:
                raise Unsupported("a slice that is not whole blocks")
            self.env[id(out)] = ("row", atoms[start // u:end // u], fam)
            return
        outs = list(out)
        if func is aten.unbind.int:
            raise Unsupported("unbind")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        self._last_dim(args[0], dim)
        pos = 0
        for o in outs:
            w = o.shape[-1]
            if w % u or pos % u:
                raise Unsupported("a split that is not whole blocks")
            self.env[id(o)] = ("row", atoms[pos // u:(pos + w) // u], fam)
            pos += w

    def mm(self, func, args, kwargs, out, out_w_other: int):
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            raise Unsupported("addmm with alpha/beta")
        bias, left, right = (None, *args) if func is aten.mm.default else args
        lv, rv = self.value(left), self.value(right)
        if lv[0] != "row" or rv[0] != "param":
            raise Unsupported("a matrix product that is not (state-derived rows) @ (parameters)")
        _, latoms, in_fam = lv
        out_w = right.shape[1]
        out_fam, out_k = self.classify(out_w, out_w_other)
        mat = self.hoisted(right, "mat", mat=(in_fam, len(latoms), out_fam, out_k))
        stage = 1 + max(self.atoms[a].stage for a in latoms)
        bi = len(self.boundaries)
        self.boundaries.append(Boundary("mm", list(latoms), in_fam, out_fam, out_k, stage, mat=mat))
        res = ("row", [self.atom(Atom("bout", (bi, blk), out_fam, True, stage))
                       for blk in range(out_k)], out_fam)
        self.env[id(out)] = res
        if bias is not None:
            self.env[id(out)] = self.ew("add", [out, bias])

    def layer_norm(self, args, out):
        x, shape, weight, bias, eps = args
        xv = self.value(x)
        if xv[0] != "row" or len(shape) != 1 or shape[0] != x.shape[-1]:
            raise Unsupported("a layer norm that is not over a row's whole feature dim")
        _, atoms, fam = xv
        k = len(atoms)
        idx = []
        for t in (weight, bias):
            if t is None:
                idx.append(-1)
                continue
            v = self.value(t)
            if v[0] != "param" or t.dim() != 1:
                raise Unsupported("a layer norm whose weight or bias is not a parameter vector")
            idx.append(self.hoisted(t, "vec", fam, k))
        stage = 1 + max(self.atoms[a].stage for a in atoms)
        bi = len(self.boundaries)
        self.boundaries.append(Boundary("ln", list(atoms), fam, fam, k, stage, weight=idx[0],
                                        bias=idx[1], eps=float(eps)))
        y = ("row", [self.atom(Atom("bout", (bi, blk), fam, True, stage)) for blk in range(k)],
             fam)
        self.env[id(out[0])] = y
        # mean and rstd (out[1], out[2]) are left undefined: using them is unsupported


def _refs(a):
    if _is_tensor(a):
        return ("t", id(a))
    if isinstance(a, list):
        return [_refs(x) for x in a]
    if isinstance(a, tuple):
        return tuple(_refs(x) for x in a)
    if isinstance(a, dict):
        return {k: _refs(v) for k, v in a.items()}
    return a


def _example(cell, input_size: int, hidden: int, bias: bool, batch: int = 3):
    gen = torch.Generator().manual_seed(0)
    specs = layer_specs(cell, input_size, hidden, bias)
    p = {k: torch.rand(s.shape, generator=gen) - 0.5 for k, s in specs.items()}
    sizes = cell.state_sizes(hidden)
    state = tuple(torch.rand(batch, s, generator=gen) for s in sizes)
    x = torch.rand(batch, input_size, generator=gen)
    with torch.no_grad():
        xp = cell.input_preact(x, p)
    drop = torch.rand(batch, sizes[0], generator=gen)
    return xp, state, p, drop


def trace(cell, input_size: int, hidden: int, bias: bool, check: bool = True):
    """The normalized program of ``cell.step`` at this layer's sizes, and the units per family
    (raises :class:`Unsupported`). With ``check`` the program traced at ``hidden + 1`` must be
    identical."""
    recs = []
    for h in (hidden, hidden + 1):
        try:
            xp, state, p, drop = _example(cell, input_size, h, bias)
            ops, new = record(cell, xp, state, p, drop)
        except Unsupported:
            raise
        except Exception as e:  # a cell that cannot run at this size
            raise Unsupported(f"tracing the step failed ({type(e).__name__}: {e})") from e
        recs.append((h, xp, state, p, drop, ops, new))
    if len(recs[0][5]) != len(recs[1][5]) or any(
            a[0] is not b[0] for a, b in zip(recs[0][5], recs[1][5], strict=True)):
        raise Unsupported("the step runs different ops at different hidden sizes")
    progs = [_build(recs[0], recs[1]), _build(recs[1], recs[0])] if check else \
        [_build(recs[0], recs[1])]
    if check and not _same(progs[0][0], progs[1][0]):
        raise Unsupported("the step's structure depends on the hidden size")
    return progs[0]


def _same(a: Program, b: Program) -> bool:
    return (a.atoms, a.boundaries, a.outputs, a.xp, a.states, a.drop, a.vecs, a.mats) == \
        (b.atoms, b.boundaries, b.outputs, b.xp, b.states, b.drop, b.vecs, b.mats)


def _build(rec, other):
    hidden, xp0, st0, p0, d0, ops0, new0 = rec
    hidden1, xp1, st1, p1, d1, ops1, _ = other
    pid0 = {id(v) for v in p0.values()}
    inputs0, inputs1 = [xp0, d0, *st0], [xp1, d1, *st1]
    unit_c = _width_classes(ops0, ops1, inputs0, inputs1, pid0)
    units = {0: hidden}
    if unit_c:
        units[1] = unit_c
    b = _Builder(units, hidden, hidden1)
    fams = [b.classify(t0.shape[-1], t1.shape[-1])
            for t0, t1 in zip(inputs0, inputs1, strict=True)]
    b.row_input(id(xp0), "xp", 0, *fams[0])
    b.row_input(id(d0), "drop", 0, *fams[1])
    for k, t in enumerate(st0):
        b.row_input(id(t), "state", k, *fams[2 + k])
    b.run(ops0, ops1, pid0)
    outputs = []
    for k, (t, ref) in enumerate(zip(new0, st0, strict=True)):
        v = b.value(t) if _is_tensor(t) else ("bad",)
        if v[0] != "row" or t.shape != ref.shape:
            raise Unsupported(f"state component {k} of the new state is not a row like the old")
        if v[2] != fams[2 + k][0]:
            raise Unsupported(f"state component {k} changes its unit family")
        outputs.append(list(v[1]))
    hoist = Hoist(b.hoist_ops, {k: id(v) for k, v in p0.items()}, b.vec_ids, b.mat_ids)
    prog = Program(b.atoms, b.boundaries, outputs, fams[0], fams[2:], fams[1], b.vecs, b.mats,
                   nfam=len(units), hoist=hoist)
    return prog, units


__all__ = ["Atom", "Boundary", "EW_OPS", "Hoist", "Program", "Unsupported", "trace"]
