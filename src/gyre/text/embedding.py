"""Token embeddings and a language model's output layer that may share their weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .tokenizers import PAD


class TokenEmbedding(nn.Module):
    """``nn.Embedding`` with ``padding_idx=PAD`` (the pad row stays zero and gets no gradient)
    and optional dropout: ``forward(ids (B, T) int64) -> (B, T, dim)``."""

    def __init__(self, vocab_size: int, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD].zero_()
        self.drop = nn.Dropout(dropout)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.drop(self.embedding(ids))


class TiedOutput(nn.Module):
    """Logits over the vocabulary from features ``(..., features)``: a projection to the
    embedding width when the two differ, then a linear layer whose weight is the embedding
    matrix when ``tie`` (Press & Wolf 2017, Inan et al. 2017) or its own otherwise."""

    def __init__(self, features: int, embedding: TokenEmbedding, tie: bool = True) -> None:
        super().__init__()
        vocab, dim = embedding.weight.shape
        self.tied = bool(tie)
        self.proj = nn.Linear(features, dim) if tie and features != dim else nn.Identity()
        self.out = nn.Linear(dim if tie else features, vocab)
        if tie:
            self.out.weight = embedding.weight

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.proj(h))


#: the n-gram hash: ``h = (h * _HASH + id) mod _MOD`` over a k-gram's ids, ``_MOD`` the prime
#: 2**31 - 1 and ``_HASH`` a prime above any vocabulary gyre fits (products stay inside int64)
_HASH, _MOD = 1_000_003, 2 ** 31 - 1


class NgramBag(nn.Module):
    """A linear model of a text's token n-grams (the bag of n-grams of fastText, Joulin et al.
    2017; the "wide" part of Wide & Deep, Cheng et al. 2016): every unigram has its own row,
    every n-gram of 2..``order`` tokens is hashed into one of ``buckets`` rows, and the output
    is the sum of the rows of the text's n-grams over the square root of their number (the
    L2 norm of a binary bag, as TF-IDF + logistic regression normalises a text).

    ``forward(ids (B, T) int64, lengths (B,) | None) -> (B, n_out)``. Only positions before a
    text's length count (without ``lengths``: every non-``PAD`` id), so the padding values are
    inert. The rows start at zero: an untrained bag adds nothing."""

    def __init__(self, vocab_size: int, n_out: int, buckets: int = 2 ** 18, order: int = 2) -> None:
        super().__init__()
        for name, v, low in (("vocab_size", vocab_size, 1), ("n_out", n_out, 1),
                             ("buckets", buckets, 1), ("order", order, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: got {v!r}, expected an int >= {low}")
        if buckets >= _MOD:
            raise ValueError(f"buckets: got {buckets}, expected fewer than 2**31 - 1")
        self.vocab_size, self.buckets, self.order = vocab_size, buckets, order
        self.weight = nn.Parameter(torch.zeros(vocab_size + (buckets if order > 1 else 0), n_out))

    def forward(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        if lengths is None:
            n = (ids != PAD).sum(1)
        else:
            n = torch.as_tensor(lengths, device=ids.device).to(torch.int64)
        inside = pos[None, :] < n[:, None]
        ids = ids.masked_fill(~inside, PAD)  # any value past a length (even out of range) is inert
        rows, masks = [ids], [inside]
        h = ids
        for k in range(2, self.order + 1):
            if T < k:
                break
            # the hash of the k-gram that starts at each position
            h = torch.remainder(h[:, :-1] * _HASH + ids[:, k - 1:], _MOD)
            rows.append(self.vocab_size + torch.remainder(h, self.buckets))
            masks.append(pos[None, :T - k + 1] + (k - 1) < n[:, None])
        idx = torch.cat(rows, 1)
        w = torch.cat(masks, 1).to(self.weight.dtype)
        w = w / w.sum(1, keepdim=True).clamp(min=1.0).sqrt()
        return (self.weight[idx] * w[..., None]).sum(1)
