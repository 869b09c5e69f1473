"""C++ for a traced :class:`~gyre.engine.fused.ir.Program`: the time loop forward, and the
backward through time with the reverse-mode derivative of every atom written out. What is the
same for every cell (the runtime: pointwise helpers, buffer pool, the matrix products, the
streaming entry) is C++ in ``csrc/``, included by the generated code; only what differs per cell
is written here.

Per step, forward: kernel 0, the boundaries of stage 1 (a matrix product into preallocated
buffers, or a row-wise layer norm), kernel 1, ..., then zoneout and the valid mask. Each kernel
is one loop over rows ``b`` and a vectorizable (``omp simd``) loop over units ``j``. With several
threads the batch is cut into one row range per thread, each running the whole time loop
(``batch_split``); its products use a weight packed once per call (a register-tiled kernel,
``packed_gemm``, or oneDNN's prepacked weight for big products). The weight gradients after the
loop are single products over all ``T*B`` rows (``matmul_tn``). Every module also exports those
products over all rows as ops (``csrc/products.h``: ``mm_rows``, ``mm_tn``) for the input
projection.

Backward, per step from the last: the zoneout/valid backward gives the gradient of the cell's
new state; then kernels and boundaries in reverse, each kernel recomputing its forward atoms
from saved boundary outputs and then accumulating adjoints; one GEMM per matrix product per
step for the gradient of its left operand. The matrices' gradients are single GEMMs over all
``T*B`` rows after the loop.

Streaming, one step at any batch (``step_<tag>``): the forward's kernels on scratch that is
reused across calls, the matrix products (and the input projection, when it is a plain linear
map) by a hand-written vectorized product for small batches, BLAS above. Its Python entry
(``csrc/stream_entry.h``) runs a whole stack of layers per call; see
:mod:`gyre.engine.fused.stream`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from .ir import Atom, Program, Unsupported

#: a value's name in a generated kernel (``v<atom>``)
_VREF = re.compile(r"\bv(\d+)\b")

# forward expressions: {0}, {1} operands, {e} the op's scalar parameter
_FWD = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "rsub": "{1} - {0}", "mul": "{0} * {1}",
    "div": "{0} / {1}", "neg": "-{0}",
    "sigmoid": "T(1) / (T(1) + exp_fin(-{0}))",
    "tanh": "std::tanh({0})",
    "relu": "({0} > T(0) ? {0} : T(0))",
    "exp": "exp_fin({0})", "log": "std::log({0})", "sqrt": "std::sqrt({0})",
    "rsqrt": "T(1) / std::sqrt({0})", "reciprocal": "T(1) / {0}",
    "silu": "{0} / (T(1) + exp_fin(-{0}))",
    "abs": "std::abs({0})",
    "maximum": "({0} > {1} ? {0} : {1})", "minimum": "({0} < {1} ? {0} : {1})",
    "pow": "std::pow({0}, T({e}))",
}
# adjoint contributions per operand: {g} output adjoint, {z} output value
_BWD = {
    "add": ["{g}", "{g}"], "sub": ["{g}", "-{g}"], "rsub": ["-{g}", "{g}"],
    "mul": ["{g} * {1}", "{g} * {0}"], "div": ["{g} / {1}", "-{g} * {z} / {1}"],
    "neg": ["-{g}"],
    "sigmoid": ["{g} * {z} * (T(1) - {z})"],
    "tanh": ["{g} * (T(1) - {z} * {z})"],
    "relu": ["({0} > T(0) ? {g} : T(0))"],
    "exp": ["{g} * {z}"], "log": ["{g} / {0}"], "sqrt": ["{g} * T(0.5) / {z}"],
    "rsqrt": ["T(-0.5) * {g} * {z} * {z} * {z}"], "reciprocal": ["-{g} * {z} * {z}"],
    "silu": ["{g} * (T(1) / (T(1) + exp_fin(-{0}))) * (T(1) + {0} * (T(1) - T(1) / "
             "(T(1) + exp_fin(-{0}))))"],
    "abs": ["({0} > T(0) ? {g} : ({0} < T(0) ? -{g} : T(0)))"],
    "maximum": ["({0} > {1} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))",
                "({1} > {0} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))"],
    "minimum": ["({0} < {1} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))",
                "({1} < {0} ? {g} : ({0} == {1} ? T(0.5) * {g} : T(0)))"],
    "pow": ["{g} * T({e}) * std::pow({0}, T({e}) - T(1))"],
}

def _lit(v: float) -> str:
    if v != v:
        return "std::numeric_limits<T>::quiet_NaN()"
    if v in (float("inf"), float("-inf")):
        return ("" if v > 0 else "-") + "std::numeric_limits<T>::infinity()"
    return f"T({v!r})"


class _Gen:
    def __init__(self, prog: Program, tag: str):
        self.p = prog
        self.tag = tag
        self.S = prog.nstages
        atoms = prog.atoms
        users: dict[int, set[int]] = defaultdict(set)  # atom -> stages of kernels needing it
        for a in atoms:
            if a.op not in ("xp", "state", "drop", "vec", "bout", "const"):
                for x in a.args:
                    users[x].add(a.stage)
        for b in prog.boundaries:
            for x in b.inputs:
                users[x].add(b.stage - 1)
        for comp in prog.outputs:
            for x in comp:
                a = atoms[x]
                if not a.row or a.fam < 0:
                    raise Unsupported("a new state that does not depend on the batch row")
        self.cross: dict[int, int] = {}
        self.ncross: dict[tuple[int, int], int] = defaultdict(int)
        for i, a in enumerate(atoms):
            if a.stage >= 1 and a.op not in ("bout", "const") and users[i] and \
                    max(users[i]) > a.stage:
                key = (a.stage, a.fam)
                self.cross[i] = self.ncross[key]
                self.ncross[key] += 1
        self.bin_alias = self._bin_aliases()
        self.acts = self._saved_activations()
        self.bwd_reads: set[tuple] = set()  # buffers the backward's kernels load (see kernel)
        # buffer slots
        self.slots: dict[tuple, int] = {}
        for name in (("xp",), ("drop",)):
            self.slot(name)
        for k in range(len(prog.states)):
            self.slot(("state", k))
            self.slot(("new", k))
        for i in range(len(prog.vecs)):
            self.slot(("vec", i))
        for bi in range(len(prog.boundaries)):
            self.slot(("bout", bi))
            self.slot(("bin", bi))
        for key in sorted(self.ncross):
            self.slot(("cross", *key))
        for key in sorted(self.acts):
            self.slot(("act", *key))
        self.nfwd = len(self.slots)
        self.slot(("dxp",))
        for k in range(len(prog.states)):
            self.slot(("dstate", k))
            self.slot(("gn", k))
        for i in range(len(prog.vecs)):
            self.slot(("dvec", i))
        for bi in range(len(prog.boundaries)):
            self.slot(("dbout", bi))
            self.slot(("dbin", bi))
        for key in sorted(self.ncross):
            self.slot(("dcross", *key))

    #: ops whose derivative needs their output value only: saved by the forward where worth it
    SAVED_OPS = ("sigmoid", "tanh", "exp")

    def _saved_activations(self) -> dict[tuple[int, int], list[int]]:
        """Per kernel (stage, family): the atoms of :data:`SAVED_OPS` it computes, which its
        forward stores for every step and its backward reads instead of recomputing them. Their
        derivatives need no other value, so the backward then reads neither the input
        pre-activations nor the product's output they came from (the compiler drops that
        recomputation): for an LSTM 5 values per unit instead of 12 and no exp or tanh. Only for
        programs with a recurrent product (the cells that pay for re-reading its output); a
        cell without one (minGRU, minLSTM) recomputes from its input pre-activations alone,
        and over long sequences the saved values would cost as much memory again."""
        out: dict[tuple[int, int], list[int]] = {}
        if not any(b.kind == "mm" for b in self.p.boundaries):
            return out
        for s in range(self.S):
            for f in range(self.p.nfam):
                roots = self.roots(s, f)
                if not roots:
                    continue
                comp, _ = self.closure(s, roots)
                found = [a for a in comp if self.p.atoms[a].op in self.SAVED_OPS]
                if found:
                    out[(s, f)] = found
        return out

    def _bin_aliases(self) -> dict[int, tuple]:
        """Layer norms that read their input where it already is: every block, in order, of the
        input pre-activations (``("xp",)``) or of an earlier boundary's output (``("bout", bj)``),
        those atoms used nowhere else. No kernel copies them into the boundary's input buffer,
        nothing extra is saved, and the layer norm's backward writes their gradient itself."""
        p = self.p
        uses: dict[int, int] = defaultdict(int)
        for a in p.atoms:
            if a.op not in ("xp", "state", "drop", "vec", "bout", "const"):
                for x in a.args:
                    uses[x] += 1
        for b in p.boundaries:
            for x in b.inputs:
                uses[x] += 1
        for comp in p.outputs:
            for x in comp:
                uses[x] += 1
        out = {}
        for bi, b in enumerate(p.boundaries):
            if b.kind != "ln" or any(uses[x] != 1 for x in b.inputs):
                continue
            srcs = {(p.atoms[x].op, p.atoms[x].args[0] if p.atoms[x].op == "bout" else None)
                    for x in b.inputs}
            if len(srcs) != 1:
                continue
            op, bj = srcs.pop()
            if op == "xp":
                key, fam, blocks = ("xp",), p.xp[0], p.xp[1]
            elif op == "bout":
                src = p.boundaries[bj]
                key, fam, blocks = ("bout", bj), src.out_fam, src.out_blocks
            else:
                continue
            if (fam, blocks) == (b.in_fam, len(b.inputs)) and \
                    [p.atoms[x].args[1] for x in b.inputs] == list(range(blocks)):
                out[bi] = key
        return out

    @staticmethod
    def _grad_key(src: tuple) -> tuple:
        """The gradient buffer of an alias source (``("xp",)`` or ``("bout", bj)``)."""
        return ("dxp",) if src == ("xp",) else ("dbout", src[1])

    def _alias_ptrs(self, grad: bool) -> list[str]:
        """Point aliased boundary inputs (and, with ``grad``, their gradients) at their source."""
        L = []
        for bi, key in self.bin_alias.items():
            src = self.slots[key]
            L.append(f"    P[{self.slots[('bin', bi)]}] = P[{src}]; "
                     f"LD[{self.slots[('bin', bi)]}] = LD[{src}];")
            if grad:
                dsrc = self.slots[self._grad_key(key)]
                L.append(f"    P[{self.slots[('dbin', bi)]}] = P[{dsrc}]; "
                         f"LD[{self.slots[('dbin', bi)]}] = LD[{dsrc}];")
        return L

    def slot(self, key) -> int:
        if key not in self.slots:
            self.slots[key] = len(self.slots)
        return self.slots[key]

    # -- widths (C++ expressions of the runtime units U[f]) ------------------------------------
    @staticmethod
    def width(fam: int, blocks: int) -> str:
        return f"({blocks} * U[{fam}])"

    def roots(self, s: int, f: int):
        """What kernel (s, f) materializes: [(atom, kind, index, position)]."""
        p, out = self.p, []
        for k, comp in enumerate(p.outputs):
            for blk, a in enumerate(comp):
                if p.atoms[a].stage == s and p.atoms[a].fam == f:
                    out.append((a, "new", k, blk))
        for bi, b in enumerate(p.boundaries):
            if b.stage - 1 == s and b.in_fam == f and bi not in self.bin_alias:
                for pos, a in enumerate(b.inputs):
                    out.append((a, "bin", bi, pos))
        for a, slot in self.cross.items():
            at = p.atoms[a]
            if at.stage == s and at.fam == f:
                out.append((a, "cross", (at.stage, at.fam), slot))
        return out

    def closure(self, s: int, roots) -> tuple[list[int], list[int]]:
        """Atoms evaluated in kernel s: (computed in topological order, terminals)."""
        seen, comp, term = set(), set(), set()
        stack = [r[0] for r in roots]
        while stack:
            a = stack.pop()
            if a in seen:
                continue
            seen.add(a)
            at = self.p.atoms[a]
            if at.op in ("xp", "state", "drop", "vec", "bout", "const"):
                term.add(a)
            elif a in self.cross and at.stage < s:
                term.add(a)
            else:
                comp.add(a)
                stack.extend(at.args)
        return sorted(comp), sorted(term)

    def load(self, a: int, s: int) -> tuple[str, str | None]:
        """(value expression, row-pointer slot name) of a terminal atom in kernel s."""
        at = self.p.atoms[a]
        if at.op == "const":
            return _lit(at.args[0]), None
        if at.op in ("xp", "drop"):
            return f"p{self.slots[(at.op,)]}[{at.args[1]} * U_ + j]", (at.op,)
        if at.op == "state":
            key = ("state", at.args[0])
        elif at.op == "vec":
            key = ("vec", at.args[0])
        elif at.op == "bout":
            key = ("bout", at.args[0])
        else:  # cross
            key = ("cross", at.stage, at.fam)
            return f"p{self.slots[key]}[{self.cross[a]} * U_ + j]", key
        return f"p{self.slots[key]}[{at.args[1]} * U_ + j]", key

    def grad_target(self, a: int) -> tuple | None:
        at = self.p.atoms[a]
        if at.op == "const" or at.op == "drop":
            return None
        if at.op == "xp":
            return ("dxp",), at.args[1]
        if at.op in ("state", "vec", "bout"):
            return ("d" + at.op, at.args[0]), at.args[1]
        return ("dcross", at.stage, at.fam), self.cross[a]

    def expr(self, a: int) -> str:
        at = self.p.atoms[a]
        args = [f"v{x}" for x in at.args]
        e = at.extra[0] if at.extra else 0
        return _FWD[at.op].format(*args, e=repr(float(e)))

    def kernel(self, s: int, f: int, backward: bool) -> str | None:
        roots = self.roots(s, f)
        if not roots:
            return None
        comp, term = self.closure(s, roots)
        used: set = set()
        body: list[str] = []
        # the values a kernel defines: atom -> (its line, the buffer it loads from or None)
        defs: dict[int, tuple[str, tuple | None]] = {}
        for a in term:
            val, key = self.load(a, s)
            defs[a] = (f"const T v{a} = {val};", key)
        acts = self.acts.get((s, f), [])
        act_key = ("act", s, f)
        for a in comp:
            if backward and a in acts:
                defs[a] = (f"const T v{a} = p{self.slots[act_key]}[{acts.index(a)} * U_ + j];",
                           act_key)
            else:
                defs[a] = (f"const T v{a} = {self.expr(a)};", None)
        if not backward:
            for a in term + comp:
                line, key = defs[a]
                body.append(line)
                if key is not None:
                    used.add(key)
            if acts:
                used.add(act_key)
            for a, kind, idx, pos in roots:
                key = (kind, idx) if kind != "cross" else ("cross", *idx)
                used.add(key)
                body.append(f"p{self.slots[key]}[{pos} * U_ + j] = v{a};")
            for n, a in enumerate(acts):
                body.append(f"p{self.slots[act_key]}[{n} * U_ + j] = v{a};")
        else:
            every = term + comp
            for a in every:
                if self.p.atoms[a].op != "const":
                    body.append(f"T g{a} = T(0);")
            for a, kind, idx, pos in roots:
                key = {"new": ("gn", idx), "bin": ("dbin", idx)}.get(kind)
                if key is None:
                    key = ("dcross", *idx)
                used.add(key)
                body.append(f"g{a} += p{self.slots[key]}[{pos} * U_ + j];")
            for a in reversed(comp):
                at = self.p.atoms[a]
                e = at.extra[0] if at.extra else 0
                vals = [f"v{x}" for x in at.args]
                for x, tmpl in zip(at.args, _BWD[at.op], strict=False):
                    if self.p.atoms[x].op == "const":
                        continue
                    body.append(f"g{x} += {tmpl.format(*vals, g=f'g{a}', z=f'v{a}', e=repr(float(e)))};")
            for a in term:
                tgt = self.grad_target(a)
                if tgt is None:
                    continue
                key, pos = tgt
                if (key == ("dxp",) and self.dxp_alias is not None) or \
                        (key[0] == "dvec" and key[1] in self.vec_alias):
                    continue  # the same values are written to (or summed from) another buffer
                used.add(key)
                first = self.first_writer.get((key, pos)) == (s, f)
                body.append(f"p{self.slots[key]}[{pos} * U_ + j] {'=' if first else '+='} g{a};")
            # only the values the gradients read: a value the saved activations made dead is
            # neither loaded nor recomputed, so the forward need not keep its buffer (a
            # product's output, see _bout_saved) for the backward
            live: set[int] = set()
            todo = [int(m) for line in body for m in _VREF.findall(line)]
            while todo:
                a = todo.pop()
                if a in live or a not in defs:
                    continue
                live.add(a)
                todo.extend(int(m) for m in _VREF.findall(defs[a][0].split("=", 1)[1]))
            lines_v = []
            for a in term + comp:
                if a in live:
                    line, key = defs[a]
                    lines_v.append(line)
                    if key is not None:
                        used.add(key)
                        self.bwd_reads.add(key)
            body = lines_v + body
        name = f"k{'b' if backward else 'f'}_{self.tag}_s{s}_f{f}"
        ptrs = [f"    T* __restrict__ p{self.slots[key]} = P[{self.slots[key]}] + b * "
                f"LD[{self.slots[key]}];" for key in sorted(used, key=lambda k: self.slots[k])]
        lines = [
            "template <typename T>",
            f"static void {name}(int64_t b0, int64_t b1, int64_t U_, T* const* P, "
            "const int64_t* LD) {",
            "  for (int64_t b = b0; b < b1; ++b) {",
            *ptrs,
            "#pragma omp simd",
            "    for (int64_t j = 0; j < U_; ++j) {",
            *("      " + x for x in body),
            "    }",
            "  }",
            "}",
        ]
        self.work[(backward, s, f)] = len(comp) + len(term)
        return name, "\n".join(lines)

    # -- drivers -------------------------------------------------------------------------------
    def _call(self, kernels, backward: bool, s: int, f: int) -> str:
        name = kernels[(backward, s, f)]
        work = self.work[(backward, s, f)]
        return (f"    rows(NB, {work} * U[{f}], [&](int64_t b0, int64_t b1) {{ "
                f"{name}<T>(b0, b1, U[{f}], P, LD); }});")

    def _first_writers(self) -> None:
        """Which backward kernel writes each gradient block of dxp/dbout first (it assigns
        instead of accumulating, so those buffers need no zeroing)."""
        self.first_writer = {}
        self.writers = defaultdict(int)
        for s in reversed(range(self.S)):
            for f in range(self.p.nfam):
                roots = self.roots(s, f)
                if not roots:
                    continue
                _, term = self.closure(s, roots)
                for a in term:
                    tgt = self.grad_target(a)
                    if tgt is None or tgt[0][0] not in ("dxp", "dbout"):
                        continue
                    self.writers[tgt] += 1
                    self.first_writer.setdefault(tgt, (s, f))

    def _lns(self) -> list[int]:
        return [bi for bi, b in enumerate(self.p.boundaries) if b.kind == "ln"]

    def _canonical(self, s: int, f: int) -> dict[int, int]:
        """For kernel (s, f)'s terminals: the atom whose adjoint equals theirs. An atom whose one
        use is as a term of a sum passes its adjoint on unchanged (``g_a = g_c``), so e.g. the
        input pre-activation, the product's output and a bias added to them all have the
        adjoint of their sum."""
        roots = self.roots(s, f)
        comp, term = self.closure(s, roots)
        uses: dict[int, list[int]] = defaultdict(list)
        for c in comp:
            for x in self.p.atoms[c].args:
                uses[x].append(c)
        rootset = {r[0] for r in roots}
        out = {}
        for a in term:
            c = a
            while c not in rootset and len(uses[c]) == 1:
                u = self.p.atoms[uses[c][0]]
                if not (u.op == "add" or (u.op == "sub" and u.args[0] == c)):
                    break
                c = uses[c][0]
            out[a] = c
        return out

    def _aliases(self) -> None:
        """Gradient buffers that would hold the same values: ``dxp`` equal to a product's
        ``dbout`` block by block (written once, returned as both), and a vector's gradient that
        is the column sum of such a buffer (one sum after the loop instead of a per-row
        accumulation every step)."""
        p = self.p
        found: dict = {}  # (key, pos) -> (kernel, canonical atom), for single-writer targets
        for s in range(self.S):
            for f in range(p.nfam):
                if not self.roots(s, f):
                    continue
                canon = self._canonical(s, f)
                for a, c in canon.items():
                    tgt = self.grad_target(a)
                    if tgt is None:
                        continue
                    found.setdefault(tgt, []).append(((s, f), c))

        def same(k1, k2, blocks: int) -> bool:
            return all(len(found.get((k1, i), [])) == 1 and found.get((k2, i)) == found[(k1, i)]
                       for i in range(blocks))

        self.dxp_alias = None  # bi: dxp is dbout{bi}
        xp_w = self.width(*p.xp)
        for bi, b in enumerate(p.boundaries):
            if b.kind == "mm" and self.width(b.out_fam, b.out_blocks) == xp_w and \
                    same(("dxp",), ("dbout", bi), p.xp[1]):
                self.dxp_alias = bi
                break
        self.vec_alias: dict[int, tuple] = {}  # vec -> the gradient buffer it sums
        for v, (fam, blocks) in enumerate(p.vecs):
            cands = [(("dxp",), p.xp)] + [(("dbout", bi), (b.out_fam, b.out_blocks))
                                          for bi, b in enumerate(p.boundaries)]
            for key, (bf, bb) in cands:
                if (bf, bb) == (fam, blocks) and same(("dvec", v), key, blocks):
                    self.vec_alias[v] = key
                    break

    def _step_dbouts(self) -> set[int]:
        """Layer norms whose output gradient nothing reads after its own step (no column sum):
        one block of rows reused every step instead of a buffer over all steps."""
        summed = set(self.vec_alias.values())
        return {bi for bi, b in enumerate(self.p.boundaries)
                if b.kind == "ln" and ("dbout", bi) not in summed}

    def _needs_zero(self, key, blocks: int) -> bool:
        if any(key == self._grad_key(src) for src in self.bin_alias.values()):
            return False  # written whole by that layer norm's backward
        return any(self.writers[(key, pos)] == 0 for pos in range(blocks))

    def source(self) -> str:
        p = self.p
        self._first_writers()
        self._aliases()
        self.work = {}
        kernels = {}
        parts = []
        for backward in (False, True):
            for s in range(self.S):
                for f in range(p.nfam):
                    k = self.kernel(s, f, backward)
                    if k is not None:
                        kernels[(backward, s, f)] = k[0]
                        parts.append(k[1])
        parts.append(self.fwd_driver(kernels))
        parts.append(self.bwd_driver(kernels))
        parts.append(self.step_driver(kernels))
        return "\n\n".join(parts)

    def _common(self) -> list[str]:
        p = self.p
        L = [
            "  const int64_t T_ = xp.size(0), B = xp.size(1);",
            f"  int64_t U[{max(p.nfam, 1)}];",
            f"  for (int64_t f = 0; f < {p.nfam}; ++f) U[f] = units[f];",
            "  auto opts = xp.options();",
            f"  const int64_t W_xp = {self.width(*p.xp)};",
        ]
        for k, st in enumerate(p.states):
            L.append(f"  const int64_t S{k} = {self.width(*st)};")
        for bi, b in enumerate(p.boundaries):
            L.append(f"  const int64_t WI{bi} = {self.width(b.in_fam, len(b.inputs))};")
            L.append(f"  const int64_t WO{bi} = {self.width(b.out_fam, b.out_blocks)};")
        for (s, f), n in sorted(self.ncross.items()):
            L.append(f"  const int64_t WC{s}_{f} = {self.width(f, n)};")
        for (s, f), a in sorted(self.acts.items()):
            L.append(f"  const int64_t WA{s}_{f} = {self.width(f, len(a))};")
        L += [
            f"  T* P0[{len(self.slots)}] = {{}};",
            f"  int64_t LD0[{len(self.slots)}] = {{}};",
            f"  P0[{self.slots[('drop',)]}] = ptr<T>(drop); LD0[{self.slots[('drop',)]}] = "
            f"drop.size(1);",
            "  const bool* vptr = valid.numel() ? valid.data_ptr<bool>() : nullptr;",
        ]
        for i in range(len(p.vecs)):
            L.append(f"  P0[{self.slots[('vec', i)]}] = ptr<T>(vecs[{i}]);")
        return L

    def _row_cost(self) -> str:
        """Work per batch row per time step (multiply-adds of its products plus the kernels'
        op counts), as C++ over the drivers' width names: what ``batch_split`` weighs."""
        terms = [f"WI{bi} * WO{bi}" for bi, b in enumerate(self.p.boundaries) if b.kind == "mm"]
        terms += [f"{w} * U[{f}]" for (bwd, s, f), w in sorted(self.work.items()) if not bwd]
        return "(" + " + ".join(terms or ["1"]) + ")"

    def _chunk_open(self, mats: str) -> list[str]:
        """Start of the time loop's body over batch rows [R0, R1): the rows of a batch never
        meet in a recurrence, so each chunk runs the whole loop on its own (one per thread,
        see ``batch_split``) with its own pointer arrays, the shared ones moved to row R0."""
        n = len(self.slots)
        return [
            "  std::vector<Packed> tiled;  // the tiled kernel's weights, shared by the chunks",
            f"  if (packed.empty()) for (const auto& m : {mats}) tiled.push_back(pack<T>(m));",
            f"  else tiled.resize({mats}.size());",
            "  auto chunk = [&](int64_t R0, int64_t R1) {",
            "  const int64_t NB = R1 - R0;",
            f"  T* P[{n}];",
            f"  int64_t LD[{n}];",
            f"  for (int i = 0; i < {n}; ++i) {{ LD[i] = LD0[i]; P[i] = P0[i] ? P0[i] + R0 * LD0[i] "
            ": nullptr; }",
        ]

    def _bout_saved(self, bi: int) -> bool:
        """Whether the backward reads boundary ``bi``'s output: a kernel loads it (for an LSTM
        the saved activations leave no such load) or a layer norm reads it as its input. Else
        the forward writes it to one block of rows reused every step, not a buffer over all
        steps. Valid once the backward's kernels are generated (:meth:`source`)."""
        return ("bout", bi) in self.bwd_reads or ("bout", bi) in self.bin_alias.values()

    def _step_ptrs(self, saved_t: str, backward: bool = False) -> list[str]:
        p, sl = self.p, self.slots
        L = [f"    P[{sl[('xp',)]}] = xp_p + (t * B + R0) * W_xp; LD[{sl[('xp',)]}] = W_xp;"]
        for k in range(len(p.states)):
            L.append(f"    P[{sl[('state', k)]}] = (t == 0 ? ptr<T>(state0[{k}]) : "
                     f"seq{k}_p + (t - 1) * B * S{k}) + R0 * S{k}; LD[{sl[('state', k)]}] = S{k};")
            L.append(f"    P[{sl[('new', k)]}] = seq{k}_p + (t * B + R0) * S{k}; "
                     f"LD[{sl[('new', k)]}] = S{k};")
        for bi in range(len(p.boundaries)):
            kept = self._bout_saved(bi)
            if kept or not backward:  # an output the backward does not read: no pointer there
                L.append(f"    P[{sl[('bout', bi)]}] = bout{bi}_p + ({saved_t if kept else 0} * B "
                         f"+ R0) * WO{bi}; LD[{sl[('bout', bi)]}] = WO{bi};")
            if bi not in self.bin_alias:
                L.append(f"    P[{sl[('bin', bi)]}] = bin{bi}_p + ({saved_t} * B + R0) * WI{bi}; "
                         f"LD[{sl[('bin', bi)]}] = WI{bi};")
        for (s, f) in sorted(self.ncross):
            i = sl[("cross", s, f)]
            L.append(f"    P[{i}] = cross{s}_{f}_p + ({saved_t} * B + R0) * WC{s}_{f}; "
                     f"LD[{i}] = WC{s}_{f};")
        for (s, f) in sorted(self.acts):
            i = sl[("act", s, f)]
            L.append(f"    P[{i}] = act{s}_{f}_p + ({saved_t} * B + R0) * WA{s}_{f}; "
                     f"LD[{i}] = WA{s}_{f};")
        return L

    def fwd_driver(self, kernels) -> str:
        p, sl = self.p, self.slots
        L = [
            "template <typename T>",
            f"static std::vector<at::Tensor> fwd_{self.tag}_impl(const at::Tensor& xp, "
            "at::TensorList state0, at::TensorList vecs, at::TensorList mats, "
            "at::TensorList packed, const at::Tensor& drop, at::TensorList zone, "
            "at::IntArrayRef zmode, const at::Tensor& valid, at::IntArrayRef units, bool save) {",
            *self._common(),
            "  const int64_t TS = save ? T_ : 1;",
            "  std::vector<at::Tensor> res;",
            "  T* xp_p = xp.data_ptr<T>();",
        ]
        for k in range(len(p.states)):
            L.append(f"  at::Tensor seq{k} = pooled({{T_, B, S{k}}}, opts, false); "
                     f"T* seq{k}_p = seq{k}.data_ptr<T>(); res.push_back(seq{k});")
        saved = []
        for bi in range(len(p.boundaries)):
            for nm, w in (("bin", "WI"), ("bout", "WO")):
                key = self.bin_alias.get(bi) if nm == "bin" else None
                if key is not None:  # saved as its source (the backward reads it there)
                    saved.append("xp" if key == ("xp",) else f"bout{key[1]}")
                    continue
                rows = "TS" if nm == "bin" or self._bout_saved(bi) else "1"
                L.append(f"  at::Tensor {nm}{bi} = pooled({{{rows}, B, {w}{bi}}}, opts, false); "
                         f"T* {nm}{bi}_p = {nm}{bi}.data_ptr<T>();")
                saved.append(f"{nm}{bi}")
        for (s, f) in sorted(self.ncross):
            L.append(f"  at::Tensor cross{s}_{f} = pooled({{TS, B, WC{s}_{f}}}, opts, false); "
                     f"T* cross{s}_{f}_p = cross{s}_{f}.data_ptr<T>();")
            saved.append(f"cross{s}_{f}")
        for bi in self._lns():  # each row's mean and rstd, for the backward
            L.append(f"  at::Tensor st{bi} = pooled({{TS, B, 2}}, opts, false); "
                     f"T* st{bi}_p = st{bi}.data_ptr<T>();")
            saved.append(f"st{bi}")
        for (s, f) in sorted(self.acts):
            L.append(f"  at::Tensor act{s}_{f} = pooled({{TS, B, WA{s}_{f}}}, opts, false); "
                     f"T* act{s}_{f}_p = act{s}_{f}.data_ptr<T>();")
            saved.append(f"act{s}_{f}")
        L += self._chunk_open("mats")
        L.append("  for (int64_t t = 0; t < T_; ++t) {")
        L.append("    const int64_t ts = save ? t : 0;")
        L += self._step_ptrs("ts")
        L += self._alias_ptrs(False)
        for s in range(self.S):
            if s > 0:
                L += self._boundaries_fwd(s)
            for f in range(p.nfam):
                if (False, s, f) in kernels:
                    L.append(self._call(kernels, False, s, f))
        for k in range(len(p.states)):
            L.append(f"    post_fwd<T>(P[{sl[('new', k)]}], P[{sl[('state', k)]}], "
                     f"zmode[{k}] ? zone[{k}].data_ptr<T>() + (zmode[{k}] == 2 ? (t * B + R0) * S{k} "
                     f": 0) : nullptr, zmode[{k}], vptr ? vptr + t * B + R0 : nullptr, NB, S{k});")
        L.append("  }")
        L.append("  };")
        L.append(f"  batch_split(B, T_ * {self._row_cost()}, chunk);")
        L.append("  if (save) {")
        for nm in saved:
            L.append(f"    res.push_back({nm});")
        L.append("  }")
        L.append("  return res;")
        L.append("}")
        return "\n".join(L)

    def _boundaries_fwd(self, s: int, step: bool = False) -> list[str]:
        """The forward of stage ``s``'s boundaries: matrix products (the time loop's ``gemm`` on
        ``mats``/``packed``, or with ``step`` the streaming step's ``linear`` on the layer's raw
        matrices) and layer norms."""
        L = []
        sl = self.slots
        for bi, b in enumerate(self.p.boundaries):
            if b.stage != s:
                continue
            out, inp = f"P[{sl[('bout', bi)]}], WO{bi}", f"P[{sl[('bin', bi)]}], WI{bi}"
            if b.kind == "mm" and step:
                L.append(f"    linear<T>({out}, {inp}, NB, static_cast<const T*>(Ly.mats[{b.mat}]), "
                         f"Ly.mat_ld[{b.mat}], WI{bi}, WO{bi}, nullptr);")
            elif b.kind == "mm":
                L.append(f"    gemm<T>({out}, {inp}, NB, mats[{b.mat}], "
                         f"packed.empty() ? nullptr : &packed[{2 * b.mat}], &tiled[{b.mat}]);")
            else:
                w = f"P[{sl[('vec', b.weight)]}]" if b.weight >= 0 else "nullptr"
                c = f"P[{sl[('vec', b.bias)]}]" if b.bias >= 0 else "nullptr"
                st = "nullptr" if step else f"st{bi}_p + (ts * B + R0) * 2"
                L.append(f"    ln_fwd<T>(P[{sl[('bin', bi)]}], P[{sl[('bout', bi)]}], {w}, {c}, "
                         f"NB, WI{bi}, {b.eps!r}, {st});")
        return L

    def step_driver(self, kernels) -> str:
        """One time step for streaming: the forward's kernels on scratch from ``gyre_stream::Work``
        (no allocation once grown), the matrix products by ``linear`` (the input projection too
        when ``L.wih`` is set), the new state written to ``sout`` (``sin[k]`` null: zeros)."""
        p, sl = self.p, self.slots
        nb = len(p.boundaries)
        K = len(p.states)
        L = [
            "template <typename T>",
            f"static void step_{self.tag}_impl(const gyre_stream::Layer& Ly, int64_t B, "
            "const T* xin, T* const* sin, T* const* sout, gyre_stream::Work& wk) {",
            f"  int64_t U[{max(p.nfam, 1)}];",
            f"  for (int64_t f = 0; f < {p.nfam}; ++f) U[f] = Ly.units[f];",
            f"  const int64_t W_xp = {self.width(*p.xp)}, W_dr = {self.width(*p.drop)};",
        ]
        for k, st in enumerate(p.states):
            L.append(f"  const int64_t S{k} = {self.width(*st)};")
        for bi, b in enumerate(p.boundaries):
            L.append(f"  const int64_t WI{bi} = {self.width(b.in_fam, len(b.inputs))};")
            L.append(f"  const int64_t WO{bi} = {self.width(b.out_fam, b.out_blocks)};")
        for (s, f), n in sorted(self.ncross.items()):
            L.append(f"  const int64_t WC{s}_{f} = {self.width(f, n)};")
        for (s, f), a in sorted(self.acts.items()):
            L.append(f"  const int64_t WA{s}_{f} = {self.width(f, len(a))};")
        sizes = ["(Ly.wih ? B * W_xp : 0)", "W_dr"]
        sizes += [f"B * S{k}" for k in range(K)]
        sizes += [f"B * (WI{bi} + WO{bi})" for bi in range(nb)]
        sizes += [f"B * WC{s}_{f}" for (s, f) in sorted(self.ncross)]
        sizes += [f"B * WA{s}_{f}" for (s, f) in sorted(self.acts)]
        n_bufs = 3 + K + 2 * nb + len(self.ncross) + len(self.acts)
        L += [
            f"  T* cur = wk.get<T>({' + '.join(sizes)} + {n_bufs} * 64);",
            "  const int64_t NB = B;",
            f"  T* P[{len(self.slots)}] = {{}};",
            f"  int64_t LD[{len(self.slots)}] = {{}};",
            "  if (Ly.wih) {",
            "    T* xp = carve(cur, B * W_xp);",
            "    linear<T>(xp, W_xp, xin, Ly.in_size, B, static_cast<const T*>(Ly.wih), Ly.wih_ld, "
            "Ly.in_size, W_xp, static_cast<const T*>(Ly.bih));",
            f"    P[{sl[('xp',)]}] = xp;",
            "  } else {",
            f"    P[{sl[('xp',)]}] = const_cast<T*>(xin);",
            "  }",
            f"  LD[{sl[('xp',)]}] = W_xp;",
            "  T* ones = carve(cur, W_dr);",
            "  for (int64_t j = 0; j < W_dr; ++j) ones[j] = T(1);",
            f"  P[{sl[('drop',)]}] = ones; LD[{sl[('drop',)]}] = 0;  // no recurrent dropout",
        ]
        for i in range(len(p.vecs)):
            L.append(f"  P[{sl[('vec', i)]}] = const_cast<T*>(static_cast<const T*>(Ly.vecs[{i}]));")
        for k in range(K):
            L += [
                f"  if (sin[{k}]) {{ P[{sl[('state', k)]}] = sin[{k}]; }} else {{",
                f"    P[{sl[('state', k)]}] = carve(cur, B * S{k});",
                f"    std::memset(P[{sl[('state', k)]}], 0, sizeof(T) * B * S{k});",
                "  }",
                f"  LD[{sl[('state', k)]}] = S{k};",
                f"  P[{sl[('new', k)]}] = sout[{k}]; LD[{sl[('new', k)]}] = S{k};",
            ]
        for bi in range(nb):
            if bi not in self.bin_alias:
                L.append(f"  P[{sl[('bin', bi)]}] = carve(cur, B * WI{bi}); "
                         f"LD[{sl[('bin', bi)]}] = WI{bi};")
            L.append(f"  P[{sl[('bout', bi)]}] = carve(cur, B * WO{bi}); LD[{sl[('bout', bi)]}] = WO{bi};")
        L += self._alias_ptrs(False)
        for (s, f) in sorted(self.ncross):
            i = sl[("cross", s, f)]
            L.append(f"  P[{i}] = carve(cur, B * WC{s}_{f}); LD[{i}] = WC{s}_{f};")
        for (s, f) in sorted(self.acts):  # written by the forward's kernels, read by none
            i = sl[("act", s, f)]
            L.append(f"  P[{i}] = carve(cur, B * WA{s}_{f}); LD[{i}] = WA{s}_{f};")
        for s in range(self.S):
            if s > 0:
                L += self._boundaries_fwd(s, step=True)
            for f in range(p.nfam):
                if (False, s, f) in kernels:
                    L.append(self._call(kernels, False, s, f).strip())
        for k in range(K):
            L.append(f"  if (Ly.zone[{k}] >= 0) {{ const T z = T(Ly.zone[{k}]); "
                     f"post_fwd<T>(P[{sl[('new', k)]}], P[{sl[('state', k)]}], &z, 1, nullptr, B, "
                     f"S{k}); }}")
        L.append("}")
        L += [
            f"__attribute__((visibility(\"hidden\"))) void step_{self.tag}(bool dbl, "
            "const gyre_stream::Layer& Ly, int64_t B, const void* xin, void* const* sin, "
            "void* const* sout, gyre_stream::Work& wk) {",
            f"  if (dbl) step_{self.tag}_impl<double>(Ly, B, static_cast<const double*>(xin), "
            "reinterpret_cast<double* const*>(sin), reinterpret_cast<double* const*>(sout), wk);",
            f"  else step_{self.tag}_impl<float>(Ly, B, static_cast<const float*>(xin), "
            "reinterpret_cast<float* const*>(sin), reinterpret_cast<float* const*>(sout), wk);",
            "}",
        ]
        return "\n".join(L)

    def bwd_driver(self, kernels) -> str:
        p, sl = self.p, self.slots
        nb = len(p.boundaries)
        L = [
            "template <typename T>",
            f"static std::vector<at::Tensor> bwd_{self.tag}_impl(at::TensorList gseq, "
            "const at::Tensor& xp, at::TensorList state0, at::TensorList seq, "
            "at::TensorList vecs, at::TensorList mats, at::TensorList packed, "
            "const at::Tensor& drop, at::TensorList zone, at::IntArrayRef zmode, "
            "const at::Tensor& valid, at::TensorList saved, at::IntArrayRef units) {",
            *self._common(),
            "  T* xp_p = xp.data_ptr<T>();",
        ]
        if self.dxp_alias is None:
            L.append(f"  at::Tensor dxp = pooled(xp.sizes(), opts, "
                     f"{'true' if self._needs_zero(('dxp',), p.xp[1]) else 'false'}); "
                     "T* dxp_p = dxp.data_ptr<T>();")
        else:
            L.append("  at::Tensor dxp; T* dxp_p = nullptr;  // the same values as a dbout")
        for k in range(len(p.states)):
            L.append(f"  T* seq{k}_p = seq[{k}].data_ptr<T>();")
            L.append(f"  T* gseq{k}_p = gseq[{k}].data_ptr<T>();")
            L.append(f"  at::Tensor dstate{k} = at::zeros({{B, S{k}}}, opts), "
                     f"gn{k} = at::empty({{B, S{k}}}, opts);")
            L.append(f"  P0[{sl[('dstate', k)]}] = dstate{k}.data_ptr<T>(); "
                     f"LD0[{sl[('dstate', k)]}] = S{k};")
            L.append(f"  P0[{sl[('gn', k)]}] = gn{k}.data_ptr<T>(); LD0[{sl[('gn', k)]}] = S{k};")
        i = 0
        for bi in range(nb):
            L.append(f"  const at::Tensor& bin{bi} = saved[{i}]; const at::Tensor& bout{bi} = "
                     f"saved[{i + 1}];")
            L.append(f"  T* bin{bi}_p = bin{bi}.data_ptr<T>(); T* bout{bi}_p = bout{bi}.data_ptr<T>();")
            init = "true" if self._needs_zero(("dbout", bi), p.boundaries[bi].out_blocks) \
                else "false"
            rows = "B" if bi in self._step_dbouts() else "T_, B"
            L.append(f"  at::Tensor dbout{bi} = pooled({{{rows}, WO{bi}}}, opts, {init}); "
                     f"T* dbout{bi}_p = dbout{bi}.data_ptr<T>();")
            if self.dxp_alias == bi:
                L.append(f"  dxp = dbout{bi}; dxp_p = dbout{bi}_p;")
            if bi not in self.bin_alias:  # else its source's gradient, set every step
                L.append(f"  at::Tensor dbin{bi} = at::empty({{B, WI{bi}}}, opts); "
                         f"P0[{sl[('dbin', bi)]}] = dbin{bi}.data_ptr<T>(); "
                         f"LD0[{sl[('dbin', bi)]}] = WI{bi};")
            i += 2
        for (s, f) in sorted(self.ncross):
            L.append(f"  const at::Tensor& cross{s}_{f} = saved[{i}]; "
                     f"T* cross{s}_{f}_p = cross{s}_{f}.data_ptr<T>();")
            L.append(f"  at::Tensor dcross{s}_{f} = at::zeros({{B, WC{s}_{f}}}, opts); "
                     f"P0[{sl[('dcross', s, f)]}] = dcross{s}_{f}.data_ptr<T>(); "
                     f"LD0[{sl[('dcross', s, f)]}] = WC{s}_{f};")
            i += 1
        for bi in self._lns():
            L.append(f"  T* st{bi}_p = saved[{i}].data_ptr<T>();")
            i += 1
        for (s, f) in sorted(self.acts):
            L.append(f"  T* act{s}_{f}_p = saved[{i}].data_ptr<T>();")
            i += 1
        L.append("  std::vector<at::Tensor> matsT;")
        L.append("  for (const auto& m : mats) matsT.push_back(m.t());")
        for v in range(len(p.vecs)):
            if v not in self.vec_alias:  # per-row sums over steps, summed over rows at the end
                L.append(f"  at::Tensor dvec{v} = at::zeros({{B, vecs[{v}].size(0)}}, opts); "
                         f"P0[{sl[('dvec', v)]}] = dvec{v}.data_ptr<T>(); "
                         f"LD0[{sl[('dvec', v)]}] = vecs[{v}].size(0);")
        L += self._chunk_open("matsT")
        # a vector's gradient: every row of a chunk adds into the chunk's first row (row stride 0),
        # one row that stays in L1 across the steps, instead of a row per batch row each step
        for v in range(len(p.vecs)):
            if v not in self.vec_alias:
                L.append(f"  LD[{sl[('dvec', v)]}] = 0;")
        L.append("  for (int64_t t = T_ - 1; t >= 0; --t) {")
        L += self._step_ptrs("t", backward=True)
        L.append(f"    P[{sl[('dxp',)]}] = dxp_p + (t * B + R0) * W_xp; LD[{sl[('dxp',)]}] = W_xp;")
        for bi in range(nb):
            if bi in self._step_dbouts():
                L.append(f"    P[{sl[('dbout', bi)]}] = dbout{bi}_p + R0 * WO{bi}; "
                         f"LD[{sl[('dbout', bi)]}] = WO{bi};")
                if self._needs_zero(("dbout", bi), p.boundaries[bi].out_blocks):
                    L.append(f"    std::memset(P[{sl[('dbout', bi)]}], 0, sizeof(T) * NB * WO{bi});")
            else:
                L.append(f"    P[{sl[('dbout', bi)]}] = dbout{bi}_p + (t * B + R0) * WO{bi}; "
                         f"LD[{sl[('dbout', bi)]}] = WO{bi};")
        L += self._alias_ptrs(True)
        for k in range(len(p.states)):
            L.append(f"    post_bwd<T>(gseq{k}_p + (t * B + R0) * S{k}, P[{sl[('dstate', k)]}], "
                     f"P[{sl[('gn', k)]}], zmode[{k}] ? zone[{k}].data_ptr<T>() + "
                     f"(zmode[{k}] == 2 ? (t * B + R0) * S{k} : 0) : nullptr, zmode[{k}], "
                     f"vptr ? vptr + t * B + R0 : nullptr, NB, S{k});")
        for (s, f) in sorted(self.ncross):
            L.append(f"    std::memset(P[{sl[('dcross', s, f)]}], 0, sizeof(T) * NB * WC{s}_{f});")
        for s in reversed(range(self.S)):
            for f in range(p.nfam):
                if (True, s, f) in kernels:
                    L.append(self._call(kernels, True, s, f))
            if s > 0:
                for bi, b in enumerate(p.boundaries):
                    if b.stage != s:
                        continue
                    if b.kind == "mm":
                        L.append(f"    gemm<T>(P[{sl[('dbin', bi)]}], WI{bi}, "
                                 f"P[{sl[('dbout', bi)]}], WO{bi}, NB, matsT[{b.mat}], "
                                 f"packed.empty() ? nullptr : &packed[{2 * b.mat + 1}], "
                                 f"&tiled[{b.mat}]);")
                    else:
                        w = f"P[{sl[('vec', b.weight)]}]" if b.weight >= 0 else "nullptr"
                        dw = f"P[{sl[('dvec', b.weight)]}]" if b.weight >= 0 else "nullptr"
                        dc = f"P[{sl[('dvec', b.bias)]}]" if b.bias >= 0 and \
                            b.bias not in self.vec_alias else "nullptr"
                        L.append(f"    ln_bwd<T>(P[{sl[('bin', bi)]}], P[{sl[('dbout', bi)]}], "
                                 f"{w}, P[{sl[('dbin', bi)]}], {dw}, {dc}, NB, WI{bi}, "
                                 f"{b.eps!r}, st{bi}_p + (t * B + R0) * 2);")
        L.append("  }")
        L.append("  };")
        L.append(f"  batch_split(B, T_ * {self._row_cost()}, chunk);")
        # a bias gradient that sums the right operand of a weight gradient's product comes out of
        # that product (summed while its blocks are in cache) instead of another pass over all T*B rows
        folded: dict[int, int] = {}  # mm boundary -> the vec whose gradient it sums
        for v, key in self.vec_alias.items():
            for bi, b in enumerate(p.boundaries):
                if b.kind == "mm" and bi not in folded and (
                        key == ("dbout", bi) or (key == ("dxp",) and self.dxp_alias == bi)):
                    folded[bi] = v
                    L.append(f"  at::Tensor dsum{v} = at::zeros({{WO{bi}}}, opts);")
                    break
        for m in range(len(p.mats)):
            terms = [bi for bi, b in enumerate(p.boundaries) if b.kind == "mm" and b.mat == m]
            fill = "zeros" if not terms else "empty"
            L.append(f"  at::Tensor dmat{m} = at::{fill}(mats[{m}].sizes(), opts);")
            for n, bi in enumerate(terms):
                bsum = f"dsum{folded[bi]}.data_ptr<T>()" if bi in folded else "nullptr"
                L.append(f"  matmul_tn<T>(bin{bi}_p, dbout{bi}_p, dmat{m}.data_ptr<T>(), T_ * B, "
                         f"WI{bi}, WO{bi}, {'true' if n else 'false'}, {bsum});")
        sums = set(folded.values())
        L.append("  std::vector<at::Tensor> res{dxp};")
        for k in range(len(p.states)):
            L.append(f"  res.push_back(dstate{k});")
        for v in range(len(p.vecs)):
            key = self.vec_alias.get(v)
            if v in sums:
                L.append(f"  res.push_back(dsum{v});")
            elif key is None:
                L.append(f"  res.push_back(dvec{v}.sum(0));")
            elif key == ("dxp",):
                L.append("  res.push_back(dxp.view({T_ * B, W_xp}).sum(0));")
            else:
                L.append(f"  res.push_back(dbout{key[1]}.view({{T_ * B, WO{key[1]}}}).sum(0));")
        for m in range(len(p.mats)):
            L.append(f"  res.push_back(dmat{m});")
        L.append("  return res;")
        L.append("}")
        return "\n".join(L)


def program_source(prog: Program, tag: str) -> str:
    """Kernels and drivers (templates ``fwd_<tag>_impl<T>`` / ``bwd_<tag>_impl<T>``)."""
    return _Gen(prog, tag).source()


def entry_points(tag: str) -> tuple[str, str]:
    """The dtype-dispatching functions and their schema lines for ``tag``."""
    fn = f"""
std::vector<at::Tensor> fwd_{tag}(const at::Tensor& xp, at::TensorList state0,
    at::TensorList vecs, at::TensorList mats, at::TensorList packed, const at::Tensor& drop,
    at::TensorList zone, at::IntArrayRef zmode, const at::Tensor& valid, at::IntArrayRef units,
    bool save) {{
  FlushSubnormals flush;
  if (xp.scalar_type() == at::kDouble)
    return fwd_{tag}_impl<double>(xp, state0, vecs, mats, packed, drop, zone, zmode, valid, units,
                                  save);
  TORCH_CHECK(xp.scalar_type() == at::kFloat, "gyre fused: float32 or float64 only");
  return fwd_{tag}_impl<float>(xp, state0, vecs, mats, packed, drop, zone, zmode, valid, units,
                               save);
}}
std::vector<at::Tensor> bwd_{tag}(at::TensorList gseq, const at::Tensor& xp,
    at::TensorList state0, at::TensorList seq, at::TensorList vecs, at::TensorList mats,
    at::TensorList packed, const at::Tensor& drop, at::TensorList zone, at::IntArrayRef zmode,
    const at::Tensor& valid, at::TensorList saved, at::IntArrayRef units) {{
  FlushSubnormals flush;
  if (xp.scalar_type() == at::kDouble)
    return bwd_{tag}_impl<double>(gseq, xp, state0, seq, vecs, mats, packed, drop, zone, zmode,
                                  valid, saved, units);
  return bwd_{tag}_impl<float>(gseq, xp, state0, seq, vecs, mats, packed, drop, zone, zmode,
                               valid, saved, units);
}}
"""
    defs = (f'  m.def("fwd_{tag}(Tensor xp, Tensor[] state0, Tensor[] vecs, Tensor[] mats, '
            f'Tensor[] packed, Tensor drop, Tensor[] zone, int[] zmode, Tensor valid, '
            f'int[] units, bool save) -> Tensor[]", &fwd_{tag});\n'
            f'  m.def("bwd_{tag}(Tensor[] gseq, Tensor xp, Tensor[] state0, Tensor[] seq, '
            f'Tensor[] vecs, Tensor[] mats, Tensor[] packed, Tensor drop, Tensor[] zone, '
            f'int[] zmode, Tensor valid, Tensor[] saved, int[] units) -> Tensor[]", &bwd_{tag});')
    return fn, defs


#: The runtime and entry points the generated code includes (``-I`` this folder); their
#: contents are part of a module's hash (:func:`runtime_text`), so editing one rebuilds.
CSRC = Path(__file__).resolve().parent / "csrc"
RUNTIME_FILES = ("runtime.h", "products.h", "stream_entry.h")


def runtime_text() -> str:
    """The contents of every runtime file, in a fixed order."""
    parts = []
    for name in RUNTIME_FILES:
        with open(CSRC / name, encoding="utf-8") as f:
            parts.append(f"// {name}\n" + f.read())
    return "\n".join(parts)


def stream_source(namespace: str, tags: list[str]) -> str:
    """The Python streaming entry of a module holding the programs ``tags``
    (``csrc/stream_entry.h`` with this module's step table and name)."""
    decls = "".join(
        f'__attribute__((visibility("hidden"))) void step_{t}(bool, const gyre_stream::Layer&, '
        "int64_t, const void*, void* const*, void* const*, gyre_stream::Work&);\n" for t in tags)
    entries = " ".join(f'{{"{t}", &step_{t}}},' for t in tags)
    return (decls + f"#define GYRE_STEPS {entries}\n"
            f'#define GYRE_MODULE_NAME "{namespace}"\n'
            f"#define GYRE_PYINIT PyInit_{namespace}\n"
            '#include "stream_entry.h"')


def module_source(namespace: str, programs: dict[str, str], part: int = 0,
                  parts: int = 1) -> str:
    """A translation unit holding every ``parts``-th of the programs ``{tag: source}`` (from
    ``part``), registered as ``torch.ops.<namespace>.fwd_<tag>`` / ``bwd_<tag>``; the first also
    registers the products over all rows (``csrc/products.h``) and holds the module's streaming
    entry (``PyInit_<namespace>``, ``csrc/stream_entry.h``). It includes the runtime from
    :data:`CSRC`, which the build puts on the include path."""
    out = ['#include "runtime.h"']
    defs = []
    for tag, src in sorted(programs.items())[part::parts]:
        fn, d = entry_points(tag)
        out += [src, fn]
        defs.append(d)
    if part == 0:
        out.append('#include "products.h"')
        defs.append("  def_products(m);")
    macro = "TORCH_LIBRARY" if part == 0 else "TORCH_LIBRARY_FRAGMENT"
    out.append(f"{macro}({namespace}, m) {{\n" + "\n".join(defs) + "\n}")
    if part == 0:
        out.append(stream_source(namespace, sorted(programs)))
    return "\n".join(out)


__all__ = ["CSRC", "Atom", "module_source", "program_source", "runtime_text", "stream_source"]
