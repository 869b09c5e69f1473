"""Token embeddings and a language model's output layer that may share their weights."""

from __future__ import annotations

from torch import Tensor, nn

from .tokenizers import PAD


class TokenEmbedding(nn.Module):
    """``nn.Embedding`` with ``padding_idx=PAD`` (the pad row stays zero and gets no gradient)
    and optional dropout: ``forward(ids (B, T) int64) -> (B, T, dim)``."""

    def __init__(self, vocab_size: int, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        with __import__("torch").no_grad():
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
