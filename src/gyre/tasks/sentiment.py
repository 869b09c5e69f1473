"""Text classification (sentiment): token embeddings, a recurrent stack, a pooling head
(:mod:`gyre.nn.heads`, shared with classify) and a sigmoid output for two classes (binary
cross-entropy) or softmax for more, beside majority class and TF-IDF + logistic regression.

Follows the task contract in :mod:`gyre.tasks`. Data: :func:`gyre.data.text.load_sentiment`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import text as gtext
from ..data import text as tdata
from ..data.classification import validation_split
from ..nn import Recurrent
from ..nn.heads import SequencePool, head_parts
from ..train import CHECKPOINT, Trainer, load_checkpoint, seed_everything
from . import base
from .classify import Ensemble, set_forget_bias

TASK = "sentiment"


@dataclass
class Config(base.TaskConfig):
    """Sentiment / text classification run. Beyond :class:`gyre.tasks.base.TaskConfig`:

    Attributes:
        text_column, label_column: the CSV columns of a user file (fine_food has its own).
        test: a CSV test file; empty = the dataset's own test split, or for a CSV 20% of it,
            stratified, split off with ``seed``.
        tokenizer: how text becomes tokens, ``sentencepiece``, ``word`` or ``char``, fitted on
            the training split only.
        vocab_size: the most entries the tokenizer's vocabulary has (pieces or words).
        embed: embedding width.
        embed_dropout: dropout on the token embeddings during training.
        max_tokens: the model's limit on a text's length in tokens.
        truncate: keep the first ``max_tokens`` tokens of a longer text (default); off makes a
            longer text an error naming it.
        head, head_dropout, forget_bias: as classify.
        ensemble: train this many copies of the model side by side (each its own
            initialisation, the same batches; the best epoch is the ensemble's): the output is
            the mean of the members' logits for two classes, of their class probabilities
            (as log-probabilities) for more.
        pretrain_epochs: epochs of language-model pretraining of the embedding and the
            recurrent layer on the training split's texts before the classifier is trained
            (:func:`pretrain`, ULMFiT-style; an ensemble's members all start from it); 0 =
            from scratch.
        pretrain_lr: the peak rate of the pretraining's one-cycle schedule.
        pretrained_lr_scale: the classifier's rate for the pretrained embedding and recurrent
            layers, as a multiple of ``lr`` (ULMFiT's discriminative rates: the head, trained
            from scratch, gets ``lr``); 1 = one rate for all; ignored without pretraining.
        keep: the epoch whose weights the run keeps, the one of lowest validation ``loss`` or
            highest validation ``accuracy``.
        wide: the longest token n-gram of a linear bag-of-n-grams part whose logits are added to
            the recurrent model's (:class:`gyre.text.NgramBag`, trained with it; Wide & Deep);
            0 = none.
        wide_buckets: the hashed rows of that part's n-grams of two tokens or more.
        wide_dropout: the chance in training that a text's n-gram logits are left out, so
            that the recurrent part learns to predict without them.
        wide_lr_scale: that part's rate as a multiple of ``lr`` (a linear model over tens of
            thousands of sparse features needs larger steps than the recurrent layers).

    The defaults were chosen on the validation share of fine_food's training split (four
    recipes compared, RESULTS.md "Text"; the pretraining against none, a lower rate and a
    128-wide model, RESULTS.md "Text, fourth day"); the epoch with the lowest validation loss
    is kept.
    """

    data: str = "fine_food"
    text_column: str = "review"
    label_column: str = "score"
    test: str = ""
    tokenizer: str = "sentencepiece"
    vocab_size: int = 2000
    embed: int = 64
    embed_dropout: float = 0.3
    max_tokens: int = 256
    truncate: bool = True
    hidden: int = 64
    bidirectional: bool = True
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    val_fraction: float = 0.1
    head: str = "max+mean"
    head_dropout: float = 0.5
    forget_bias: float = 1.0
    ensemble: int = 1
    pretrain_epochs: int = 4
    pretrain_lr: float = 3e-3
    pretrained_lr_scale: float = 1.0
    keep: str = "loss"
    wide: int = 0
    wide_buckets: int = 2 ** 18
    wide_lr_scale: float = 1.0
    wide_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        head_parts(self.head)
        if self.tokenizer not in gtext.TOKENIZERS:
            raise ValueError(f"tokenizer: got {self.tokenizer!r}, expected one of "
                             f"{', '.join(gtext.TOKENIZERS)}")
        for name, low in (("vocab_size", 16), ("embed", 1), ("max_tokens", 1), ("ensemble", 1),
                          ("pretrain_epochs", 0), ("wide", 0), ("wide_buckets", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= {low}")
        for name in ("embed_dropout", "head_dropout", "wide_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected a number in [0, 1)")
        if not self.wide_lr_scale > 0:
            raise ValueError(f"wide_lr_scale: got {self.wide_lr_scale}, expected a number > 0")
        if not self.pretrained_lr_scale > 0:
            raise ValueError(f"pretrained_lr_scale: got {self.pretrained_lr_scale}, expected a "
                             "number > 0")
        if self.keep not in ("loss", "accuracy"):
            raise ValueError(f"keep: got {self.keep!r}, expected 'loss' or 'accuracy'")
        if not self.pretrain_lr > 0:
            raise ValueError(f"pretrain_lr: got {self.pretrain_lr}, expected a number > 0")
        if self.pretrain_epochs and self.layers > 1 and self.bidirectional:
            # the second layer of a bidirectional stack reads both directions: no one-way LM has it
            raise ValueError(f"pretrain_epochs: got {self.pretrain_epochs} with layers="
                             f"{self.layers} and bidirectional=true; pretraining needs layers=1 "
                             "or a one-way stack")


class TextClassifier(nn.Module):
    """Embedding -> ``gyre.nn.Recurrent`` -> pooling head -> linear: one logit for two classes
    (sigmoid), ``n_classes`` logits otherwise (softmax); with ``wide`` > 0 the logits of a
    :class:`gyre.text.NgramBag` over the ids are added.

    ``forward(ids (B, T) int64, state=None, *, lengths=None) -> (logits (B,) or (B, K), h_n)``."""

    def __init__(self, vocab_size: int, n_classes: int, cell: str = "lstm", embed: int = 64,
                 hidden: int = 64, layers: int = 1, bidirectional: bool = True,
                 dropout: float = 0.0, head: str = "last+mean", head_dropout: float = 0.0,
                 embed_dropout: float = 0.0, forget_bias: float | None = 1.0, wide: int = 0,
                 wide_buckets: int = 2 ** 18, wide_dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = gtext.TokenEmbedding(vocab_size, embed, embed_dropout)
        self.rnn = Recurrent(cell, embed, hidden, layers, batch_first=True, dropout=dropout,
                             bidirectional=bidirectional)
        if forget_bias is not None:
            set_forget_bias(self.rnn, forget_bias)
        dirs = 2 if bidirectional else 1
        self.pool = SequencePool(head, dirs)
        self.drop = nn.Dropout(head_dropout)
        self.binary = n_classes == 2
        self.fc = nn.Linear(self.pool.features(dirs * self.rnn.output_size),
                            1 if self.binary else n_classes)
        self.wide = gtext.NgramBag(vocab_size, self.fc.out_features, wide_buckets, wide) \
            if wide else None
        self.wide_dropout = float(wide_dropout)

    def forward(self, ids: Tensor, state=None, *, lengths: Tensor | None = None):
        out, h_n = self.rnn(self.embedding(ids), state, lengths=lengths)
        return self.export_head(out, ids, lengths), h_n

    # the export hook (gyre.export.onnx, gyre.serve): forward is export_head(rnn(export_pre(..)))
    export_tokens = True  # the exported graph's x: token ids (B, T) int64

    def export_pre(self, ids: Tensor, lengths: Tensor | None):
        return self.embedding(ids), lengths

    def export_head(self, out: Tensor, ids: Tensor, lengths: Tensor | None) -> Tensor:
        logits = self.fc(self.drop(self.pool(out, lengths)))
        if self.wide is not None:
            w = self.wide(ids, lengths)
            if self.training and self.wide_dropout:  # the whole part, per text: the recurrent
                keep = torch.rand(w.shape[0], 1, device=w.device) >= self.wide_dropout
                w = w * keep  # part must predict alone on those texts
            logits = logits + w
        return logits.squeeze(-1) if self.binary else logits

    @property
    def stream_window(self) -> int | None:
        """Steps of output the head reads at the latest step (every step so far when pooled)."""
        return 1 if self.pool.parts == ["last"] and self.wide is None else None


class TextEnsemble(Ensemble):
    """:class:`gyre.tasks.classify.Ensemble` of :class:`TextClassifier` members: in training
    every member's logits, ``(B, n, 1)`` for two classes or ``(B, n, K)``; in evaluation the
    mean of their logits ``(B,)`` (two classes) or the log of their mean class probabilities
    ``(B, K)``."""

    def forward(self, ids: Tensor, state=None, *, lengths: Tensor | None = None):
        z = torch.stack([m(ids, lengths=lengths)[0] for m in self.members], 1)
        if self.training:
            return (z[..., None] if z.dim() == 2 else z), None
        if z.dim() == 2:
            return z.mean(1), None
        return torch.logsumexp(torch.log_softmax(z, -1), 1) - math.log(z.shape[1]), None


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    """Binary cross-entropy of ``(B,)`` logits, cross-entropy of ``(B, K)``; an ensemble's
    training output ``(B, n, 1)`` (binary) or ``(B, n, K)`` is the mean of its members'."""
    if logits.dim() == 3 and logits.shape[2] == 1:
        return nn.functional.binary_cross_entropy_with_logits(
            logits[..., 0], y.float()[:, None].expand(-1, logits.shape[1]))
    if logits.dim() == 3:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[2]),
                                           y.repeat_interleave(logits.shape[1]))
    if logits.dim() == 1:
        return nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return nn.functional.cross_entropy(logits, y)


def probabilities(logits: Tensor) -> np.ndarray:
    """``(N, K)`` class probabilities from either output form."""
    if logits.dim() == 1:
        p = torch.sigmoid(logits.float())
        return torch.stack([1 - p, p], 1).numpy()
    return torch.softmax(logits.float(), -1).numpy()


def accuracy(logits: Tensor, y: Tensor) -> dict[str, float]:
    pred = probabilities(logits).argmax(1)
    return {"accuracy": float(np.mean(pred == y.numpy()))}


def scores(prob: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """``accuracy``, ``f1_macro`` and, for two classes, ``roc_auc`` (class 1 positive)."""
    from sklearn.metrics import f1_score, roc_auc_score
    pred = prob.argmax(1)
    out = {"accuracy": float(np.mean(pred == y)),
           "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0))}
    if prob.shape[1] == 2:
        out["roc_auc"] = float(roc_auc_score(y, prob[:, 1])) if len(set(y)) == 2 else float("nan")
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Token id lists and labels; :func:`collate` pads them into ``x``, ``lengths``, ``y``."""

    def __init__(self, ids: list[list[int]], y: np.ndarray) -> None:
        self.ids, self.y = ids, np.asarray(y, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], int(self.y[i])


def collate(items) -> dict[str, Tensor]:
    ids, y = zip(*items, strict=True)
    x, lengths = gtext.pad_batch(ids)
    return {"x": x, "lengths": lengths, "y": torch.tensor(y, dtype=torch.int64)}


def encode(tok: gtext.Tokenizer, texts: list[str], max_tokens: int, truncate: bool,
           who: str) -> list[list[int]]:
    """Token ids of every text, each cut to ``max_tokens`` (or, without ``truncate``, an error
    for the first longer text)."""
    out = []
    for i, t in enumerate(texts):
        ids = tok.encode(t)
        if len(ids) > max_tokens:
            if not truncate:
                raise ValueError(f"{who}: text {i} has {len(ids)} tokens, more than max_tokens="
                                 f"{max_tokens} ({t[:40]!r}...); raise --max-tokens or allow "
                                 "--truncate")
            ids = ids[:max_tokens]
        if not ids:
            raise ValueError(f"{who}: text {i} gives no tokens ({t!r})")
        out.append(ids)
    return out


def build_model(config: Config, vocab_size: int, n_classes: int) -> TextClassifier | TextEnsemble:
    if config.ensemble > 1:
        one = dataclasses.replace(config, ensemble=1)
        return TextEnsemble([build_model(one, vocab_size, n_classes)
                             for _ in range(config.ensemble)])
    return TextClassifier(vocab_size, n_classes, config.cell, config.embed, config.hidden,
                          config.layers, config.bidirectional, config.dropout, config.head,
                          config.head_dropout, config.embed_dropout, config.forget_bias,
                          config.wide, config.wide_buckets, config.wide_dropout)


#: pretraining's chunk length in tokens (truncated BPTT) and its number of contiguous tracks
PRETRAIN_TBPTT, PRETRAIN_TRACKS = 50, 32


def pretrain(model: TextClassifier, config: Config, tok: gtext.Tokenizer, fit_texts: list[str],
             val_texts: list[str], out: Path) -> dict | None:
    """Language-model pretraining of ``model``'s embedding and recurrent layers, in place
    (Howard & Ruder 2018, ULMFiT, without its gradual unfreezing): the training texts, whole
    (not cut to ``max_tokens``) and each ended by ``EOS``, are one stream that
    :class:`gyre.tasks.lm.LanguageModel` (tied output) learns to predict with truncated BPTT
    over contiguous tracks. A bidirectional model's reverse direction then learns the same
    on the reversed texts, the embedding frozen at the forward model's so that both directions
    read one embedding. Only the training split's texts are read (``val_texts``, the
    classifier's validation share, only scores the language model). Each language model is a
    run of its own in ``out/pretrain-forward`` / ``out/pretrain-backward`` (checkpoint,
    log.csv). Returns each direction's history, or None when interrupted."""
    from . import lm

    def ids(texts: list[str], reverse: bool) -> list[int]:
        out = []
        for t in texts:
            d = tok.encode(t)
            out += (d[::-1] if reverse else d) + [gtext.EOS]
        return out

    tc = config.train_config(epochs=config.pretrain_epochs, lr=config.pretrain_lr,
                             batch_size=PRETRAIN_TRACKS, tbptt=PRETRAIN_TBPTT,
                             scheduler="onecycle", scheduler_interval="step", shuffle=False,
                             shard="contiguous", weight_decay=0.0, patience=0,
                             progress=config.progress, tensorboard=False)
    history = {}
    for reverse in ([False, True] if config.bidirectional else [False]):
        name = "backward" if reverse else "forward"
        lang = lm.LanguageModel(tok.vocab_size, config.cell, config.embed, config.hidden,
                                config.layers, config.dropout, config.embed_dropout, tie=True,
                                forget_bias=config.forget_bias)
        if reverse:  # one embedding for both directions: the forward model's, kept fixed
            lang.embedding.load_state_dict(model.embedding.state_dict())
            lang.embedding.embedding.weight.requires_grad_(False)
        trainer = lm.LMTrainer(lang, lm.loss_fn, tc, out_dir=out / f"pretrain-{name}")
        val = lm.Stream(ids(val_texts, reverse), 16, sum(len(t) + 1 for t in val_texts)) \
            if val_texts else None  # (+1: the EOS after each text, as a newline would be)
        train = ids(fit_texts, reverse)  # a small text gets fewer tracks, each >= 2 tokens
        result = trainer.fit(lm.training_stream(train, min(PRETRAIN_TRACKS, len(train) // 2)),
                             val)
        if result["interrupted"]:
            return None
        history[name] = [{k: round(v, 4) for k, v in h.items() if isinstance(v, float)}
                         for h in result["history"]]
        if not reverse:
            model.embedding.load_state_dict(lang.embedding.state_dict())
        suffix = "_reverse" if reverse else ""
        own = model.rnn.state_dict()
        for k, v in lang.rnn.state_dict().items():  # torch.nn names: weight_ih_l0 -> .._reverse
            own[k + suffix] = v
        model.rnn.load_state_dict(own)
    return history


def keep_options(config: Config) -> dict:
    """The Trainer's ``monitor`` and ``mode`` for ``config.keep``."""
    if config.keep == "accuracy":
        return {"monitor": "val_accuracy", "mode": "max"}
    return {"monitor": "val_loss", "mode": "min"}


def param_groups(model: nn.Module, config: Config) -> list[dict]:
    """The optimizer's groups: a pretrained run's embedding and recurrent layers at
    ``pretrained_lr_scale`` times the rate, the n-gram part at ``wide_lr_scale`` times it, the
    rest (the head) at the rate."""
    pre_scale = config.pretrained_lr_scale if config.pretrain_epochs else 1.0

    def scale(name: str) -> float:
        name = f".{name}"
        if ".wide." in name:
            return config.wide_lr_scale
        if ".embedding." in name or ".rnn." in name:
            return pre_scale
        return 1.0

    groups: dict[float, list] = {}
    for n, p in model.named_parameters():
        groups.setdefault(scale(n), []).append(p)
    return [{"params": ps, "lr_scale": k} if k != 1.0 else {"params": ps}
            for k, ps in groups.items()]


def describe(config: Config) -> str:
    return (f"{config.tokenizer} {'bi' if config.bidirectional else ''}{config.cell} "
            f"{config.layers}x{config.hidden} ({config.head} head"
            f"{f', ensemble of {config.ensemble}' if config.ensemble > 1 else ''})")


def baselines(data: tdata.LabeledTexts, y_fit: np.ndarray, fit_texts: list[str]) -> dict:
    """Majority class and TF-IDF (word 1-2 grams, sublinear tf) + logistic regression, fitted
    on the same training texts as the model."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    K = len(data.classes)
    maj = np.zeros((len(data.y_test), K))
    maj[:, np.bincount(y_fit, minlength=K).argmax()] = 1.0
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(vec.fit_transform(fit_texts), y_fit)
    prob = np.zeros((len(data.y_test), K))
    prob[:, clf.classes_] = clf.predict_proba(vec.transform(data.test_texts))
    return {"majority": scores(maj, data.y_test), "tfidf_logreg": scores(prob, data.y_test)}


def train(config: Config, *, resume: bool = False) -> dict:
    """Train, evaluate beside the baselines, write the run (see :mod:`gyre.tasks`)."""
    if not isinstance(config, Config):
        raise TypeError(f"config: got {type(config).__name__}, expected gyre.tasks.sentiment.Config")
    data = tdata.load_sentiment(config.data, config.text_column, config.label_column,
                                config.test, config.seed)
    tr, va = validation_split(data.y_train, config.val_fraction, config.seed)
    fit_texts = [data.train_texts[i] for i in tr]
    if resume:  # before anything is written: a refused resume leaves the run as it was
        base.check_resume(config, config.out)
    out = base.resolve_out(config, TASK)
    if resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(out)!r} to resume from")
    if resume:  # the tokeniser the checkpoint's embeddings were trained with
        tok = gtext.tokenizer_from_state(load_checkpoint(out / CHECKPOINT)["extra"]["tokenizer"])
    else:
        tok = gtext.fit_tokenizer(config.tokenizer, fit_texts, vocab_size=config.vocab_size)
    tok = base.same_tokenizer(tok)  # distributed: every process uses rank 0's
    enc = lambda texts, who: encode(tok, texts, config.max_tokens, config.truncate, who)  # noqa: E731
    train_ds = TokenDataset(enc(fit_texts, "data"), data.y_train[tr])
    val_ds = TokenDataset(enc([data.train_texts[i] for i in va], "data"), data.y_train[va])
    test_ds = TokenDataset(enc(data.test_texts, "test"), data.y_test)
    seed_everything(config.seed)
    model = build_model(config, tok.vocab_size, len(data.classes))
    pretrained = None
    if config.pretrain_epochs and not resume:  # a resumed run's checkpoint holds the weights
        members = model.members if isinstance(model, TextEnsemble) else [model]
        pretrained = pretrain(members[0], config, tok, fit_texts,
                              [data.train_texts[i] for i in va], out)
        if pretrained is None:
            return {"interrupted": True, "out": str(out)}
        for m in members[1:]:  # an ensemble's members start from one pretraining
            m.embedding.load_state_dict(members[0].embedding.state_dict())
            m.rnn.load_state_dict(members[0].rnn.state_dict())
        seed_everything(config.seed)
    extra = {"classes": list(data.classes), "tokenizer": tok.state(),
             "vocab_size": tok.vocab_size}
    clock, epoch_times = base.epoch_clock(base.config_writer(config, out))
    tc = config.train_config(progress=config.progress, **keep_options(config))
    trainer = Trainer(model, loss_fn, tc, collate=collate, metrics=accuracy, out_dir=out,
                      extra=extra, callback=clock, params=param_groups(model, config))
    start = time.perf_counter()
    result = trainer.fit(train_ds, val_ds if len(val_ds) else None, resume=resume)
    seconds = time.perf_counter() - start
    early = base.early_exit(out, result)
    if early is not None:
        return early
    logits, y = trainer.predict(test_ds)
    test = scores(probabilities(logits), y.numpy())
    base.plot_history(result["history"], out / "loss.png", f"{describe(config)} on {data.name}")
    metrics = {
        "task": TASK, "data": data.name, "out": str(out), "model": describe(config),
        "test": test, "baselines": baselines(data, data.y_train[tr], fit_texts),
        "train": {"epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
                  "stopped_early": result["stopped_early"], "seconds": round(seconds, 2),
                  "epoch_times": epoch_times,
                  "n_train": len(train_ds), "n_val": len(val_ds), "n_test": len(test_ds),
                  "vocab_size": tok.vocab_size,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "classes": list(data.classes),
    }
    if pretrained is not None:
        metrics["pretrain"] = pretrained
    base.write_json(metrics, out / "metrics.json")
    return metrics


def load_run(out_dir) -> tuple[Config, TextClassifier, gtext.Tokenizer, dict]:
    """``(config, model with the kept weights, tokenizer, checkpoint extra)``."""
    out = Path(out_dir)
    if not (out / "config.toml").is_file():
        raise FileNotFoundError(f"out_dir: {str(out)!r} has no config.toml; expected a directory "
                                "written by gyre train sentiment")
    config = base.load_config(Config, out / "config.toml")
    ckpt = load_checkpoint(out / CHECKPOINT)
    extra = ckpt["extra"]
    model = build_model(config, extra["vocab_size"], len(extra["classes"]))
    best = ckpt["best"]["model"]
    use_best = best is not None and ckpt["config"].get("restore_best", True)
    model.load_state_dict(best if use_best else ckpt["model"])
    model.eval()
    return config, model, gtext.tokenizer_from_state(extra["tokenizer"]), extra


def _datasets(config: Config, extra: dict) -> tuple[TokenDataset, TokenDataset, TokenDataset]:
    """The run's train, validation and test sets, encoded by its saved tokeniser."""
    data = tdata.load_sentiment(config.data, config.text_column, config.label_column,
                                config.test, config.seed)
    tr, va = validation_split(data.y_train, config.val_fraction, config.seed)
    tok = gtext.tokenizer_from_state(extra["tokenizer"])
    enc = lambda texts, who: encode(tok, texts, config.max_tokens, config.truncate, who)  # noqa: E731
    return (TokenDataset(enc([data.train_texts[i] for i in tr], "data"), data.y_train[tr]),
            TokenDataset(enc([data.train_texts[i] for i in va], "data"), data.y_train[va]),
            TokenDataset(enc(data.test_texts, "test"), data.y_test))


def build_like(config: Config, extra: dict) -> TextClassifier:
    """The model of a run with checkpoint ``extra`` as ``config`` describes it (e.g. a smaller
    ``hidden`` for structured pruning), untrained."""
    return build_model(config, extra["vocab_size"], len(extra["classes"]))


def finetune(model: TextClassifier, config: Config, extra: dict) -> None:
    """Train ``model`` (e.g. a pruned one) for ``config.epochs`` on the run's training split
    into the new run directory ``config.out`` (config.toml and checkpoint, as gyre train
    writes them), with the run's tokeniser and classes (``extra``)."""
    train_ds, val_ds, _ = _datasets(config, extra)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base.write_config(config, out / "config.toml")
    seed_everything(config.seed)
    trainer = Trainer(model, loss_fn, config.train_config(progress=False), collate=collate,
                      metrics=accuracy, out_dir=out, extra=extra)
    result = trainer.fit(train_ds, val_ds if len(val_ds) else None)
    if result["interrupted"]:
        raise KeyboardInterrupt


def score_test(out_dir, run=None) -> tuple[dict, float]:
    """``(test scores, seconds of the model's forward over the test split)`` of a run; ``run``:
    what computes the forward instead of the run's model."""
    config, model, _, extra = load_run(out_dir)
    _, _, test_ds = _datasets(config, extra)
    _probs(run or model, test_ds.ids[:128])  # warm-up (a compiled kernel's first call)
    start = time.perf_counter()
    prob = _probs(run or model, test_ds.ids)
    seconds = time.perf_counter() - start
    return scores(prob, np.asarray(test_ds.y)), seconds


@torch.no_grad()
def _probs(model, ids: list[list[int]], batch_size: int = 128) -> np.ndarray:
    outs = []
    for s in range(0, len(ids), batch_size):
        x, lengths = gtext.pad_batch(ids[s:s + batch_size])
        outs.append(probabilities(model(x, lengths=lengths)[0]))
    return np.concatenate(outs)


def evaluate(out_dir, data: str | None = None) -> dict:
    config, model, tok, extra = load_run(out_dir)
    ds = tdata.load_sentiment(data or config.data, config.text_column, config.label_column,
                              config.test if data is None else "", config.seed)
    classes = list(extra["classes"])
    missing = sorted(set(ds.classes) - set(classes))
    if missing:
        raise ValueError(f"data: labels {missing[:5]} were not among the trained classes {classes}")
    remap = {c: i for i, c in enumerate(classes)}
    y = np.array([remap[ds.classes[i]] for i in ds.y_test])
    prob = _probs(model, encode(tok, ds.test_texts, config.max_tokens, config.truncate, "data"))
    return {"test": scores(prob, y), "data": ds.name, "n_test": len(y)}


def predict(out_dir, data_path: str, *, runtime: str = "torch") -> list[dict]:
    """Label and class probabilities for every text of ``data_path`` (a CSV with the run's
    ``text_column``, or a .txt with one text per line). ``runtime="onnxruntime"`` runs the
    run's exported ``model.onnx`` (``gyre export``)."""
    config, model, tok, extra = load_run(out_dir)
    model = base.runtime_model(out_dir, runtime) or model
    texts = tdata.read_texts(data_path, config.text_column)
    prob = _probs(model, encode(tok, texts, config.max_tokens, config.truncate, "data"))
    classes = list(extra["classes"])
    rows = []
    for i, p in enumerate(prob):
        row = {"index": i, "label": classes[int(p.argmax())]}
        row.update({f"prob_{c}": round(float(v), 6) for c, v in zip(classes, p, strict=True)})
        rows.append(row)
    return rows


def stream_io(model: TextClassifier, extra: dict):
    """``(input, output)`` transforms for serving a run token by token (``gyre serve``; each
    step is one token id, ``[[id]]``, which the model embeds): none on the input; each output
    the class probabilities, in the order of ``extra["classes"]``."""
    return None, lambda logits: torch.from_numpy(probabilities(logits))


def explain_inputs(out_dir, data: str | None = None, samples: int = 8):
    """The explain seam (:mod:`gyre.explain`): per-token attributions of the first ``samples``
    test texts (:func:`gyre.explain.text.sentiment_inputs`); one model, not an ensemble."""
    from ..explain.text import sentiment_inputs
    config = base.load_config(Config, Path(out_dir) / "config.toml")
    if config.ensemble > 1:  # the members have an embedding each: no one input to attribute to
        raise ValueError(f"ensemble={config.ensemble}: explain needs a single model (ensemble=1)")
    if config.wide:  # attributions run through the embedding, which the n-gram part skips
        raise ValueError(f"wide={config.wide}: explain attributes through the token embedding, "
                         "which the n-gram part does not read; it needs a run with wide=0")
    return sentiment_inputs(out_dir, data, samples)


__all__ = ["Config", "TASK", "TextClassifier", "train", "evaluate", "predict", "load_run",
           "build_model", "baselines", "scores", "explain_inputs"]
