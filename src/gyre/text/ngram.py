"""Count-based language models over token id sequences: add-one unigram and interpolated
Kneser-Ney n-grams (Chen & Goodman 1999, section 3.5, one discount per order
``D = n1 / (n1 + 2 n2)``, 0.5 for an order without singletons), the baselines a recurrent
language model must beat.

A sequence of ids is held as a ``str`` of ``chr(id)`` so that contexts are substrings and the
counts are plain dictionaries. The vocabulary is ``range(vocab_size)`` minus the ids that are
never predicted (``PAD``, ``BOS``, ``EOS``); every one of the rest gets a probability > 0, and
for every context they sum to 1.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from .tokenizers import BOS, EOS, PAD

_NEVER = (PAD, BOS, EOS)


def _as_str(ids: Sequence[int]) -> str:
    return "".join(map(chr, ids))


class Unigram:
    """Add-one unigram over ``vocab_size`` ids (``PAD``, ``BOS``, ``EOS`` excluded)."""

    def __init__(self, ids: Sequence[int], vocab_size: int) -> None:
        self.V = vocab_size - len(_NEVER)
        self.counts = collections.Counter(int(i) for i in ids)
        self.total = sum(self.counts.values())

    def prob(self, w: int) -> float:
        return 0.0 if w in _NEVER else (self.counts.get(w, 0) + 1) / (self.total + self.V)

    def nats(self, ids: Sequence[int]) -> float:
        """``-sum log p(w)`` over ``ids``."""
        return -sum(math.log(self.prob(int(w))) for w in ids)


class KneserNey:
    """Interpolated Kneser-Ney of ``order`` fitted on ``ids`` (preceded by ``order - 1``
    ``BOS``): the highest order from counts, lower orders from continuation counts, the
    unigram level interpolated with the uniform distribution over the vocabulary."""

    def __init__(self, ids: Sequence[int], vocab_size: int, order: int = 5) -> None:
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order: got {order!r}, expected an int >= 1")
        self.order, self.vocab_size = order, vocab_size
        self.V = vocab_size - len(_NEVER)
        s = chr(BOS) * (order - 1) + _as_str(ids)
        top = collections.Counter(s[i:i + order] for i in range(len(s) - order + 1))
        # counts[n]: raw counts at the top order, continuation counts N1+(. g) below it
        counts: dict[int, dict[str, int]] = {order: top}
        for n in range(order - 1, 0, -1):
            cont = collections.Counter()
            for g in counts[n + 1]:
                cont[g[1:]] += 1
            counts[n] = cont
        self.counts = counts
        self.ctx_total: dict[int, dict[str, int]] = {}
        self.ctx_types: dict[int, dict[str, int]] = {}
        self.discount: dict[int, float] = {}
        for n, c in counts.items():
            tot, typ = collections.Counter(), collections.Counter()
            n1 = n2 = 0
            for g, k in c.items():
                tot[g[:-1]] += k
                typ[g[:-1]] += 1
                n1 += k == 1
                n2 += k == 2
            self.ctx_total[n], self.ctx_types[n] = tot, typ
            # no singletons would give D = 0 and leave unseen tokens at probability 0
            self.discount[n] = n1 / (n1 + 2 * n2) if n1 else 0.5

    def prob(self, w: int, context: Sequence[int] | str) -> float:
        """``p(w | context)`` (the last ``order - 1`` ids of ``context`` are used; a short
        context is padded with ``BOS``)."""
        if w in _NEVER:
            return 0.0
        ctx = context if isinstance(context, str) else _as_str(context)
        ctx = (chr(BOS) * (self.order - 1) + ctx)[len(ctx):] if self.order > 1 else ""
        return self._p(chr(w), ctx)

    def _p(self, w: str, ctx: str) -> float:
        p = 1.0 / self.V
        for n in range(1, self.order + 1):  # lowest order first, each interpolating the last
            h = ctx[len(ctx) - (n - 1):] if n > 1 else ""
            total = self.ctx_total[n].get(h, 0)
            if total == 0:
                continue  # unseen context: this order falls back entirely to the lower one
            D = self.discount[n]
            c = self.counts[n].get(h + w, 0)
            p = max(c - D, 0.0) / total + D * self.ctx_types[n][h] / total * p
        return p

    def nats(self, ids: Sequence[int]) -> float:
        """``-sum log p(w_t | w_<t)`` over ``ids``, the first predicted after ``BOS``."""
        s = chr(BOS) * (self.order - 1) + _as_str(ids)
        k = self.order - 1
        return -sum(math.log(self._p(s[t], s[t - k:t])) for t in range(k, len(s)))


__all__ = ["Unigram", "KneserNey"]
