"""Translation: a bidirectional recurrent encoder and a recurrent decoder with attention
(Bahdanau et al. 2015 additive, Luong et al. 2015 multiplicative, or none), trained with
teacher forcing, decoded greedily or by beam search with length normalisation, scored with
sacrebleu (BLEU, chrF) beside copying the source and a TF-IDF translation memory. With
``memory="nearest"`` the model reads that memory too (Bulte & Tezcan 2019's neural fuzzy repair):
each source is followed by ``EOS`` and the target of its nearest training source, which the
attention and the copy gate can read and copy from.

Follows the task contract in :mod:`gyre.tasks`. Data: :func:`gyre.data.text.load_pairs`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import text as gtext
from ..data import text as tdata
from ..nn import Recurrent
from ..train import CHECKPOINT, Trainer, load_checkpoint, seed_everything
from . import base

TASK = "translate"
#: fields a resumed run may change beyond :data:`gyre.tasks.base.RESUMABLE` (read after training)
RESUMABLE = ("beam", "length_penalty", "memory_copy")
ATTENTION = ("bahdanau", "luong", "none")
MEMORY = ("nearest", "none")
#: the ``memory_copy`` thresholds ``memory_copy=0`` chooses from on validation (cosine of the
#: nearest training source; 2.0: never copy)
MEMORY_COPY_TAUS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1 - 1e-9, 2.0)
#: the run file that holds the threshold ``memory_copy=0`` chose
MEMORY_COPY_FILE = "memory_copy.json"


@dataclass
class Config(base.TaskConfig):
    """Translation run. Beyond :class:`gyre.tasks.base.TaskConfig` (``bidirectional`` is the
    encoder's; the decoder is one unidirectional layer of the same cell):

    Attributes:
        attention: ``bahdanau`` (additive, from the previous decoder state, the context fed
            to the decoder), ``luong`` (general multiplicative, from the current state, with
            input feeding) or ``none`` (the encoder's final state only).
        tokenizer, vocab_size: the tokeniser, fitted on the training pairs only.
        shared_vocab: one tokeniser and embedding for both languages (fitted on sources and
            targets together); off: one per language.
        copy: a pointer-generator output that can copy source tokens (needs attention and
            ``shared_vocab``; ``--no-copy`` for the plain softmax).
        embed: embedding width.
        beam: the beam width of the reported test score (1 is greedy decoding).
        length_penalty: alpha in the ranking of beam hypotheses by log-probability / length**alpha.
        max_tokens: the longest source the model takes (a longer one is an error).
        bucket: batches of pairs of similar length (:func:`bucket_order`), which cuts the
            padding the encoder and the decoder loop run over.
        memory: ``nearest``: the encoder reads each source followed by ``EOS`` and the target
            of its nearest training source (:class:`TranslationMemory`; a training pair never
            retrieves itself), at most ``max_tokens`` tokens of it; the training pairs are saved
            in the run, so ``gyre translate`` retrieves from them. Needs ``shared_vocab``.
            The default, chosen on validation (RESULTS.md). ``none``: the source alone.
        memory_copy: a text whose nearest training source has a TF-IDF cosine of at least
            this with it is translated by that source's target as it stands, without the
            network (a fuzzy-match threshold, as in a translation-memory workflow); above 1
            it never applies. 0: chosen after training on the validation pairs
            (:func:`choose_memory_copy`, from :data:`MEMORY_COPY_TAUS`, saved in the run). A
            threshold in (0, 1] needs ``memory="nearest"``; with ``memory="none"`` 0 means never.
            0 is the default (RESULTS.md: the chosen threshold puts greedy and beam 5 above both
            baselines on 3 seeds); ``--memory-copy 2`` is the network alone.
    """

    data: str = "gettext_fr"
    attention: str = "bahdanau"
    tokenizer: str = "sentencepiece"
    vocab_size: int = 1000
    embed: int = 128
    cell: str = "gru"
    hidden: int = 128
    bidirectional: bool = True
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    scheduler: str = "onecycle"
    val_fraction: float = 0.0
    dropout: float = 0.1
    beam: int = 5
    length_penalty: float = 1.0
    max_tokens: int = 200
    shared_vocab: bool = True
    copy: bool = True
    bucket: bool = True
    memory: str = "nearest"
    memory_copy: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention not in ATTENTION:
            raise ValueError(f"attention: got {self.attention!r}, expected one of "
                             f"{', '.join(ATTENTION)}")
        if self.tokenizer not in gtext.TOKENIZERS:
            raise ValueError(f"tokenizer: got {self.tokenizer!r}, expected one of "
                             f"{', '.join(gtext.TOKENIZERS)}")
        for name, low in (("vocab_size", 16), ("embed", 1), ("beam", 1), ("max_tokens", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= {low}")
        if self.copy and (self.attention == "none" or not self.shared_vocab):
            raise ValueError(f"copy: copying source tokens needs attention and shared_vocab; got "
                             f"attention={self.attention!r}, shared_vocab={self.shared_vocab} "
                             "(set copy=False, --no-copy, for a plain softmax output)")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty: got {self.length_penalty}, expected >= 0")
        if self.memory not in MEMORY:
            raise ValueError(f"memory: got {self.memory!r}, expected one of {', '.join(MEMORY)}")
        if self.memory != "none" and not self.shared_vocab:
            raise ValueError("memory: reading the retrieved target beside the source needs "
                             f"shared_vocab; got memory={self.memory!r}, shared_vocab=False "
                             "(set memory='none', --memory none)")
        if not self.memory_copy >= 0:
            raise ValueError(f"memory_copy: got {self.memory_copy}, expected a cosine "
                             "threshold > 0 (above 1: never), or 0 (chosen on validation)")
        if 0 < self.memory_copy <= 1 and self.memory == "none":
            raise ValueError(f"memory_copy: got {self.memory_copy} with memory='none'; copying "
                             "the retrieved target needs memory='nearest' (or memory_copy > 1)")


class Seq2Seq(nn.Module):
    """Encoder ``Recurrent`` (``bidirectional``, ``layers``) over the source; its final states
    through ``tanh(Linear)`` start a one-layer decoder of the same cell.

    Decoder step ``t`` (``s`` the decoder output, ``h_j`` encoder outputs, ``e`` the input
    token's embedding):

    * bahdanau: ``a = softmax_j v^T tanh(W s_{t-1} + U h_j)``, ``c = sum_j a_j h_j``,
      ``s_t = cell([e; c], state)``, features ``f = [s_t; c; e]``;
    * luong: ``s_t = cell([e; h~_{t-1}], state)``, ``a = softmax_j s_t^T W_a h_j``,
      ``h~_t = tanh(W_c [c; s_t])``, features ``f = [h~_t; e]``;
    * none: ``s_t = cell(e, state)``, features ``f = [s_t; e]``.

    Every variant scores the vocabulary through the target embedding (Press & Wolf 2017):
    ``logits = E tanh(W_f f) + b``. ``shared`` (one vocabulary for both languages): the source,
    decoder input and output share that one embedding. ``copy`` (with attention and ``shared``;
    See et al. 2017's pointer-generator): ``p(w) = g P_vocab(w) + (1 - g) sum_{j: x_j = w} a_j``
    with the gate ``g = sigmoid(w_g^T [f; c])``, so a token of the source (a file name, an
    option) can be copied however rare it is; the model then returns log-probabilities, which
    ``cross_entropy`` and ``argmax`` treat as logits.

    ``forward(x (B, 2, L), state=None, *, lengths) -> (logits (B, L, V), None)``: ``x[:, 0]``
    is the padded source (``lengths`` its lengths), ``x[:, 1]`` the decoder input (``BOS`` +
    target) for teacher forcing."""

    def __init__(self, src_vocab: int, tgt_vocab: int, cell: str = "gru", embed: int = 128,
                 hidden: int = 128, layers: int = 1, bidirectional: bool = True,
                 dropout: float = 0.0, attention: str = "bahdanau", shared: bool = False,
                 copy: bool = False) -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention: got {attention!r}, expected one of {', '.join(ATTENTION)}")
        if shared and src_vocab != tgt_vocab:
            raise ValueError(f"shared: one vocabulary needs src_vocab == tgt_vocab; got "
                             f"{src_vocab} and {tgt_vocab}")
        if copy and (attention == "none" or not shared):
            raise ValueError("copy: pointing at source tokens needs attention (bahdanau or luong) "
                             f"and one shared vocabulary; got attention={attention!r}, "
                             f"shared={shared}")
        self.attention, self.shared, self.copy = attention, bool(shared), bool(copy)
        self.tgt_embed = gtext.TokenEmbedding(tgt_vocab, embed, dropout)
        self.src_embed = self.tgt_embed if shared else \
            gtext.TokenEmbedding(src_vocab, embed, dropout)
        self.encoder = Recurrent(cell, embed, hidden, layers, batch_first=True,
                                 dropout=dropout if layers > 1 else 0.0,
                                 bidirectional=bidirectional)
        self.dirs = 2 if bidirectional else 1
        H = self.encoder.output_size
        M = self.dirs * H  # encoder output width
        sizes = self.encoder.state_sizes
        self.bridge = nn.ModuleList(nn.Linear(self.dirs * s, s) for s in sizes)
        feed = {"bahdanau": M, "luong": H, "none": 0}[attention]
        self.decoder = Recurrent(cell, embed + feed, hidden, 1, batch_first=True)
        self.drop = nn.Dropout(dropout)
        if attention == "bahdanau":
            self.W = nn.Linear(H, H, bias=False)
            self.U = nn.Linear(M, H)
            self.v = nn.Linear(H, 1, bias=False)
        elif attention == "luong":
            self.Wa = nn.Linear(M, H, bias=False)
            self.Wc = nn.Linear(M + H, H)
        F = {"bahdanau": H + M, "luong": H, "none": H}[attention] + embed
        self.pre = nn.Linear(F, embed)
        self.out = nn.Linear(embed, tgt_vocab)
        self.out.weight = self.tgt_embed.weight
        if copy:
            self.gate = nn.Linear(F + M, 1)

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, src: Tensor, lengths: Tensor | None):
        """``src (B, S)`` -> memory ``(enc (B, S, M), keys, mask (B, S), src)`` and the
        decoder's initial ``(state, feed)``."""
        enc, h_n = self.encoder(self.src_embed(src), lengths=lengths)
        parts = (h_n,) if isinstance(h_n, Tensor) else tuple(h_n)
        init = []
        for lin, p in zip(self.bridge, parts, strict=True):
            last = torch.cat([p[-self.dirs + d] for d in range(self.dirs)], -1)  # last layer
            init.append(torch.tanh(lin(last)).unsqueeze(0))
        state = init[0] if len(init) == 1 else tuple(init)
        B, S = src.shape
        mask = torch.arange(S)[None, :] < (lengths if lengths is not None
                                          else torch.full((B,), S))[:, None]
        mask = mask.to(src.device)
        keys = self.U(enc) if self.attention == "bahdanau" else \
            self.Wa(enc) if self.attention == "luong" else None
        feed = enc.new_zeros(B, self.decoder.hidden_size) if self.attention == "luong" else None
        return (enc, keys, mask, src), state, feed

    @staticmethod
    def _top(state) -> Tensor:
        return (state if isinstance(state, Tensor) else state[0])[-1]  # (B, H)

    def _features(self, ids: Tensor, state, feed, memory):
        """One decoder step up to the output layer: ``(features, ctx, state, feed, attn)``."""
        enc, keys, mask, _ = memory
        e = self.tgt_embed(ids)
        attn = ctx = None
        if self.attention == "bahdanau":
            score = self.v(torch.tanh(self.W(self._top(state))[:, None] + keys)).squeeze(-1)
            attn = torch.softmax(score.masked_fill(~mask, -math.inf), -1)
            ctx = torch.bmm(attn[:, None], enc)[:, 0]
            y, state = self.decoder.step(torch.cat([e, ctx], -1), state)
            feats = torch.cat([y, ctx, e], -1)
        elif self.attention == "luong":
            y, state = self.decoder.step(torch.cat([e, feed], -1), state)
            score = torch.bmm(keys, y[:, :, None]).squeeze(-1)
            attn = torch.softmax(score.masked_fill(~mask, -math.inf), -1)
            ctx = torch.bmm(attn[:, None], enc)[:, 0]
            feed = torch.tanh(self.Wc(torch.cat([ctx, y], -1)))
            feats = torch.cat([feed, e], -1)
        else:
            y, state = self.decoder.step(e, state)
            feats = torch.cat([y, e], -1)
        return feats, ctx, state, feed, attn

    def _scores(self, feats: Tensor, ctx: Tensor | None, attn: Tensor | None,
                src: Tensor) -> Tensor:
        """Logits (or, with ``copy``, log-probabilities) from features ``(..., F)``; with
        ``copy``, ``ctx (..., M)``, ``attn (..., S)`` and the source ids ``src (B, S)``."""
        logits = self.out(self.drop(torch.tanh(self.pre(feats))))
        if not self.copy:
            return logits
        g = torch.sigmoid(self.gate(torch.cat([feats, ctx], -1)))
        p = g * torch.softmax(logits.float(), -1)
        index = src.reshape(src.shape[0], *([1] * (attn.dim() - 2)), src.shape[1]).expand_as(attn)
        p = p.scatter_add(-1, index, (1 - g) * attn.float())
        return torch.log(p.clamp_min(1e-12))

    def decode_step(self, ids: Tensor, state, feed, memory):
        """One decoder step for ``ids (B,)``: ``(logits (B, V), state, feed, attn (B, S) or
        None)``. ``memory`` rows may be repeated (beam search) as long as they match ``ids``."""
        feats, ctx, state, feed, attn = self._features(ids, state, feed, memory)
        return self._scores(feats, ctx, attn, memory[3]), state, feed, attn

    def forward(self, x: Tensor, state=None, *, lengths: Tensor | None = None):
        src, dec_in = x[:, 0], x[:, 1]
        memory, state, feed = self.encode(src, lengths)
        steps = int((dec_in != gtext.PAD).sum(1).max())
        ctx = attn = None
        if self.attention == "none":  # nothing feeds back: the decoder runs as one sequence
            e = self.tgt_embed(dec_in[:, :steps])
            y, _ = self.decoder(e, state)
            feats = torch.cat([y, e], -1)
        else:
            outs = [self._features(dec_in[:, 0], state, feed, memory)]
            for t in range(1, steps):
                _, _, state, feed, _ = outs[-1]
                outs.append(self._features(dec_in[:, t], state, feed, memory))
            feats = torch.stack([o[0] for o in outs], 1)
            ctx = torch.stack([o[1] for o in outs], 1)
            attn = torch.stack([o[4] for o in outs], 1)
        logits = self._scores(feats, ctx, attn, src)  # one product over every step
        pad = x.shape[2] - steps
        if pad:  # positions past every target: PAD targets, ignored by the loss
            logits = torch.cat([logits, logits.new_zeros(x.shape[0], pad, logits.shape[-1])], 1)
        return logits, None


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                       ignore_index=gtext.PAD)


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, src: list[list[int]], tgt: list[list[int]]) -> None:
        self.src, self.tgt = src, tgt

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i):
        return self.src[i], self.tgt[i]


def collate(items) -> dict[str, Tensor]:
    """``x (B, 2, L)``: source and ``BOS`` + target; ``y (B, L)``: target + ``EOS``."""
    src, tgt = zip(*items, strict=True)
    L = max(max(map(len, src)), max(map(len, tgt)) + 1)
    s, lengths = gtext.pad_batch(src, max_len=L)
    s = nn.functional.pad(s, (0, L - s.shape[1]))
    dec, _ = gtext.pad_batch([[gtext.BOS] + list(t) for t in tgt])
    y, _ = gtext.pad_batch([list(t) + [gtext.EOS] for t in tgt])
    dec = nn.functional.pad(dec, (0, L - dec.shape[1]))
    y = nn.functional.pad(y, (0, L - y.shape[1]))
    return {"x": torch.stack([s, dec], 1), "lengths": lengths, "y": y}


def bucket_order(perm: Tensor, lengths: Tensor, batch_size: int, generator: torch.Generator,
                 pool: int = 50) -> Tensor:
    """``perm`` regrouped so that each batch holds pairs of similar length (less padding, and
    the decoder loop runs only as long as the batch's longest target): every ``pool`` batches
    of the shuffled order are sorted by length and cut into batches, and the full batches are
    shuffled; the one short batch, if any, stays last (batch ``b`` is ``[b * batch_size,
    (b + 1) * batch_size)`` of the order)."""
    chunks = []
    for c in perm.split(batch_size * pool):
        chunks.append(c[torch.sort(lengths[c], stable=True).indices])
    order = torch.cat(chunks)
    full = len(order) // batch_size
    blocks = order[:full * batch_size].view(full, batch_size)
    blocks = blocks[torch.randperm(full, generator=generator)]
    return torch.cat([blocks.reshape(-1), order[full * batch_size:]])


class PairTrainer(Trainer):
    """The Trainer, scoring validation batch by batch (targets differ in length per batch):
    ``loss`` is the mean cross-entropy per target token, teacher-forced. With ``lengths`` (one
    per training pair) each epoch's batches are bucketed by length (:func:`bucket_order`)."""

    def __init__(self, *args, lengths: Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lengths = lengths

    def _epoch_order(self, n: int) -> Tensor:
        perm = super()._epoch_order(n)
        if self.lengths is None or not self.config.shuffle:
            return perm
        return bucket_order(perm, self.lengths, self.config.batch_size, self._loader_gen)

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        self.model.eval()
        total, n = 0.0, 0
        bs = self.config.eval_batch_size or self.config.batch_size
        for s in range(0, len(data), bs):
            batch = self.collate([data[i] for i in range(s, min(s + bs, len(data)))])
            logits, _ = self.model(batch["x"].to(self.device), lengths=batch["lengths"])
            y = batch["y"].to(self.device)
            total += float(nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                ignore_index=gtext.PAD, reduction="sum"))
            n += int((y != gtext.PAD).sum())
        return {"loss": total / max(n, 1)}


# -- decoding ---------------------------------------------------------------------------------------
def _max_len(n_src: int) -> int:
    return 2 * n_src + 10


@torch.no_grad()
def greedy(model: Seq2Seq, src: list[int], max_len: int = 0) -> tuple[list[int], list[Tensor]]:
    """Greedy decoding of one source: ``(target ids without EOS, attention per step)``."""
    model.eval()
    x = torch.tensor([src])
    memory, state, feed = model.encode(x, torch.tensor([len(src)]))
    ids, attns, w = [], [], gtext.BOS
    for _ in range(max_len or _max_len(len(src))):
        logits, state, feed, attn = model.decode_step(torch.tensor([w]), state, feed, memory)
        w = int(logits[0].argmax())
        if attn is not None:
            attns.append(attn[0])
        if w == gtext.EOS:
            break
        ids.append(w)
    return ids, attns


def _select(state, idx: Tensor):
    return state[:, idx] if isinstance(state, Tensor) else tuple(s[:, idx] for s in state)


@torch.no_grad()
def beam_search(model: Seq2Seq, src: list[int], beam: int = 5, length_penalty: float = 1.0,
                max_len: int = 0) -> list[int]:
    """Beam search: ``beam`` hypotheses extended by their ``beam`` best tokens each step; one
    that emits ``EOS`` is finished; the search stops when ``beam`` are finished (or at
    ``max_len``) and returns the best by ``log p / length ** length_penalty`` (length with
    ``EOS``). ``beam=1`` is greedy decoding."""
    model.eval()
    x = torch.tensor([src])
    memory, state, feed = model.encode(x, torch.tensor([len(src)]))
    hyps: list[list[int]] = [[]]
    scores = torch.zeros(1)
    last = torch.tensor([gtext.BOS])
    finished: list[tuple[float, list[int]]] = []
    norm = lambda s, n: s / (n ** length_penalty)  # noqa: E731
    for _ in range(max_len or _max_len(len(src))):
        k = len(hyps)
        mem = tuple(m.expand(k, *m.shape[1:]) for m in memory)
        logits, state, feed, _ = model.decode_step(last, state, feed, mem)
        logp = torch.log_softmax(logits.float(), -1) + scores[:, None]  # (k, V)
        top = torch.topk(logp.reshape(-1), min(beam, logp.numel()))
        V = logp.shape[1]
        keep_rows, keep_ids, keep_scores, new_hyps = [], [], [], []
        for s, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, w = divmod(flat, V)
            if w == gtext.EOS:
                finished.append((norm(s, len(hyps[row]) + 1), hyps[row]))
            else:
                keep_rows.append(row)
                keep_ids.append(w)
                keep_scores.append(s)
                new_hyps.append(hyps[row] + [w])
        if len(finished) >= beam or not new_hyps:
            break
        idx = torch.tensor(keep_rows)
        state = _select(state, idx)
        feed = None if feed is None else feed[idx]
        hyps, scores, last = new_hyps, torch.tensor(keep_scores), torch.tensor(keep_ids)
    else:
        finished += [(norm(float(s), len(h)), h) for s, h in zip(scores, hyps, strict=True)]
    if not finished:
        finished = [(norm(float(s), len(h)), h) for s, h in zip(scores, hyps, strict=True)]
    return max(finished, key=lambda t: t[0])[1]


def translate_ids(model: Seq2Seq, src: list[int], beam: int, length_penalty: float = 1.0):
    return greedy(model, src)[0] if beam == 1 else beam_search(model, src, beam, length_penalty)


# -- scoring ----------------------------------------------------------------------------------------
def _sacrebleu():
    try:
        import sacrebleu
    except ModuleNotFoundError:
        raise ModuleNotFoundError("translate needs sacrebleu: pip install 'gyre[text]'") from None
    return sacrebleu


def score(hyps: list[str], refs: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """sacrebleu corpus BLEU and chrF on detokenised text, and their signatures."""
    sb = _sacrebleu()
    bleu, chrf = sb.metrics.BLEU(), sb.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return ({"bleu": float(b.score), "chrf": float(c.score)},
            {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())})


class TranslationMemory:
    """Training pairs indexed by their sources' TF-IDF vectors (word 1-2 grams, sublinear tf,
    fitted on those sources): :meth:`nearest` is the pair whose source has the highest cosine
    with a query (the first such pair on a tie, pair 0 when nothing is shared)."""

    def __init__(self, pairs) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        if not self.pairs:
            raise ValueError("pairs: got no pairs; a translation memory needs training pairs")
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        self.keys = self.vectorizer.fit_transform([a for a, _ in self.pairs]).T.tocsr()

    def nearest(self, sources: list[str], exclude_self: bool = False,
                chunk: int = 1024) -> list[int]:
        return self.lookup(sources, exclude_self, chunk)[0]

    def lookup(self, sources: list[str], exclude_self: bool = False,
               chunk: int = 1024) -> tuple[list[int], list[float]]:
        """The index of each source's nearest pair and its cosine. ``exclude_self``: ``sources`` are the
        memory's own, in order, and source ``i`` never retrieves pair ``i`` (what a training
        pair sees must be what an unseen sentence sees: another pair). Similarities are
        computed ``chunk`` queries at a time (a dense block of ``chunk x len(pairs)``)."""
        if exclude_self and len(sources) != len(self.pairs):
            raise ValueError(f"sources: exclude_self needs the memory's own {len(self.pairs)} "
                             f"sources; got {len(sources)}")
        Q = self.vectorizer.transform(sources)
        out: list[int] = []
        cos: list[float] = []
        for a in range(0, Q.shape[0], chunk):
            sim = (Q[a:a + chunk] @ self.keys).toarray()
            if exclude_self:
                rows = range(sim.shape[0])
                sim[rows, [a + r for r in rows]] = -1.0
            best = sim.argmax(1)
            out.extend(best.tolist())
            cos.extend(sim[range(sim.shape[0]), best].tolist())
        return out, cos

    def targets(self, sources: list[str], exclude_self: bool = False) -> list[str]:
        return [self.pairs[i][1] for i in self.nearest(sources, exclude_self)]


def translation_memory(train: list[tuple[str, str]], sources: list[str]) -> list[str]:
    """The training target whose source is nearest by TF-IDF (word 1-2 grams) cosine."""
    return TranslationMemory(train).targets(sources)


def encode_sources(tok: gtext.Tokenizer, texts: list[str], max_tokens: int, who: str):
    out = []
    for i, t in enumerate(texts):
        ids = tok.encode(t)
        if not ids:
            raise ValueError(f"{who}: text {i} is empty; expected a sentence")
        if len(ids) > max_tokens:
            raise ValueError(f"{who}: text {i} has {len(ids)} tokens, more than the model's "
                             f"max_tokens={max_tokens} ({t[:40]!r}...)")
        out.append(ids)
    return out


def model_inputs(config: Config, tok: gtext.Tokenizer, memory: TranslationMemory | None,
                 texts: list[str], who: str, exclude_self: bool = False) -> list[list[int]]:
    """What the encoder reads for each text: its ids (checked by :func:`encode_sources`), with
    ``memory="nearest"`` followed by ``EOS`` and at most ``max_tokens`` ids of the retrieved
    target (``exclude_self``: ``texts`` are the memory's own sources)."""
    ids = encode_sources(tok, texts, config.max_tokens, who)
    if config.memory == "none":
        return ids
    if memory is None:
        raise ValueError(f"memory: the run reads a translation memory (memory={config.memory!r}) "
                         "but none was given")
    found = memory.targets(texts, exclude_self)
    return [s + [gtext.EOS] + tok.encode(t)[:config.max_tokens] for s, t in zip(ids, found,
                                                                                 strict=True)]


def build_model(config: Config, src_vocab: int, tgt_vocab: int) -> Seq2Seq:
    return Seq2Seq(src_vocab, tgt_vocab, config.cell, config.embed, config.hidden,
                   config.layers, config.bidirectional, config.dropout, config.attention,
                   config.shared_vocab, config.copy)


def describe(config: Config) -> str:
    return (f"{config.tokenizer} {'bi' if config.bidirectional else ''}{config.cell} "
            f"{config.layers}x{config.hidden} encoder, {config.attention} attention, "
            f"{'' if config.memory == 'none' else config.memory + ' memory, '}beam {config.beam}")


def plot_attention(model: Seq2Seq, src_tok, tgt_tok, sources: list[list[int]], path) -> None:
    """Heatmaps of the greedy decoder's attention for a few sources (one panel each)."""
    plt = base.pyplot()
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 5), squeeze=False)
    for ax, src in zip(axes[0], sources, strict=True):
        ids, attns = greedy(model, src)
        if not attns:
            ax.set_axis_off()
            continue
        A = torch.stack(attns).numpy()
        ax.imshow(A, cmap="viridis", aspect="auto", vmin=0, vmax=1)
        ax.set_xticks(range(len(src)), [src_tok.id_to_piece(i) for i in src], rotation=90,
                      fontsize=7)
        ax.set_yticks(range(A.shape[0]), [tgt_tok.id_to_piece(i) for i in ids] + ["</s>"]
                      [:A.shape[0] - len(ids)], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _decode_all(model, src_tok, tgt_tok, memory, texts, config, beam, who="data",
                memory_copy=None):
    """Translations of ``texts``: the retrieved target where its source's cosine reaches
    ``memory_copy`` (default ``config.memory_copy``), the network's decoding elsewhere."""
    ids = model_inputs(config, src_tok, memory, texts, who)
    tau = config.memory_copy if memory_copy is None else memory_copy
    if memory is None or tau > 1:
        return [tgt_tok.decode(translate_ids(model, s, beam, config.length_penalty)) for s in ids]
    near, cos = memory.lookup(texts)
    return [memory.pairs[j][1] if c >= tau else
            tgt_tok.decode(translate_ids(model, s, beam, config.length_penalty))
            for s, j, c in zip(ids, near, cos, strict=True)]


def memory_copy_table(hyps: list[str], refs: list[str], memory: list[str], cos: list[float],
                      taus=MEMORY_COPY_TAUS) -> list[dict]:
    """For each threshold of ``taus``: the translations with ``memory`` (each text's retrieved
    target) in place of ``hyps`` where ``cos`` reaches it, scored against ``refs`` (``bleu``,
    ``chrf``), their ``margin`` over ``memory`` alone (the worse of the two differences) and
    ``n_copied``."""
    mem, _ = score(memory, refs)
    rows = []
    for t in taus:
        got, _ = score([m if c >= t else h for h, m, c in zip(hyps, memory, cos, strict=True)],
                       refs)
        rows.append({"tau": float(t), "n_copied": sum(c >= t for c in cos), **got,
                     "margin": min(got["bleu"] - mem["bleu"], got["chrf"] - mem["chrf"])})
    return rows


def choose_memory_copy(rows: list[dict]) -> float:
    """The threshold of :func:`memory_copy_table`'s rows furthest above the memory on the worse
    of BLEU and chrF (ties: the first, i.e. the lowest threshold)."""
    return max(rows, key=lambda r: r["margin"])["tau"]


def _choose_on_validation(model, src_tok, tgt_tok, memory, val, config) -> dict:
    """``memory_copy=0``: greedy translations of the validation pairs by the network alone,
    the retrieved target in their place at each threshold, the best by :func:`choose_memory_copy`."""
    if memory is None or not val:
        why = "memory='none'" if memory is None else "no validation pairs"
        return {"tau": 2.0, "why": f"{why}: never copies", "by_tau": []}
    srcs, refs = [s for s, _ in val], [t for _, t in val]
    hyps = _decode_all(model, src_tok, tgt_tok, memory, srcs, config, 1, memory_copy=2.0)
    near, cos = memory.lookup(srcs)
    rows = memory_copy_table(hyps, refs, [memory.pairs[j][1] for j in near], cos)
    return {"tau": choose_memory_copy(rows), "n_val": len(val), "by_tau": rows}


def train(config: Config, *, resume: bool = False) -> dict:
    if not isinstance(config, Config):
        raise TypeError(f"config: got {type(config).__name__}, expected gyre.tasks.translate.Config")
    data = tdata.load_pairs(config.data, config.seed)
    if resume:  # before anything is written: a refused resume leaves the run as it was
        base.check_resume(config, config.out, also=RESUMABLE)
    out = base.resolve_out(config, TASK)
    if resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(out)!r} to resume from")
    pairs = data.train  # the translation memory: the training pairs, saved with the run
    if resume:
        extra = load_checkpoint(out / CHECKPOINT)["extra"]
        src_tok = gtext.tokenizer_from_state(extra["src_tokenizer"])
        tgt_tok = gtext.tokenizer_from_state(extra["tgt_tokenizer"])
        pairs = extra.get("memory", pairs)
    else:
        if config.shared_vocab:
            src_tok = tgt_tok = gtext.fit_tokenizer(
                config.tokenizer, [s for s, _ in data.train] + [t for _, t in data.train],
                vocab_size=config.vocab_size)
        else:
            src_tok = gtext.fit_tokenizer(config.tokenizer, [s for s, _ in data.train],
                                          vocab_size=config.vocab_size)
            tgt_tok = gtext.fit_tokenizer(config.tokenizer, [t for _, t in data.train],
                                          vocab_size=config.vocab_size)
    if src_tok is tgt_tok:  # one shared vocabulary stays one object
        src_tok = tgt_tok = base.same_tokenizer(src_tok)
    else:
        src_tok, tgt_tok = base.same_tokenizer(src_tok), base.same_tokenizer(tgt_tok)
    tm = TranslationMemory(pairs)
    memory = tm if config.memory != "none" else None
    enc = lambda split, own: PairDataset(  # noqa: E731
        model_inputs(config, src_tok, memory, [s for s, _ in split], "data", exclude_self=own),
        [tgt_tok.encode(t) for _, t in split])
    train_ds, val_ds = enc(data.train, True), enc(data.val, False)
    seed_everything(config.seed)
    model = build_model(config, src_tok.vocab_size, tgt_tok.vocab_size)
    extra = {"src_tokenizer": src_tok.state(), "tgt_tokenizer": tgt_tok.state(),
             "src_vocab": src_tok.vocab_size, "tgt_vocab": tgt_tok.vocab_size}
    if memory is not None:
        extra["memory"] = [list(p) for p in memory.pairs]
    lengths = torch.tensor([max(len(a), len(b) + 1) for a, b in zip(train_ds.src, train_ds.tgt,
                                                                    strict=True)])
    trainer = PairTrainer(model, loss_fn, config.train_config(progress=config.progress),
                          collate=collate, out_dir=out, extra=extra,
                          callback=base.config_writer(config, out),
                          lengths=lengths if config.bucket else None)
    start = time.perf_counter()
    result = trainer.fit(train_ds, val_ds if len(val_ds) else None, resume=resume)
    seconds = time.perf_counter() - start
    early = base.early_exit(out, result)
    if early is not None:
        return early
    model.eval()
    chosen = None
    if config.memory_copy == 0:
        chosen = _choose_on_validation(model, src_tok, tgt_tok, memory, data.val, config)
        base.write_json(chosen, out / MEMORY_COPY_FILE)
    tau = config.memory_copy if chosen is None else chosen["tau"]
    sources, refs = [s for s, _ in data.test], [t for _, t in data.test]
    beams = sorted({1, config.beam})
    by_beam, signature, hyps = {}, {}, {}
    for k in beams:
        hyps[k] = _decode_all(model, src_tok, tgt_tok, memory, sources, config, k,
                              memory_copy=tau)
        by_beam[str(k)], signature = score(hyps[k], refs)
    with open(out / "translations.jsonl", "w", encoding="utf-8") as f:  # the test split's
        for i, (s, r) in enumerate(zip(sources, refs, strict=True)):
            f.write(json.dumps({"source": s, "reference": r,
                                **{f"beam{k}": hyps[k][i] for k in beams}},
                               ensure_ascii=False) + "\n")
    baselines = {"copy_source": score(sources, refs)[0],
                 "tfidf_memory": score(tm.targets(sources), refs)[0]}
    base.plot_history(result["history"], out / "loss.png", f"{describe(config)} on {data.name}")
    if config.attention != "none":
        plot_attention(model, src_tok, tgt_tok,
                       model_inputs(config, src_tok, memory, sources[:3], "data"),
                       out / "attention.png")
    metrics = {
        "task": TASK, "data": data.name, "out": str(out), "model": describe(config),
        "test": by_beam[str(config.beam)], "baselines": baselines, "by_beam": by_beam,
        "signature": signature, "memory_copy": _copy_summary(tau, memory, sources, chosen),
        "train": {"epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
                  "stopped_early": result["stopped_early"], "seconds": round(seconds, 2),
                  "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
                  "parameters": sum(p.numel() for p in model.parameters())},
    }
    base.write_json(metrics, out / "metrics.json")
    return metrics


def _copy_summary(tau: float, memory, sources: list[str], chosen: dict | None) -> dict:
    """``metrics.json``'s ``memory_copy``: the threshold the test split was decoded with, how
    many test sentences are the retrieved target, and the validation table that chose it."""
    n = 0 if memory is None or tau > 1 else sum(c >= tau for c in memory.lookup(sources)[1])
    out = {"tau": tau, "n_copied": n, "n_test": len(sources),
           "chosen_on": "validation" if chosen is not None else "config"}
    if chosen is not None:
        out["by_tau"] = chosen["by_tau"]
    return out


def load_run(out_dir):
    """``(config, model, source tokenizer, target tokenizer)``."""
    return _load(out_dir)[:4]


def _load(out_dir):
    """:func:`load_run` and the run's :class:`TranslationMemory` (None with ``memory="none"``)."""
    out = Path(out_dir)
    if not (out / "config.toml").is_file():
        raise FileNotFoundError(f"out_dir: {str(out)!r} has no config.toml; expected a directory "
                                "written by gyre train translate")
    config = base.load_config(Config, out / "config.toml")
    if "memory_copy" not in tomllib.loads((out / "config.toml").read_text()):
        # written before memory_copy existed: those runs never copied (0, today's default,
        # would look for a threshold they never chose)
        config = dataclasses.replace(config, memory_copy=2.0)
    ckpt = load_checkpoint(out / CHECKPOINT)
    extra = ckpt["extra"]
    model = build_model(config, extra["src_vocab"], extra["tgt_vocab"])
    best = ckpt["best"]["model"]
    use_best = best is not None and ckpt["config"].get("restore_best", True)
    model.load_state_dict(best if use_best else ckpt["model"])
    model.eval()
    memory = None
    if config.memory != "none":
        if "memory" not in extra:
            raise ValueError(f"out_dir: {str(out)!r} was trained with memory={config.memory!r} "
                             "but its checkpoint holds no translation memory")
        memory = TranslationMemory(extra["memory"])
    if config.memory_copy == 0:  # the threshold chosen on validation when training ended
        path = out / MEMORY_COPY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"out_dir: {str(out)!r} was trained with memory_copy=0 "
                                    f"(chosen on validation) but has no {MEMORY_COPY_FILE}: "
                                    "its training did not finish (gyre train translate "
                                    "--resume --out DIR completes it)")
        config = dataclasses.replace(config, memory_copy=float(
            json.loads(path.read_text())["tau"]))
    return (config, model, gtext.tokenizer_from_state(extra["src_tokenizer"]),
            gtext.tokenizer_from_state(extra["tgt_tokenizer"]), memory)


def translate(out_dir, texts: str | list[str], beam: int = 0) -> list[str]:
    """Translations of ``texts`` (beam ``beam``, 0 = the run's)."""
    config, model, src_tok, tgt_tok, memory = _load(out_dir)
    texts = [texts] if isinstance(texts, str) else list(texts)
    return _decode_all(model, src_tok, tgt_tok, memory, texts, config, beam or config.beam,
                       "texts")


def evaluate(out_dir, data: str | None = None) -> dict:
    config, model, src_tok, tgt_tok, memory = _load(out_dir)
    pairs = tdata.load_pairs(data or config.data, config.seed)
    test = pairs.test if data is None or data == config.data else \
        pairs.train + pairs.val + pairs.test
    hyps = _decode_all(model, src_tok, tgt_tok, memory, [s for s, _ in test], config,
                       config.beam)
    result, sig = score(hyps, [t for _, t in test])
    return {"test": result, "signature": sig, "data": data or config.data, "n_test": len(test)}


def predict(out_dir, data_path: str) -> list[dict]:
    """A translation per non-empty line of a text file (or per source of a TSV)."""
    text = tdata.read_text_file(data_path)
    sources = [ln.split("\t")[0] for ln in text.split("\n") if ln.strip()]
    return [{"index": i, "source": s, "translation": t}
            for i, (s, t) in enumerate(zip(sources, translate(out_dir, sources), strict=True))]


__all__ = [
    "Config", "TASK", "MEMORY_COPY_TAUS", "choose_memory_copy", "memory_copy_table", "Seq2Seq",
    "train", "evaluate", "predict", "translate", "load_run", "greedy", "beam_search", "score",
    "translation_memory", "TranslationMemory", "model_inputs"]
