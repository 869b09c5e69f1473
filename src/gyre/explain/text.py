"""Explaining text models per token: attributions over the embedded tokens.

A text model starts from token ids, which have no gradient and no "half-removed" value. Its
explanation therefore runs from the embedding layer's output on: :func:`through_embedding`
calls the model with that layer's output replaced (a forward hook, so no model needs a second
forward of its own), the inputs are the embedded tokens ``(B, T, E)``, the baseline is the zero
vector (the padding token's embedding, so "removing" a token is replacing it by padding), and a
token's attribution is the sum over its ``E`` dimensions (:class:`gyre.explain.Inputs` with
``tokens``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def through_embedding(model: nn.Module, embedding: nn.Module):
    """``forward(e (B, T, E), lengths) -> model(ids, lengths=lengths)[0]`` with ``embedding``'s
    output replaced by ``e`` (the ids passed are padding: only their shape is read)."""

    def forward(e: Tensor, lengths: Tensor | None):
        handle = embedding.register_forward_hook(lambda mod, args, out: e)
        try:
            ids = torch.zeros(e.shape[:2], dtype=torch.int64, device=e.device)
            return model(ids, lengths=lengths)[0]
        finally:
            handle.remove()

    return forward


def classifier_inputs(model: nn.Module, ids: list[list[int]], tokens: list[list[str]], title: str,
                      *, embedding: nn.Module | None = None, labels: Tensor | None = None,
                      meta: dict | None = None):
    """:class:`gyre.explain.Inputs` of a text classifier ``model(ids, lengths=) -> (logits,
    state)`` (one logit for two classes, else one per class) on the token ids ``ids`` (with
    their strings ``tokens``): the predicted class's log-odds, explained per token through
    ``embedding`` (default ``model.embedding``)."""
    from ..text import pad_batch
    from . import Inputs
    embedding = model.embedding if embedding is None else embedding
    x_ids, lengths = pad_batch(ids)
    model.eval()
    logits = through_embedding(model, embedding)

    def forward(e, lengths):
        z = logits(e, lengths)
        # two classes: one logit z, the log-odds of class 1; class 0's are -z
        return torch.stack([-z, z], -1) if z.dim() == 1 else z

    def predict(e, lengths):
        with torch.no_grad():
            return forward(e, lengths).argmax(-1)

    with torch.no_grad():
        x = embedding(x_ids)
    return Inputs(model, forward, x, lengths, title, [f"embedding {k}" for k in range(x.shape[2])],
                  target=predict(x, lengths), labels=labels, predict=predict, tokens=tokens,
                  meta={"explained": "log-odds of the predicted class", **(meta or {})},
                  run=lambda: model(x_ids, lengths=lengths))


def sentiment_inputs(out_dir, data: str | None = None, samples: int = 8):
    """:func:`classifier_inputs` of a sentiment run: its first ``samples`` test texts (the
    run's data, or ``data``'s)."""
    import numpy as np

    from ..data import text as tdata
    from ..tasks import sentiment
    config, model, tok, extra = sentiment.load_run(out_dir)
    ds = tdata.load_sentiment(data or config.data, config.text_column, config.label_column,
                              config.test if data is None else "", config.seed)
    texts = ds.test_texts[:samples]
    ids = sentiment.encode(tok, texts, config.max_tokens, config.truncate, "data")
    classes = list(extra["classes"])
    labels = None
    if set(ds.classes) <= set(classes):
        remap = {c: i for i, c in enumerate(classes)}
        labels = torch.as_tensor(np.array([remap[ds.classes[i]] for i in ds.y_test[:samples]]))
    tokens = [[tok.decode([i]) for i in seq] for seq in ids]
    return classifier_inputs(model, ids, tokens, f"sentiment {ds.name}: {sentiment.describe(config)}",
                             labels=labels, meta={"data": ds.name, "classes": classes})


__all__ = ["classifier_inputs", "sentiment_inputs", "through_embedding"]
