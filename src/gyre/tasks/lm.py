"""Language modelling over one long text with stateful truncated BPTT, beside an add-one
unigram and an interpolated Kneser-Ney character n-gram; sampling with carried state.

The training stream is cut into ``batch_size`` contiguous tracks, one row each of a single
batch: the Trainer walks it in ``tbptt``-step chunks and carries the state from chunk to
chunk, so an epoch is one pass over the text with the state never reset. Every split is
scored as ``-sum log p(token_t | tokens_<t)`` over all its tokens (the first predicted after
``BOS``), so ``bits_per_char`` (those nats over the split's characters, ``/ ln 2``) compares
any tokenizer and the n-gram; ``perplexity`` is per token of the model's own tokenizer.
A subword stream is scored in its one segmentation (sentencepiece's), whose probability is at
most the text's, so its bits per character are if anything too high, never too low. An unseen
word or character is one ``UNK`` token, which stands for many texts: its share of the score is
not a character probability, so ``metrics.json`` counts them (``test_unk_tokens``; sentencepiece
has none, its byte fallback spells every character).

Follows the task contract in :mod:`gyre.tasks`. Data: :func:`gyre.data.text.load_stream`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import text as gtext
from ..data import text as tdata
from ..nn import Recurrent
from ..text.ngram import KneserNey, Unigram
from ..train import CHECKPOINT, Trainer, detach_state, load_checkpoint, seed_everything
from . import base
from .classify import set_forget_bias

TASK = "lm"
LN2 = math.log(2)
#: fields a resumed run may change beyond :data:`gyre.tasks.base.RESUMABLE` (read after training)
RESUMABLE = ("ngram_order", "eval_tracks", "dynamic_lr")
#: the dynamic-evaluation step sizes ``dynamic_lr=-1`` chooses from on the validation split
#: (0: the model as trained)
DYNAMIC_LRS = (0.0, 0.03, 0.1, 0.3, 1.0)
#: the tokens at the start of the validation split the step size is chosen on (a pass of
#: dynamic evaluation costs a forward and a backward at batch 1 for every token)
DYNAMIC_VAL_TOKENS = 30000
#: the run file that holds the dynamic-evaluation step size a run chose
DYNAMIC_FILE = "dynamic_eval.json"


@dataclass
class Config(base.TaskConfig):
    """Language-model run. Beyond :class:`gyre.tasks.base.TaskConfig`:

    ``batch_size`` is the number of contiguous tracks and ``tbptt`` the chunk length in
    tokens; an epoch is one pass over the training text.

    Attributes:
        tokenizer: how text becomes tokens, ``char``, ``word`` or ``sentencepiece``, fitted on
            the training text only.
        vocab_size: the most words or pieces the tokenizer's vocabulary has (char ignores it).
        embed: embedding width.
        tie: the output layer shares the embedding matrix (needs embed equal to the output width).
        forget_bias: the initial forget-gate bias of LSTM-family cells (None keeps the cell's own).
        embed_dropout: dropout on the embeddings (the recurrent stack's own is ``dropout``).
        ngram_order: order of the Kneser-Ney character baseline (0 = skip it).
        eval_tracks: tracks a validation/test split is scored in (each starts from a zero
            state, then carries it).
        dynamic_lr: dynamic evaluation (Krause et al. 2018, the SGD form) of the test split
            beside the plain score: the split read as one track in text order, each
            ``tbptt``-token chunk scored with the parameters as they stand and then one SGD
            step of this size on that chunk's loss (gradient clipped to ``clip_norm``), on a
            copy of the model, so every token is still predicted from the training text and
            the test text before it only. ``metrics.json`` ``dynamic``; ``test`` stays the
            model as trained. -1 chooses the size from :data:`DYNAMIC_LRS` on the first
            :data:`DYNAMIC_VAL_TOKENS` tokens of the validation split (no validation split:
            skipped), 0 skips it.

    The defaults (sentencepiece 2000 pieces, LSTM 1x512, tied 256-wide embedding, tbptt 50,
    onecycle) were compared with the character LSTM on the validation plays (RESULTS.md "Text,
    third day"), and 3 epochs with 2 (validation 1.972 against 2.061 bits/char, "Text, fourth
    day"); about 3 minutes of one quiet core an epoch.
    """

    data: str = "shakespeare"
    tokenizer: str = "sentencepiece"
    vocab_size: int = 2000
    embed: int = 256
    tie: bool = True
    embed_dropout: float = 0.0
    hidden: int = 512
    layers: int = 1
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    tbptt: int = 50
    clip_norm: float = 1.0
    scheduler: str = "onecycle"
    val_fraction: float = 0.0
    ngram_order: int = 5
    eval_tracks: int = 16
    forget_bias: float = 1.0
    dynamic_lr: float = -1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer not in gtext.TOKENIZERS:
            raise ValueError(f"tokenizer: got {self.tokenizer!r}, expected one of "
                             f"{', '.join(gtext.TOKENIZERS)}")
        if self.bidirectional:
            raise ValueError("bidirectional: a language model predicts from the past only; "
                             "got bidirectional=true, expected false")
        if self.tbptt < 1:
            raise ValueError(f"tbptt: got {self.tbptt}, expected the chunk length in tokens >= 1")
        for name, low in (("vocab_size", 16), ("embed", 1), ("eval_tracks", 1),
                          ("ngram_order", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= {low}")
        if not 0 <= self.embed_dropout < 1:
            raise ValueError(f"embed_dropout: got {self.embed_dropout}, expected [0, 1)")
        if not (self.dynamic_lr >= 0 or self.dynamic_lr == -1):
            raise ValueError(f"dynamic_lr: got {self.dynamic_lr}, expected -1 (choose on "
                             "validation), 0 (off) or an SGD step size > 0")


class LanguageModel(nn.Module):
    """Embedding -> ``gyre.nn.Recurrent`` (unidirectional) -> dropout -> vocabulary logits
    (:class:`gyre.text.TiedOutput`, tied to the embedding when ``tie``).

    ``forward(ids (B, T) int64, state=None, *, lengths=None) -> (logits (B, T, V), state)``;
    :meth:`step` does one token with carried state for generation."""

    def __init__(self, vocab_size: int, cell: str = "lstm", embed: int = 64, hidden: int = 256,
                 layers: int = 1, dropout: float = 0.0, embed_dropout: float = 0.0,
                 tie: bool = True, forget_bias: float | None = 1.0) -> None:
        super().__init__()
        self.embedding = gtext.TokenEmbedding(vocab_size, embed, embed_dropout)
        self.rnn = Recurrent(cell, embed, hidden, layers, batch_first=True, dropout=dropout)
        if forget_bias is not None:
            set_forget_bias(self.rnn, forget_bias)
        self.drop = nn.Dropout(dropout)
        self.head = gtext.TiedOutput(self.rnn.output_size, self.embedding, tie)

    def forward(self, ids: Tensor, state=None, *, lengths: Tensor | None = None):
        out, state = self.rnn(self.embedding(ids), state, lengths=lengths)
        return self.head(self.drop(out)), state

    def step(self, ids: Tensor, state=None):
        """``ids (B,)`` -> ``(logits (B, V), state)``: one step, the state carried."""
        y, state = self.rnn.step(self.embedding(ids), state)
        return self.head(self.drop(y)), state

    # the export hook (gyre.export.onnx, gyre.serve): forward is export_head(rnn(export_pre(..)))
    export_tokens = True  # the exported graph's x: token ids (B, T) int64
    stream_window = 1  # a step's logits read that step's output only

    def export_pre(self, ids: Tensor, lengths: Tensor | None):
        return self.embedding(ids), lengths

    def export_head(self, out: Tensor, ids: Tensor, lengths: Tensor | None) -> Tensor:
        return self.head(self.drop(out))


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over every target token (``PAD`` targets ignored)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                       ignore_index=gtext.PAD)


class Stream:
    """A split as token ids ``y`` and inputs ``x = [BOS] + y[:-1]``, cut into ``tracks``
    contiguous rows (the last padded with ``PAD``): item ``k`` is row ``k``'s ``(x, y)``.
    ``chars`` is the split's length in characters (for bits per character)."""

    def __init__(self, ids: list[int], tracks: int, chars: int) -> None:
        if not ids:
            raise ValueError("data: a split gives no tokens; expected some text")
        y = torch.tensor(ids, dtype=torch.int64)
        x = torch.cat([torch.tensor([gtext.BOS]), y[:-1]])
        tracks = max(1, min(tracks, len(ids)))
        L = -(-len(ids) // tracks)
        pad = tracks * L - len(ids)
        self.x = torch.cat([x, x.new_full((pad,), gtext.PAD)]).view(tracks, L)
        self.y = torch.cat([y, y.new_full((pad,), gtext.PAD)]).view(tracks, L)
        self.tokens, self.chars = len(ids), chars

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, k):
        return self.x[k], self.y[k]


def training_stream(ids: list[int], tracks: int) -> Stream:
    """The training text as ``tracks`` rows of equal length (the remainder dropped)."""
    L = len(ids) // tracks
    if L < 2:
        raise ValueError(f"batch_size: {tracks} tracks of a {len(ids)}-token training text "
                         "leave fewer than 2 tokens a track; use fewer tracks or more text")
    s = Stream(ids[:tracks * L], tracks, 0)
    return s


@torch.no_grad()
def stream_nats(model: nn.Module, stream: Stream, chunk: int = 256,
                device: torch.device | str = "cpu") -> float:
    """``-sum log p`` over every token of ``stream``, chunk by chunk with carried state."""
    was = model.training
    model.eval()
    total, state = 0.0, None
    x, y = stream.x.to(device), stream.y.to(device)
    for s in range(0, x.shape[1], chunk):
        logits, state = model(x[:, s:s + chunk], state)
        total += float(nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y[:, s:s + chunk].reshape(-1),
            ignore_index=gtext.PAD, reduction="sum"))
    model.train(was)
    return total


def dynamic_nats(model: nn.Module, stream: Stream, lr: float, chunk: int,
                 clip_norm: float = 1.0, device: torch.device | str = "cpu",
                 per_chunk: list[float] | None = None) -> float:
    """``-sum log p`` over every token of ``stream`` under dynamic evaluation: the tracks of
    ``stream`` joined back into one in text order, each ``chunk`` of it scored with the
    parameters as they stand, then one SGD step of size ``lr`` on that chunk's mean loss
    (dropout off, the state carried and detached). A copy of ``model`` adapts; ``model``
    itself is left as it was. ``lr=0`` is the plain score on one track. ``per_chunk``, when
    given, receives each chunk's nats in order."""
    # batch 1 is a stream of tiny ops; extra intra-op threads only wait on each other, and on a
    # busy machine each op then waits for a descheduled thread (measured: 270x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dynamic_nats(model, stream, lr, chunk, clip_norm, device, per_chunk)
    finally:
        torch.set_num_threads(threads)


def _dynamic_nats(model: nn.Module, stream: Stream, lr: float, chunk: int, clip_norm: float,
                  device, per_chunk: list[float] | None) -> float:
    x, y = (t.reshape(1, -1) for t in (stream.x, stream.y))
    keep = y[0] != gtext.PAD
    x, y = x[:, keep].to(device), y[:, keep].to(device)
    m = copy.deepcopy(model)
    m.eval()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if lr > 0 else None
    total, state = 0.0, None
    for s in range(0, x.shape[1], chunk):
        with torch.set_grad_enabled(opt is not None):
            logits, state = m(x[:, s:s + chunk], state)
            nll = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                              y[:, s:s + chunk].reshape(-1), reduction="sum")
        total += float(nll.detach())
        if per_chunk is not None:
            per_chunk.append(float(nll.detach()))
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            (nll / logits.shape[1]).backward()
            if clip_norm:
                nn.utils.clip_grad_norm_(params, clip_norm)
            opt.step()
            state = detach_state(state)
    return total


def choose_dynamic_lr(model: nn.Module, val: Stream, chunk: int, clip_norm: float,
                      device: torch.device | str = "cpu") -> dict:
    """Every size of :data:`DYNAMIC_LRS` scored on the validation stream by
    :func:`dynamic_nats`; ``{"lr": the lowest's, "by_lr": [{"lr", "bits_per_char"}, ...]}``."""
    rows = []
    for lr in DYNAMIC_LRS:
        nats = dynamic_nats(model, val, lr, chunk, clip_norm, device)
        rows.append({"lr": lr, **stream_metrics(nats, val.tokens, val.chars)})
    best = min(rows, key=lambda r: r["bits_per_char"])
    return {"lr": best["lr"], "by_lr": rows}


def stream_metrics(nats: float, tokens: int, chars: int) -> dict[str, float]:
    return {"bits_per_char": nats / chars / LN2, "perplexity": math.exp(nats / tokens)}


class LMTrainer(Trainer):
    """The Trainer, scoring a validation :class:`Stream` with carried state (``evaluate``)
    instead of one forward pass over the whole split."""

    def evaluate(self, data) -> dict[str, float]:
        if not isinstance(data, Stream):
            return super().evaluate(data)
        nats = stream_nats(self.model, data, device=self.device)
        return {"loss": nats / data.tokens, **stream_metrics(nats, data.tokens, data.chars)}


def build_model(config: Config, vocab_size: int) -> LanguageModel:
    return LanguageModel(vocab_size, config.cell, config.embed, config.hidden, config.layers,
                         config.dropout, config.embed_dropout, config.tie, config.forget_bias)


def describe(config: Config) -> str:
    return (f"{config.tokenizer} {config.cell} {config.layers}x{config.hidden}"
            f"{' tied' if config.tie else ''}")


def _tokenizer(config: Config, out: Path, train_text: str, resume: bool) -> gtext.Tokenizer:
    if resume:
        return gtext.tokenizer_from_state(load_checkpoint(out / CHECKPOINT)["extra"]["tokenizer"])
    return gtext.fit_tokenizer(config.tokenizer, [train_text], vocab_size=config.vocab_size)


def baselines(data: tdata.TextStream, tok: gtext.Tokenizer, train_ids: list[int],
              test_ids: list[int], order: int) -> dict:
    """Unigram over the model's tokens; Kneser-Ney over characters, fitted on the training
    text (its ``perplexity`` is per character)."""
    out = {}
    uni = Unigram(train_ids, tok.vocab_size)
    out["unigram"] = stream_metrics(uni.nats(test_ids), len(test_ids), len(data.test))
    if order:
        chars = gtext.CharTokenizer.fit([data.train])
        kn = KneserNey(chars.encode(data.train), chars.vocab_size, order)
        test_chars = chars.encode(data.test)
        out[f"kneser_ney_{order}gram_char"] = stream_metrics(kn.nats(test_chars),
                                                             len(test_chars), len(data.test))
    return out


def train(config: Config, *, resume: bool = False) -> dict:
    if not isinstance(config, Config):
        raise TypeError(f"config: got {type(config).__name__}, expected gyre.tasks.lm.Config")
    data = tdata.load_stream(config.data)
    if resume:  # before anything is written: a refused resume leaves the run as it was
        base.check_resume(config, config.out, also=RESUMABLE)
    out = base.resolve_out(config, TASK)
    if resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(out)!r} to resume from")
    tok = base.same_tokenizer(_tokenizer(config, out, data.train, resume))
    train_ids, val_ids, test_ids = (tok.encode(t) for t in (data.train, data.val, data.test))
    train_ds = training_stream(train_ids, config.batch_size)
    val_ds = Stream(val_ids, config.eval_tracks, len(data.val)) if data.val else None
    test_ds = Stream(test_ids, config.eval_tracks, len(data.test))
    seed_everything(config.seed)
    model = build_model(config, tok.vocab_size)
    extra = {"tokenizer": tok.state(), "vocab_size": tok.vocab_size}
    # distributed: each process carries the state of its own contiguous block of tracks
    clock, epoch_times = base.epoch_clock(base.config_writer(config, out))
    tc = config.train_config(progress=config.progress, shuffle=False, shard="contiguous")
    trainer = LMTrainer(model, loss_fn, tc, out_dir=out, extra=extra,
                        callback=clock)
    start = time.perf_counter()
    result = trainer.fit(train_ds, val_ds, resume=resume)
    seconds = time.perf_counter() - start
    early = base.early_exit(out, result)
    if early is not None:
        return early
    nats = stream_nats(trainer.model, test_ds, device=trainer.device)
    test = stream_metrics(nats, test_ds.tokens, test_ds.chars)
    dyn_val = None
    if val_ids:
        head = val_ids[:DYNAMIC_VAL_TOKENS]
        dyn_val = Stream(head, 1, len(tok.decode(head)))
    dynamic = dynamic_eval(trainer.model, config, dyn_val, test_ds, out, trainer.device)
    base.plot_history(result["history"], out / "loss.png", f"{describe(config)} on {data.name}")
    metrics = {
        "task": TASK, "data": data.name, "out": str(out), "model": describe(config),
        "test": test,
        **({"dynamic": dynamic} if dynamic is not None else {}),
        "baselines": baselines(data, tok, train_ids, test_ids, config.ngram_order),
        "train": {"epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
                  "stopped_early": result["stopped_early"], "seconds": round(seconds, 2),
                  "epoch_times": epoch_times,
                  "train_tokens": train_ds.x.numel(), "test_tokens": test_ds.tokens,
                  "test_chars": test_ds.chars, "vocab_size": tok.vocab_size,
                  "test_unk_tokens": test_ids.count(gtext.UNK),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "held_out": data.held_out,
    }
    base.write_json(metrics, out / "metrics.json")
    return metrics


def dynamic_eval(model: nn.Module, config: Config, val: Stream | None, test: Stream,
                 out: Path, device: torch.device | str = "cpu") -> dict | None:
    """``metrics.json``'s ``dynamic``: the step size (given, or chosen on ``val`` and saved
    in the run as :data:`DYNAMIC_FILE`), the validation table it was chosen from, and the
    test split's score under :func:`dynamic_nats` (absent where the size is 0). None where
    ``config.dynamic_lr`` is 0, or -1 without a validation split. :func:`train` passes the
    validation split's first :data:`DYNAMIC_VAL_TOKENS` tokens as ``val``."""
    lr, chosen = config.dynamic_lr, None
    (out / DYNAMIC_FILE).unlink(missing_ok=True)  # a resumed run's earlier choice is stale
    if lr == -1:
        if val is None:
            return None
        chosen = choose_dynamic_lr(model, val, config.tbptt, config.clip_norm, device)
        lr = chosen["lr"]
        base.write_json(chosen, out / DYNAMIC_FILE)
    if lr == 0 and chosen is None:
        return None
    res = {"lr": lr, "chosen_on_validation": chosen is not None}
    if chosen is not None:
        res["validation"] = chosen["by_lr"]
    if lr > 0:
        nats = dynamic_nats(model, test, lr, config.tbptt, config.clip_norm, device)
        res["test"] = stream_metrics(nats, test.tokens, test.chars)
    return res


def run_dynamic_lr(out_dir, config: Config) -> float:
    """The dynamic-evaluation step size a run uses: ``config.dynamic_lr`` when given (>= 0),
    else the one it chose on validation (:data:`DYNAMIC_FILE`; none, as in runs saved before
    dynamic evaluation existed or trained without a validation split: 0)."""
    if config.dynamic_lr >= 0:
        return config.dynamic_lr
    path = Path(out_dir) / DYNAMIC_FILE
    return float(json.loads(path.read_text())["lr"]) if path.is_file() else 0.0


def load_run(out_dir) -> tuple[Config, LanguageModel, gtext.Tokenizer]:
    out = Path(out_dir)
    if not (out / "config.toml").is_file():
        raise FileNotFoundError(f"out_dir: {str(out)!r} has no config.toml; expected a directory "
                                "written by gyre train lm")
    config = base.load_config(Config, out / "config.toml")
    ckpt = load_checkpoint(out / CHECKPOINT)
    model = build_model(config, ckpt["extra"]["vocab_size"])
    best = ckpt["best"]["model"]
    use_best = best is not None and ckpt["config"].get("restore_best", True)
    model.load_state_dict(best if use_best else ckpt["model"])
    model.eval()
    return config, model, gtext.tokenizer_from_state(ckpt["extra"]["tokenizer"])


def run_extra(out_dir) -> dict:
    """The checkpoint's extra of a run (tokeniser state, vocabulary size)."""
    return load_checkpoint(Path(out_dir) / CHECKPOINT)["extra"]


def build_like(config: Config, extra: dict) -> LanguageModel:
    """The model of a run with checkpoint ``extra`` as ``config`` describes it (e.g. a smaller
    ``hidden`` for structured pruning), untrained."""
    return build_model(config, extra["vocab_size"])


def _streams(config: Config, extra: dict):
    data = tdata.load_stream(config.data)
    tok = gtext.tokenizer_from_state(extra["tokenizer"])
    train_ids, val_ids, test_ids = (tok.encode(t) for t in (data.train, data.val, data.test))
    return (training_stream(train_ids, config.batch_size),
            Stream(val_ids, config.eval_tracks, len(data.val)) if data.val else None,
            Stream(test_ids, config.eval_tracks, len(data.test)))


def finetune(model: LanguageModel, config: Config, extra: dict) -> None:
    """Train ``model`` (e.g. a pruned one) for ``config.epochs`` on the run's training text
    into the new run directory ``config.out`` (config.toml and checkpoint, as gyre train
    writes them), with the run's tokeniser (``extra``)."""
    train_ds, val_ds, _ = _streams(config, extra)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base.write_config(config, out / "config.toml")
    seed_everything(config.seed)
    tc = config.train_config(progress=False, shuffle=False, shard="contiguous")
    result = LMTrainer(model, loss_fn, tc, out_dir=out, extra=extra).fit(train_ds, val_ds)
    if result["interrupted"]:
        raise KeyboardInterrupt


def score_test(out_dir, run=None) -> tuple[dict, float]:
    """``(test metrics, seconds of scoring the test stream)`` of a run (``run``: what computes
    the forward instead of the run's model)."""
    config, model, _ = load_run(out_dir)
    _, _, test_ds = _streams(config, run_extra(out_dir))
    start = time.perf_counter()
    nats = stream_nats(run or model, test_ds)
    seconds = time.perf_counter() - start
    return stream_metrics(nats, test_ds.tokens, test_ds.chars), seconds


def evaluate(out_dir, data: str | None = None) -> dict:
    """Test metrics of the run's test split, or of all of a ``.txt`` file given as ``data``."""
    config, model, tok = load_run(out_dir)
    if data is None or data == config.data:
        text = tdata.load_stream(config.data).test
    else:
        text = tdata.read_text_file(data) if Path(data).is_file() else tdata.load_stream(data).test
    s = Stream(tok.encode(text), config.eval_tracks, len(text))
    res = {"test": stream_metrics(stream_nats(model, s), s.tokens, s.chars), "data": data or
           config.data, "n_chars": s.chars}
    lr = run_dynamic_lr(out_dir, config)
    if lr > 0:
        res["dynamic"] = {"lr": lr, "test": stream_metrics(
            dynamic_nats(model, s, lr, config.tbptt, config.clip_norm), s.tokens, s.chars)}
    return res


def predict(out_dir, data_path: str, *, runtime: str = "torch") -> list[dict]:
    """Per line of a text file: its characters, tokens and bits per character, each line
    scored from a zero state after ``BOS``. ``runtime="onnxruntime"`` runs the run's exported
    ``model.onnx`` (``gyre export``)."""
    _, model, tok = load_run(out_dir)
    model = base.runtime_model(out_dir, runtime) or model
    rows = []
    for i, line in enumerate(tdata.read_text_file(data_path).split("\n")):
        if not line:
            continue
        ids = tok.encode(line)
        s = Stream(ids, 1, len(line))
        nats = stream_nats(model, s)
        rows.append({"line": i + 1, "chars": len(line), "tokens": len(ids),
                     "bits_per_char": round(nats / len(line) / LN2, 6)})
    return rows


def stream_io(model: LanguageModel, extra, top_k: int = 5):
    """``(input, output)`` transforms for serving a run token by token (``gyre serve``; each
    step is one token id, ``[[id]]``, which the model embeds): none on the input; each output
    the next token's ``top_k`` ``[id, probability]`` pairs, most probable first."""
    def output(logits: Tensor) -> Tensor:
        p, ids = torch.softmax(logits[:, -1].float(), -1).topk(min(top_k, logits.shape[-1]))
        return torch.stack([ids.float(), p], -1)
    return None, output


# -- generation -------------------------------------------------------------------------------------
def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Tensor:
    """``(V,)`` logits divided by ``temperature``, all but the ``top_k`` largest and outside
    the smallest set of probability ``>= top_p`` (nucleus; Holtzman et al. 2020) set to -inf."""
    logits = logits.float() / temperature
    logits[gtext.PAD] = logits[gtext.BOS] = -math.inf
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_l, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_l, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_l, -1) >= top_p  # keep the token that crosses top_p
        logits = logits.clone()
        logits[order[drop]] = -math.inf
    return logits


@torch.no_grad()
def generate_ids(model: LanguageModel, prompt_ids: list[int], length: int, *,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 on_token=None) -> list[int]:
    """Sample ``length`` tokens after ``prompt_ids``: the prompt is read once (one forward
    over it after ``BOS``), then one :meth:`LanguageModel.step` per token with carried state.
    ``on_token(id, logits)`` is called as each is drawn (with the raw logits it was drawn
    from). The same seed gives the same tokens."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length: got {length!r}, expected an int >= 0")
    if not temperature > 0:
        raise ValueError(f"temperature: got {temperature!r}, expected a number > 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: got {top_p!r}, expected a number in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k: got {top_k!r}, expected an int >= 0 (0 = off)")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([[gtext.BOS] + list(prompt_ids)], dtype=torch.int64)
    logits, state = model(x)
    last = logits[0, -1]
    out = []
    for _ in range(length):
        p = torch.softmax(filter_logits(last, temperature, top_k, top_p), -1)
        w = int(torch.multinomial(p, 1, generator=gen))
        out.append(w)
        if on_token is not None:
            on_token(w, last)
        step_logits, state = model.step(torch.tensor([w]), state)
        last = step_logits[0]
    return out


def generate(out_dir, prompt: str = "", length: int = 200, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stream=None) -> str:
    """Text sampled from a trained lm after ``prompt``, written to ``stream`` (e.g. stdout) as
    it is drawn; returns the generated text (without the prompt)."""
    _, model, tok = load_run(out_dir)
    ids: list[int] = []
    shown = [""]

    def show(w: int, _logits) -> None:  # pieces may join into one character: print what is complete
        ids.append(w)
        text = tok.decode(ids)
        if stream is not None and len(text) > len(shown[0]):
            stream.write(text[len(shown[0]):])
            stream.flush()
        shown[0] = text

    generate_ids(model, tok.encode(prompt), length, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, on_token=show)
    return tok.decode(ids)


__all__ = ["Config", "TASK", "LanguageModel", "Stream", "train", "evaluate", "predict",
           "load_run", "generate", "generate_ids", "filter_logits", "stream_nats"]
