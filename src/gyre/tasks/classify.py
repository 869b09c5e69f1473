"""Sequence classification: a recurrent classifier beside 1-NN DTW, majority class and, on request,
an FCN-style 1D-CNN and a Transformer encoder, all on the same split.

Follows the task contract in :mod:`gyre.tasks`. Data: :mod:`gyre.data.classification`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import cells
from ..data import classification as cdata
from ..nn import Recurrent
from ..nn.conv import ConvFrontEnd, conv_lengths, pool_frames
from ..nn.heads import HEADS, SequencePool, head_parts, pool, valid_mask
from ..train import CHECKPOINT, Trainer, load_checkpoint, seed_everything
from . import base

TASK = "classify"
#: published test accuracy (../shared/DATA.md): FCN / ResNet, Fawaz et al. 2019 (mean of 10
#: runs); 1-NN DTW = 1 - error from the UCR 2018 summary (full window)
PUBLISHED = {
    "gunpoint": {"fcn": 1.0, "resnet": 0.991, "1nn_dtw": 0.907},
    "italy_power_demand": {"fcn": 0.961, "resnet": 0.963, "1nn_dtw": 0.950},
    "arrow_head": {"fcn": 0.843, "resnet": 0.845, "1nn_dtw": 0.703},
    "osuleaf": {"fcn": 0.977, "resnet": 0.979, "1nn_dtw": 0.591},
    "acsf1": {"1nn_dtw": 0.64},
    "japanese_vowels": {"fcn": 0.99, "resnet": 0.99},
}
EXTRA_BASELINES = ("cnn", "transformer")
#: ``--model`` choices: the recurrent classifier over frames of the raw series, and the
#: convolution-recurrent hybrid (a convolutional front-end feeding the recurrent stack)
MODELS = ("rnn", "conv-rnn")
#: ``--front`` choices (``conv-rnn``): name -> (per-block width factor of ``conv_channels``,
#: kernels, dilations). ``fcn``: kernels 8, 5, 3 (LSTM-FCN); ``multiscale``: the first block
#: three parallel kernels 9, 19, 39 (InceptionTime's sizes, odd so "same" padding is
#: symmetric), each half as wide, so its receptive field spans 39 front-end steps instead of
#: 8; ``multiscale-dilated``: that, and the second and third blocks dilated 2 and 4.
FRONTS = {"fcn": ((1, 1, 1), (8, 5, 3), (1, 1, 1)),
          "multiscale": ((0.5, 1, 1), ((9, 19, 39), 5, 3), (1, 1, 1)),
          "multiscale-dilated": ((0.5, 1, 1), ((9, 19, 39), 5, 3), (1, 2, 4))}


@dataclass
class SequenceModelConfig(base.TaskConfig):
    """The model and training recipe every sequence-to-one task (classify, regress) shares.
    Beyond :class:`gyre.tasks.base.TaskConfig`:

    The defaults are one recipe for every dataset, chosen on held-out parts of the training
    splits, never on a test split (RESULTS.md says how): a bidirectional LSTM (over frames of
    about 1/16 of the median sequence for ``rnn``), last-state and mean-pooled features,
    forget-gate bias 1, Adam with a one-cycle learning rate (warm-up to ``lr``, then cosine
    decay) on the whole training split (``val_fraction=0``), keeping the final weights; each
    task's ``Config`` sets its model and length of training. With ``val_fraction > 0`` that
    share is held out and the epoch with the lowest validation loss is restored.

    Attributes:
        model: ``rnn`` (the recurrent stack over frames of the raw series) or ``conv-rnn``
            (convolutional front-end, ``conv_channels`` wide, three blocks of kernels 8, 5,
            3, whose feature maps, averaged over windows of ``frame`` steps, feed the
            recurrent stack; LSTM-FCN style).
        head: how the sequence becomes one vector: ``mean`` (masked mean of every step's
            output), ``last`` (the forward direction's output at the last valid step, the
            reverse direction's at the first), ``max`` (masked max), or several joined by
            ``+`` (their features concatenated; default ``last+mean``).
        head_dropout: dropout before the linear output layer.
        frame: feed the recurrence ``frame`` consecutive steps at a time (``rnn``: a ``(T, C)``
            sequence becomes ``ceil(T / frame)`` steps of ``frame * C`` values, the last frame
            zero-padded; ``conv-rnn``: the mean of ``frame`` consecutive front-end steps).
            ``1`` = every step on its own; ``0`` (default) = automatic, ``ceil(median
            training length / steps)`` (after the front-end's stride), so the recurrence runs
            about ``steps`` steps. The frame used is stored with the run.
        steps: the recurrence's target number of steps when ``frame`` is automatic.
        forget_bias: initial forget-gate bias of LSTM-family cells (``lstm``, ``peephole``,
            ``ln_lstm``, ``minlstm``; Gers et al. 2000, Jozefowicz et al. 2015); other cells
            keep their own initialisation.
        conv_channels: width of each front-end block (``conv-rnn``).
        conv_stride: stride of the first front-end block (``conv-rnn``); 0 = automatic,
            ``ceil(median training length / conv_steps)``, so the convolutions run on at most
            about ``conv_steps`` steps.
        conv_steps: the front-end's target number of steps when ``conv_stride`` is automatic.
        front: the front-end's blocks (``conv-rnn``), one of :data:`FRONTS`: ``fcn`` (kernels
            8, 5, 3), ``multiscale`` (first block parallel kernels 9, 19, 39, each
            ``conv_channels / 2`` wide) or ``multiscale-dilated`` (and dilations 1, 2, 4).
        fuse: (``conv-rnn``) the masked mean of the front-end's feature maps joins the pooled
            recurrent features before the linear layer.
        ensemble: train this many copies of the model (each its own initialisation, the
            same batches, each by its own loss) and predict with their average (of class
            probabilities for classify, of outputs for regress).
        crop: training-time augmentation: each training series is replaced, every time it is
            drawn, by a random window of ``ceil(crop * length)`` consecutive steps (window
            slicing, Le Guennec et al. 2016); 0 = off. Prediction reads the whole series.
        jitter: training-time augmentation: Gaussian noise of this standard deviation (in
            standardised units) added to every step; 0 = off.
        scale: training-time augmentation: each training series (each channel) multiplied by
            ``1 + N(0, scale^2)``, drawn every time it is drawn; 0 = off.
        log_input: map every input value to ``sign(x) * log(1 + |x|)`` before standardising
            (for heavy-tailed inputs: counts, volumes); stored with the run's scaler.
        minirocket: also run aeon's MiniRocket as a baseline (multivariate form for several
            channels; series zero-padded to the longest).

    ``scheduler="onecycle"`` steps the rate every optimizer step (``OneCycleLR``, peak ``lr``);
    the other schedulers step once per epoch.
    """

    cell: str = "lstm"
    hidden: int = 64
    bidirectional: bool = True
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-2
    scheduler: str = "onecycle"
    val_fraction: float = 0.0
    model: str = "rnn"
    head: str = "last+mean"
    head_dropout: float = 0.2
    frame: int = 0
    steps: int = 16
    forget_bias: float = 1.0
    conv_channels: int = 64
    conv_stride: int = 0
    conv_steps: int = 512
    front: str = "fcn"
    fuse: bool = True
    ensemble: int = 1
    crop: float = 0.0
    jitter: float = 0.0
    scale: float = 0.0
    log_input: bool = False
    minirocket: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        head_parts(self.head)
        if self.model not in MODELS:
            raise ValueError(f"model: got {self.model!r}, expected one of {', '.join(MODELS)}")
        if self.front not in FRONTS:
            raise ValueError(f"front: got {self.front!r}, expected one of {', '.join(FRONTS)}")
        for name in ("steps", "conv_channels", "conv_steps", "ensemble"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= 1")
        if self.conv_stride < 0:
            raise ValueError(f"conv_stride: got {self.conv_stride}, expected an int >= 1, or 0 "
                             "for automatic")
        if self.frame < 0:
            raise ValueError(f"frame: got {self.frame}, expected an int >= 1, or 0 for automatic")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout: got {self.head_dropout}, expected a number in [0, 1)")
        if self.crop != 0 and not 0 < self.crop <= 1:
            raise ValueError(f"crop: got {self.crop}, expected a fraction in (0, 1], or 0 for off")
        for name in ("jitter", "scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected a number >= 0 "
                                 "(0 = off)")


@dataclass
class Config(SequenceModelConfig):
    """Classification run: the fields of :class:`SequenceModelConfig`, and

    The default recipe, chosen by stratified cross-validation on the training splits (RESULTS.md,
    "Issue 15"), is ``model="conv-rnn"`` with the front-end on at most about 128 steps
    (``conv_steps=128``) and 200 epochs; the other fields keep :class:`SequenceModelConfig`'s
    values.

    Attributes:
        baselines: extra trained baselines, any of ``cnn`` (FCN, Wang et al. 2017) and
            ``transformer`` (``torch.nn.TransformerEncoder``); majority class always runs.
        dtw: also run 1-NN DTW (aeon); quadratic in length, slow on long series.
        label_smoothing: cross-entropy against targets smoothed by this share spread over
            every class (``torch.nn.functional.cross_entropy``'s ``label_smoothing``).
    """

    data: str = "japanese_vowels"
    model: str = "conv-rnn"
    epochs: int = 200
    conv_steps: int = 128
    baselines: list[str] = field(default_factory=list)
    dtw: bool = True
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing: got {self.label_smoothing}, expected a number "
                             "in [0, 1)")
        bad = [b for b in self.baselines if b not in EXTRA_BASELINES]
        if bad:
            raise ValueError(f"baselines: got {bad}, expected any of {', '.join(EXTRA_BASELINES)} "
                             "(majority class and 1-NN DTW always run; dtw=false skips DTW)")


# -- models -------------------------------------------------------------------------------------
def to_frames(x: Tensor, lengths: Tensor | None, k: int) -> tuple[Tensor, Tensor | None]:
    """``(B, T, C)`` -> ``(B, ceil(T/k), k*C)``: each step of the result holds ``k`` consecutive
    steps (zero-padded at the end), and ``lengths`` become ``ceil(lengths / k)``."""
    if k == 1:
        return x, lengths
    B, T, C = x.shape
    # ceilings as (v + k - 1) // k: ONNX's integer Div truncates, so -(-v // k) would not trace;
    # padded even by 0 steps: no branch on the length, so an ONNX trace keeps T dynamic
    n = (T + k - 1) // k
    x = torch.nn.functional.pad(x, (0, 0, 0, n * k - T))
    x = x.reshape(B, n, k * C)
    return x, None if lengths is None else (lengths + k - 1) // k


def set_forget_bias(rnn: Recurrent, value: float) -> bool:
    """Set the forget-gate bias of an LSTM-family layer to ``value`` (in ``bias_ih``; the
    ``bias_hh`` share, where there is one, to 0). Returns False for cells without a forget gate."""
    H = rnn.hidden_size
    if isinstance(rnn.cell, cells.LSTM):
        gate = slice(H, 2 * H)  # i, f, g, o
    elif isinstance(rnn.cell, cells.MinLSTM):
        gate = slice(0, H)  # f, i, h~
    else:
        return False
    with torch.no_grad():
        for name, prm in rnn.named_parameters():
            if name.startswith("bias_ih"):
                prm[gate] = value
            elif name.startswith("bias_hh"):
                prm[gate] = 0.0
    return True


class RecurrentClassifier(nn.Module):
    """``gyre.nn.Recurrent`` of any cell, a pooling head and a linear layer to class logits.

    ``head`` is ``mean``, ``last`` or ``max`` or several joined by ``+`` (their features
    concatenated). ``frame=k`` feeds the recurrence ``k`` consecutive steps at a time (a
    ``(T, C)`` sequence becomes ``(ceil(T/k), k*C)``). ``forget_bias`` (LSTM-family cells
    only; None keeps the cell's own initialisation) sets the forget-gate bias.

    ``forward(x (B, T, C), state=None, *, lengths=None) -> (logits (B, K), h_n)``."""

    def __init__(self, cell: str, n_channels: int, n_classes: int, hidden: int = 64,
                 layers: int = 1, bidirectional: bool = True, dropout: float = 0.0,
                 head: str = "last+mean", head_dropout: float = 0.0, *, frame: int = 1,
                 forget_bias: float | None = 1.0) -> None:
        super().__init__()
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 1:
            raise ValueError(f"frame: got {frame!r}, expected an int >= 1")
        self.pool = SequencePool(head, 2 if bidirectional else 1)
        self.parts = self.pool.parts
        self.frame = frame
        self.rnn = Recurrent(cell, n_channels * frame, hidden, layers, batch_first=True,
                             dropout=dropout, bidirectional=bidirectional)
        if forget_bias is not None:
            set_forget_bias(self.rnn, forget_bias)
        self.head = head
        self.dirs = 2 if bidirectional else 1
        self.drop = nn.Dropout(head_dropout)
        self.fc = nn.Linear(len(self.parts) * self.dirs * self.rnn.output_size, n_classes)

    def forward(self, x: Tensor, state=None, *, lengths: Tensor | None = None):
        xr, n = self.export_pre(x, lengths)
        out, h_n = self.rnn(xr, state, lengths=n)  # (B, T', D*O)
        return self.export_head(out, x, lengths), h_n

    # the export hook (gyre.export.onnx): forward is export_head(rnn(export_pre(...)))
    def export_pre(self, x: Tensor, lengths: Tensor | None):
        """The recurrence's input: ``(frames (B, ceil(T/k), k*C), their lengths)``."""
        return to_frames(x, lengths, self.frame)

    def export_head(self, out: Tensor, x: Tensor, lengths: Tensor | None) -> Tensor:
        """Class logits ``(B, K)`` from the recurrence's output ``(B, T', D*O)``."""
        n = None if lengths is None else (lengths + self.frame - 1) // self.frame
        return self.fc(self.drop(self.pool(out, n)))

    @property
    def stream_window(self) -> int | None:
        """Steps of recurrent output the head reads for its output at the latest step (the
        last step only for the ``last`` head, every step so far for mean/max pooling)."""
        return 1 if self.parts == ["last"] else None

    def stream_unsupported(self) -> str | None:
        """Why this model cannot be served step by step (None: it can)."""
        if self.frame > 1:
            return (f"frame={self.frame}: the recurrence reads {self.frame} steps at a time; "
                    "serving steps one by one needs a run trained with frame=1")
        return None


class ConvRecurrentClassifier(nn.Module):
    """Convolution-recurrent hybrid (LSTM-FCN / ConvLSTM style): a :class:`ConvFrontEnd`
    (Conv1d - batch norm - ReLU blocks, first-block stride ``stride``) whose feature maps,
    averaged over windows of ``frame`` steps, feed a ``gyre.nn.Recurrent`` of any cell; the
    pooled recurrent features (``head``), joined with ``fuse`` by the masked mean of the feature
    maps, go through dropout to a linear layer. Padding never changes a sequence's logits.

    ``forward(x (B, T, C), state=None, *, lengths=None) -> (logits (B, K), h_n)``."""

    def __init__(self, cell: str, n_channels: int, n_classes: int, hidden: int = 64,
                 layers: int = 1, bidirectional: bool = True, dropout: float = 0.0,
                 head: str = "last+mean", head_dropout: float = 0.0, *, channels: int = 64,
                 stride: int = 1, frame: int = 1, fuse: bool = True,
                 forget_bias: float | None = 1.0, front: str = "fcn") -> None:
        super().__init__()
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 1:
            raise ValueError(f"frame: got {frame!r}, expected an int >= 1")
        if front not in FRONTS:
            raise ValueError(f"front: got {front!r}, expected one of {', '.join(FRONTS)}")
        widths, kernels, dilations = FRONTS[front]
        self.front = ConvFrontEnd(n_channels, [max(1, round(w * channels)) for w in widths],
                                  kernels, stride=stride, dilations=dilations)
        self.export_features = n_channels  # x's columns, for gyre.export.onnx
        self.frame = frame
        self.fuse = fuse
        self.dirs = 2 if bidirectional else 1
        self.pool = SequencePool(head, self.dirs)
        self.parts = self.pool.parts
        self.rnn = Recurrent(cell, self.front.out_channels, hidden, layers, batch_first=True,
                             dropout=dropout, bidirectional=bidirectional)
        if forget_bias is not None:
            set_forget_bias(self.rnn, forget_bias)
        self.drop = nn.Dropout(head_dropout)
        width = self.pool.features(self.dirs * self.rnn.output_size)
        self.fc = nn.Linear(width + (self.front.out_channels if fuse else 0), n_classes)

    def forward(self, x: Tensor, state=None, *, lengths: Tensor | None = None):
        h, hlen = self.front(x, lengths)  # (B, ceil(T/stride), F)
        z, zlen = pool_frames(h, hlen, self.frame)
        out, h_n = self.rnn(z, state, lengths=zlen)
        return self._head(out, h, hlen), h_n

    def _head(self, out: Tensor, h: Tensor, hlen: Tensor | None) -> Tensor:
        feats = self.pool(out, conv_lengths(hlen, self.frame))
        if self.fuse:
            feats = torch.cat([feats, pool(h, hlen, "mean")], dim=1)
        return self.fc(self.drop(feats))

    # the export hook (gyre.export.onnx): forward is export_head(rnn(export_pre(...)))
    def export_pre(self, x: Tensor, lengths: Tensor | None):
        """The recurrence's input: the front-end's feature maps averaged over frames, and
        their lengths."""
        return pool_frames(*self.front(x, lengths), self.frame)

    def export_head(self, out: Tensor, x: Tensor, lengths: Tensor | None) -> Tensor:
        """Class logits from the recurrence's output; the front-end runs again for the fused
        mean of its feature maps (the hook hands the head only the input)."""
        h, hlen = self.front(x, lengths) if self.fuse else (None, conv_lengths(
            lengths, self.front.stride))
        return self._head(out, h, hlen)

    stream_window = None

    def stream_unsupported(self) -> str | None:
        """Why this model cannot be served step by step (None: it can)."""
        return ("model=conv-rnn: the convolutional front-end reads a window of steps around "
                "each step; serving steps one by one needs a run with model=rnn and frame=1")


class Ensemble(nn.Module):
    """Members trained side by side: in training mode ``forward`` gives every member's output
    ``(B, n, K)`` (:func:`member_loss` scores each against the targets), in evaluation mode
    their average ``(B, K)``: of the class probabilities, as log-probabilities (``probs=True``;
    cross-entropy of those is the ensemble's negative log-likelihood), or of the outputs."""

    def __init__(self, members: list[nn.Module], probs: bool = True) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.probs = probs

    def forward(self, x: Tensor, state=None, *, lengths: Tensor | None = None):
        z = torch.stack([m(x, lengths=lengths)[0] for m in self.members], 1)
        if self.training:
            return z, None
        if self.probs:
            return torch.logsumexp(torch.log_softmax(z, -1), 1) - math.log(z.shape[1]), None
        return z.mean(1), None

    def export_unsupported(self) -> str:
        return f"ensemble={len(self.members)}: export needs a single model (ensemble=1)"

    def stream_unsupported(self) -> str:
        return self.export_unsupported().replace("export", "serving step by step")


def member_loss(loss):
    """``loss(out, y)`` that scores an :class:`Ensemble`'s ``(B, n, K)`` training output as the
    mean of its members' losses."""
    def f(out: Tensor, y: Tensor) -> Tensor:
        if out.dim() == 3:
            return loss(out.reshape(-1, out.shape[2]), y.repeat_interleave(out.shape[1]))
        return loss(out, y)
    return f


class FCN(nn.Module):
    """Fully convolutional baseline (Wang, Yan & Oates 2017): three Conv1d-BatchNorm-ReLU blocks
    (128x8, 256x5, 128x3, 'same' padding), global average pooling over valid steps, linear."""

    def __init__(self, n_channels: int, n_classes: int) -> None:
        super().__init__()
        blocks = []
        for c_in, c_out, k in ((n_channels, 128, 8), (128, 256, 5), (256, 128, 3)):
            blocks += [nn.Conv1d(c_in, c_out, k, padding="same"), nn.BatchNorm1d(c_out), nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(128, n_classes)

    def forward(self, x: Tensor, state=None, *, lengths: Tensor | None = None):
        h = self.body(x.transpose(1, 2)).transpose(1, 2)  # (B, T, 128)
        return self.fc(pool(h, lengths, "mean")), None


class TransformerClassifier(nn.Module):
    """``torch.nn.TransformerEncoder`` baseline: linear embedding, sinusoidal positions, padding
    mask from ``lengths``, masked mean pooling, linear."""

    def __init__(self, n_channels: int, n_classes: int, d_model: int = 64, heads: int = 4,
                 layers: int = 2, dropout: float = 0.1, max_len: int = 4096) -> None:
        super().__init__()
        self.embed = nn.Linear(n_channels, d_model)
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor, state=None, *, lengths: Tensor | None = None):
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError(f"x: {x.shape[1]} steps, the transformer baseline takes at most "
                             f"{self.pe.shape[0]}")
        h = self.embed(x) + self.pe[: x.shape[1]]
        mask = valid_mask(x, lengths)
        pad = None if mask is None else ~mask.squeeze(-1)
        h = self.encoder(h, src_key_padding_mask=pad)
        return self.fc(pool(h, lengths, "mean")), None


def build_model(config: SequenceModelConfig, n_channels: int, n_classes: int, frame: int | None = None,
                stride: int | None = None) -> nn.Module:
    """The model ``config.model`` describes with ``n_classes`` outputs (``frame``, ``stride``:
    the resolved values when ``config.frame`` / ``config.conv_stride`` are 0, automatic)."""
    if config.ensemble > 1:
        one = dataclasses.replace(config, ensemble=1)
        return Ensemble([build_model(one, n_channels, n_classes, frame, stride)
                         for _ in range(config.ensemble)], probs=n_classes > 1)
    frame = frame or config.frame or 1
    if config.model == "conv-rnn":
        return ConvRecurrentClassifier(
            config.cell, n_channels, n_classes, config.hidden, config.layers,
            config.bidirectional, config.dropout, config.head, config.head_dropout,
            channels=config.conv_channels, stride=stride or config.conv_stride or 1,
            frame=frame, fuse=config.fuse, forget_bias=config.forget_bias, front=config.front)
    return RecurrentClassifier(config.cell, n_channels, n_classes, config.hidden, config.layers,
                               config.bidirectional, config.dropout, config.head,
                               config.head_dropout, frame=frame,
                               forget_bias=config.forget_bias)


#: the recurrence's default target number of steps when ``frame`` is automatic (``frame=0``)
FRAME_STEPS = 16


def auto_frame(X: list[np.ndarray], steps: int = FRAME_STEPS, stride: int = 1) -> int:
    """The frame length that gives the median training sequence (after a front-end of stride
    ``stride``) about ``steps`` recurrent steps: ``ceil(median length / stride / steps)``, 1 for
    sequences of at most ``steps``."""
    n = math.ceil(float(np.median([len(x) for x in X])) / stride)
    return max(1, math.ceil(n / steps))


def resolve_shape(config: SequenceModelConfig, X: list[np.ndarray]) -> tuple[int, int]:
    """``(frame, stride)`` for training on ``X``: the configured values, or the automatic ones
    (``stride`` is 1 for ``model="rnn"``)."""
    stride = 1
    if config.model == "conv-rnn":
        med = float(np.median([len(x) for x in X]))
        stride = config.conv_stride or max(1, math.ceil(med / config.conv_steps))
    frame = config.frame or auto_frame(X, config.steps, stride)
    return frame, stride


def describe(config: SequenceModelConfig, frame: int | None = None, stride: int | None = None) -> str:
    k = frame or config.frame
    rec = (f"{'bi' if config.bidirectional else ''}{config.cell} {config.layers}x{config.hidden} "
           f"({config.head} head{f', frame {k}' if k and k > 1 else ''}")
    if config.model == "conv-rnn":
        s = stride or config.conv_stride or 1
        kind = "" if config.front == "fcn" else f" {config.front}"
        rec = (f"conv{config.conv_channels}x3{f'/{s}' if s > 1 else ''}{kind} + {rec}"
               f"{', fused' if config.fuse else ''}")
    return rec + (f", ensemble of {config.ensemble})" if config.ensemble > 1 else ")")


# -- metrics --------------------------------------------------------------------------------------
def accuracy(logits: Tensor, y: Tensor) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(-1) == y).float().mean())}


def _scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score
    return {"accuracy": float(np.mean(pred == y)),
            "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0))}


# -- running ----------------------------------------------------------------------------------------
class Augmented(torch.utils.data.Dataset):
    """A training dataset whose series are drawn afresh every time: a random window of
    ``ceil(crop * length)`` steps (``crop`` 0 or 1: the whole series), each channel scaled by
    ``1 + N(0, scale^2)``, Gaussian noise of standard deviation ``jitter`` added (torch's
    global generator, which the Trainer seeds). Targets are unchanged."""

    def __init__(self, data, crop: float = 0.0, jitter: float = 0.0, scale: float = 0.0) -> None:
        self.data, self.crop, self.jitter, self.scale = data, crop, jitter, scale

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        if 0 < self.crop < 1:
            n = math.ceil(self.crop * x.shape[0])
            start = int(torch.randint(x.shape[0] - n + 1, ()))
            x = x[start:start + n]
        if self.scale:
            x = x * (1 + self.scale * torch.randn(1, x.shape[1]))
        if self.jitter:
            x = x + self.jitter * torch.randn_like(x)
        return x, y


def _prepare(config: SequenceModelConfig, data, target=None, dtype=np.int64):
    """``(train, val, test datasets, input scaler)``: ``val_fraction`` of the training split
    held out, inputs standardised on the rest, targets mapped by ``target`` (None: as they
    are) and stored as ``dtype``."""
    tr, va = cdata.validation_split(data.y_train, config.val_fraction, config.seed)
    X_fit = [data.X_train[i] for i in tr]
    scaler = cdata.Standardizer.fit(X_fit, config.log_input)
    t = target or (lambda y: y)
    ds = lambda X, y: cdata.SequenceDataset(scaler(X), t(y), dtype)  # noqa: E731
    train = ds(X_fit, data.y_train[tr])
    if (0 < config.crop < 1) or config.jitter or config.scale:
        train = Augmented(train, config.crop, config.jitter, config.scale)
    return (train, ds([data.X_train[i] for i in va], data.y_train[va]),
            ds(data.X_test, data.y_test), scaler)


def _fit(model: nn.Module, config: SequenceModelConfig, out: Path, train, val, extra,
         resume: bool, progress: bool | None = None, loss=nn.functional.cross_entropy,
         metrics=accuracy, callback=None, distributed: bool | None = None
         ) -> tuple[Trainer, dict]:
    tc = config.train_config(progress=config.progress if progress is None else progress)
    trainer = Trainer(model, member_loss(loss), tc, collate=cdata.collate, metrics=metrics,
                      out_dir=out,
                      extra=extra, callback=callback, distributed=distributed)
    result = trainer.fit(train, val if len(val) else None, resume=resume)
    return trainer, result


def fit_beside(beside, model: nn.Module, config: SequenceModelConfig, out: Path, train, val,
               extra: dict, resume: bool, **kw) -> tuple:
    """:func:`_fit` (writing config.toml at the start) while the baselines ``beside`` run:
    ``(trainer, result, seconds of training, early)``, ``early`` being what ``train`` returns
    on a distributed run's other processes or after an interrupt (None otherwise); the
    baselines are cancelled when this process will not score them."""
    start = time.perf_counter()
    try:
        trainer, result = _fit(model, config, out, train, val, extra, resume,
                               callback=base.config_writer(config, out), **kw)
    except BaseException:
        beside.cancel()
        raise
    seconds = time.perf_counter() - start
    early = base.early_exit(out, result)
    if early is not None:
        beside.cancel()
    return trainer, result, seconds, early


def train(config: Config, *, resume: bool = False,
          data: cdata.ClassificationData | None = None) -> dict:
    """Train, evaluate beside the baselines, write config.toml, checkpoint, metrics.json and
    plots into ``config.out``; returns the metrics (see :mod:`gyre.tasks`). ``data``: train and
    score on these splits instead of loading ``config.data`` (cross-validation folds)."""
    if not isinstance(config, Config):
        raise TypeError(f"config: got {type(config).__name__}, expected gyre.tasks.classify.Config")
    # the data first: a bad --data must not leave a run directory behind
    if data is None:
        data = cdata.load(config.data, seed=config.seed)
    if resume:
        base.check_resume(config, config.out)
    out = base.resolve_out(config, TASK)
    train_ds, val_ds, test_ds, scaler = _prepare(config, data)
    jobs = {}
    if config.dtw:
        jobs["1nn_dtw"] = (dtw_baseline, (data,))
    if config.minirocket:
        jobs["minirocket"] = (minirocket_baseline, (data, config.seed))
    beside = run_beside(jobs)
    seed_everything(config.seed)
    k, stride = resolve_shape(config, data.X_train)
    model = build_model(config, data.n_channels, len(data.classes), frame=k, stride=stride)
    extra = {"classes": list(data.classes), "n_channels": data.n_channels,
             "scaler": scaler.state(), "frame": k, "stride": stride}
    loss = nn.functional.cross_entropy
    if config.label_smoothing:
        loss = functools.partial(loss, label_smoothing=config.label_smoothing)
    trainer, result, seconds, early = fit_beside(beside, model, config, out, train_ds, val_ds,
                                                 extra, resume, loss=loss)
    if early is not None:
        return early
    logits, y = trainer.predict(test_ds)
    pred = logits.argmax(-1).numpy()
    test = _scores(pred, y.numpy())
    name = describe(config, k, stride)
    base.plot_history(result["history"], out / "loss.png", f"{name} on {data.name}")
    plot_confusion(y.numpy(), pred, data.classes, out / "confusion.png",
                   f"{name}: accuracy {test['accuracy']:.3f}")

    baselines = {"majority": _scores(np.full_like(data.y_test, np.bincount(data.y_train).argmax()),
                                     data.y_test)}
    baselines.update(beside())
    for name in config.baselines:
        seed_everything(config.seed)
        net = (FCN(data.n_channels, len(data.classes)) if name == "cnn"
               else TransformerClassifier(data.n_channels, len(data.classes)))
        bt, bres = _fit(net, config, out / "baselines" / name, train_ds, val_ds, extra,
                        resume=resume and (out / "baselines" / name / CHECKPOINT).is_file(),
                        distributed=False)  # on rank 0 alone: the other ranks are done
        if bres["interrupted"]:
            return {"interrupted": True, "out": str(out)}
        blog, by = bt.predict(test_ds)
        baselines[name] = _scores(blog.argmax(-1).numpy(), by.numpy())
    metrics = {
        "task": TASK, "data": data.name, "out": str(out), "model": name,
        "test": test, "baselines": baselines,
        "train": train_summary(result, seconds, model, (train_ds, val_ds, test_ds), k, stride),
        "classes": list(data.classes),
    }
    if data.name in PUBLISHED:
        metrics["published"] = {f"{k} accuracy": v for k, v in PUBLISHED[data.name].items()}
    base.write_json(metrics, out / "metrics.json")
    return metrics


def train_summary(result: dict, seconds: float, model: nn.Module, splits, frame: int,
                  stride: int) -> dict:
    """metrics.json's ``train`` entry: the Trainer's ``result`` of a fit that took ``seconds``,
    the sizes of the ``(train, val, test)`` datasets, the resolved frame and stride."""
    history = result["history"]
    n_train, n_val, n_test = map(len, splits)
    return {"epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
            "stopped_early": result["stopped_early"], "seconds": round(seconds, 2),
            "n_train": n_train, "n_val": n_val, "n_test": n_test, "frame": frame,
            "stride": stride,
            "final_train_loss": history[-1].get("train_loss") if history else None,
            "parameters": sum(p.numel() for p in model.parameters())}


class _Beside:
    """Jobs running in a worker process: call to wait for ``{name: result}``; ``cancel()``
    drops what has not started and lets the worker go."""

    def __init__(self, jobs: dict) -> None:
        self.pool = None
        self.threads = 0  # torch's threads to restore when the worker is done (0: unchanged)
        self.futures: dict = {}
        self.jobs = jobs
        from ..train import distributed
        if jobs and distributed.is_main() and os.environ.get("RANK", "0") == "0":
            import concurrent.futures
            import multiprocessing
            # spawn, not fork: a forked copy of a process that has started torch's and
            # numba's threads can deadlock
            self.pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"))
            self.futures = {k: self.pool.submit(fn, *args) for k, (fn, args) in jobs.items()}
            self.jobs = {}
            # the worker takes a core: training threads that count it too wait on it (RESULTS.md,
            # "Issue 15, fourth day"), so at most cores - 1 of them until its results are in
            cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 1)
            if cores > 1 and torch.get_num_threads() >= cores:
                self.threads = torch.get_num_threads()
                torch.set_num_threads(cores - 1)

    def __call__(self) -> dict:
        try:
            done = {k: f.result() for k, f in self.futures.items()}
        finally:
            self.cancel()
        return done | {k: fn(*args) for k, (fn, args) in self.jobs.items()}

    def cancel(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self.threads:
            torch.set_num_threads(self.threads)
            self.threads = 0


def run_beside(jobs: dict) -> _Beside:
    """Start ``jobs`` (name -> ``(function, args)``, picklable) in one spawned worker process,
    so the baselines run on another core while this process trains; calling the result waits
    for them. On the other processes of a distributed run they are left to the caller's
    rank 0 (nothing starts; calling runs them in this process)."""
    return _Beside(jobs)


def dtw_baseline(data: cdata.ClassificationData) -> dict[str, float]:
    """1-NN with full-window DTW (aeon's ``dtw``: squared differences summed over channels, no
    window), on the series as the archive gives them; :func:`nn_dtw_predict` computes it."""
    to_aeon = lambda X: [np.ascontiguousarray(x.T, np.float64) for x in X]  # noqa: E731
    pred = nn_dtw_predict(to_aeon(data.X_train), to_aeon(data.X_test))
    return _scores(np.asarray(data.y_train)[pred].astype(np.int64), data.y_test)


def nn_dtw_predict(train: list[np.ndarray], test: list[np.ndarray]) -> np.ndarray:
    """Index of each ``test`` series' nearest ``train`` series by full-window DTW (series
    ``(C, T_i)`` float64, lengths may differ); ties go to the first. Exact 1-NN with early
    abandoning: a distance is dropped as soon as every cell of a row of its cost matrix exceeds
    the nearest so far (every warping path crosses every row, and costs only grow), which
    leaves the nearest neighbour unchanged and skips most of the quadratic work."""
    kernel = _dtw_kernel()
    out = np.empty(len(test), np.int64)
    for i, q in enumerate(test):
        best, arg = np.inf, 0
        for j, r in enumerate(train):
            d = kernel(q, r, best)
            if d < best:
                best, arg = d, j
        out[i] = arg
    return out


@functools.cache
def _dtw_kernel():
    """The compiled DTW of two ``(C, n)``, ``(C, m)`` series, ``inf`` once it must exceed
    ``bound`` (numba, compiled on first use)."""
    import numba

    @numba.njit(cache=False, fastmath=False)
    def dtw(a, b, bound):
        n, m, channels = a.shape[1], b.shape[1], a.shape[0]
        prev = np.full(m + 1, np.inf)
        cur = np.full(m + 1, np.inf)
        prev[0] = 0.0
        for i in range(1, n + 1):
            cur[0] = np.inf
            low = np.inf
            for j in range(1, m + 1):
                d = 0.0
                for c in range(channels):
                    t = a[c, i - 1] - b[c, j - 1]
                    d += t * t
                v = min(prev[j - 1], prev[j], cur[j - 1]) + d
                cur[j] = v
                low = min(low, v)
            if low > bound:
                return np.inf
            prev, cur = cur, prev
        return prev[m]

    return dtw


def to_aeon_array(X: list[np.ndarray], min_length: int = 9) -> np.ndarray:
    """``(n, C, T_max)`` float64 for aeon's equal-length estimators, shorter series zero-padded
    at the end (and every series to at least ``min_length``, MiniRocket's shortest)."""
    T = max(min_length, max(len(x) for x in X))
    out = np.zeros((len(X), X[0].shape[1], T))
    for i, x in enumerate(X):
        out[i, :, :len(x)] = x.T
    return out


def minirocket_baseline(data: cdata.ClassificationData, seed: int = 0) -> dict[str, float]:
    """aeon's MiniRocket (Dempster et al. 2021; the multivariate form for several channels):
    random convolution features, ridge classifier; series zero-padded to the longest. aeon's
    numba kernels are compiled once and cached on disk (about 17 s the first time)."""
    from aeon.classification.convolution_based import MiniRocketClassifier
    T = max(len(x) for x in data.X_train + data.X_test)
    clf = MiniRocketClassifier(random_state=seed, n_jobs=1)
    clf.fit(to_aeon_array(data.X_train, max(9, T)), data.y_train)
    pred = np.asarray(clf.predict(to_aeon_array(data.X_test, max(9, T))))
    return _scores(pred.astype(np.int64), data.y_test)


def plot_confusion(y: np.ndarray, pred: np.ndarray, classes: list[str], path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix
    plt = base.pyplot()
    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- reloading ------------------------------------------------------------------------------------
def restore(out_dir, config_cls: type, task: str, n_outputs) -> tuple:
    """``(config, model in eval mode with the run's weights, checkpoint extra)`` of a run of
    ``task`` whose model :func:`build_model` makes with ``n_outputs(extra)`` outputs (the
    best epoch's weights where the run kept them, else the final ones)."""
    out = Path(out_dir)
    if not (out / "config.toml").is_file():
        raise FileNotFoundError(f"out_dir: {str(out)!r} has no config.toml; expected a directory "
                                f"written by gyre train {task}")
    config = base.load_config(config_cls, out / "config.toml")
    ckpt = load_checkpoint(out / CHECKPOINT)
    extra = ckpt["extra"]
    model = build_model(config, extra["n_channels"], n_outputs(extra), extra.get("frame"),
                        extra.get("stride"))
    best = ckpt["best"]["model"]
    use_best = best is not None and ckpt["config"].get("restore_best", True)
    model.load_state_dict(best if use_best else ckpt["model"])
    model.eval()
    return config, model, extra


def load_run(out_dir) -> tuple[Config, nn.Module, dict]:
    """``(config, model with the final weights, checkpoint extra)`` from a run directory."""
    return restore(out_dir, Config, TASK, lambda extra: len(extra["classes"]))


def build_like(config: SequenceModelConfig, extra: dict, n_outputs: int | None = None
               ) -> nn.Module:
    """The model of a run with checkpoint ``extra`` as ``config`` describes it (e.g. a smaller
    ``hidden`` for structured pruning), untrained; ``n_outputs`` default: one per class."""
    return build_model(config, extra["n_channels"],
                       len(extra["classes"]) if n_outputs is None else n_outputs,
                       extra.get("frame"), extra.get("stride"))


def finetune(model: nn.Module, config: Config, extra: dict) -> None:
    """Train ``model`` (e.g. a pruned one) for ``config.epochs`` on the run's training split
    into the new run directory ``config.out`` (config.toml and checkpoint, as gyre train
    writes them), keeping ``extra`` (scaler, classes, frame)."""
    data = cdata.load(config.data, seed=config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base.write_config(config, out / "config.toml")
    train_ds, val_ds, _, _ = _prepare(config, data)
    seed_everything(config.seed)
    _, result = _fit(model, config, out, train_ds, val_ds, extra, resume=False, progress=False)
    if result["interrupted"]:
        raise KeyboardInterrupt


def score_test(out_dir, run=None) -> tuple[dict, float]:
    """``(test scores, seconds of the model's forward over the test split)`` of a run; ``run``:
    what computes the forward instead of the run's model (e.g. an ``OnnxModel``)."""
    config, model, extra = load_run(out_dir)
    model = run or model
    ds = cdata.load(config.data, seed=config.seed)
    X = cdata.Standardizer.from_state(extra["scaler"])(ds.X_test)
    _logits(model, X)  # warm-up (a compiled kernel's first call)
    start = time.perf_counter()
    pred = _logits(model, X).argmax(-1).numpy()
    return _scores(pred, ds.y_test), time.perf_counter() - start


def stream_io(model: RecurrentClassifier, extra: dict):
    """``(input, output)`` transforms for serving a run step by step: the run's standardizer
    on each step's raw features, softmax of the logits (class probabilities, in the order of
    ``extra["classes"]``)."""
    mean, std = extra["scaler"]["mean"].float(), extra["scaler"]["std"].float()
    if extra["scaler"].get("log", False):
        return ((lambda x: (torch.sign(x) * torch.log1p(x.abs()) - mean) / std),
                (lambda logits: torch.softmax(logits, -1)))
    return (lambda x: (x - mean) / std), (lambda logits: torch.softmax(logits, -1))


@torch.no_grad()
def _logits(model: nn.Module, X: list[np.ndarray], batch_size: int = 128) -> Tensor:
    ds = cdata.SequenceDataset(X, np.zeros(len(X), np.int64))
    outs = []
    for s in range(0, len(ds), batch_size):
        batch = cdata.collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
        outs.append(model(batch["x"], lengths=batch.get("lengths"))[0])
    return torch.cat(outs)


def evaluate(out_dir, data: str | None = None) -> dict:
    """Test metrics of a trained run on its own test split, or on ``data``'s."""
    config, model, extra = load_run(out_dir)
    ds = cdata.load(data or config.data, seed=config.seed)
    classes = list(extra["classes"])
    if list(ds.classes) != classes:
        remap = {c: i for i, c in enumerate(classes)}
        missing = sorted(set(ds.classes) - set(classes))
        if missing:
            raise ValueError(f"data: labels {missing[:5]} were not among the trained classes "
                             f"{classes[:10]}")
        y = np.array([remap[ds.classes[i]] for i in ds.y_test])
    else:
        y = ds.y_test
    scaler = cdata.Standardizer.from_state(extra["scaler"])
    pred = _logits(model, scaler(ds.X_test)).argmax(-1).numpy()
    return {"test": _scores(pred, y), "data": ds.name, "n_test": len(y)}


def predict(out_dir, data_path: str, *, runtime: str = "torch") -> list[dict]:
    """Class and class probabilities for every sequence in ``data_path`` (CSV/NPZ as for
    training; labels and splits, when present, are ignored: every sequence is predicted).
    ``runtime="onnxruntime"`` runs the run's exported ``model.onnx`` (``gyre export``)."""
    _, model, extra = load_run(out_dir)
    if runtime != "torch":
        model = base.runtime_model(out_dir, runtime)
    X = cdata.read_sequences(data_path)
    scaler = cdata.Standardizer.from_state(extra["scaler"])
    probs = torch.softmax(_logits(model, scaler(X)), -1).numpy()
    classes = list(extra["classes"])
    rows = []
    for i, p in enumerate(probs):
        row = {"index": i, "label": classes[int(p.argmax())]}
        row.update({f"prob_{c}": round(float(v), 6) for c, v in zip(classes, p, strict=True)})
        rows.append(row)
    return rows


def explain_inputs(out_dir, data: str | None = None, samples: int = 8):
    """The explain seam (:mod:`gyre.explain`): the first ``samples`` test sequences of the run's
    data (or ``data``'s), scaled as in training, and the predicted class's logit to explain."""
    from ..explain import Inputs
    config, model, extra = load_run(out_dir)
    ds = cdata.load(data or config.data, seed=config.seed)
    scaler = cdata.Standardizer.from_state(extra["scaler"])
    X = scaler(ds.X_test[:samples])
    seqs = cdata.SequenceDataset(X, np.zeros(len(X), np.int64))
    batch = cdata.collate([seqs[i] for i in range(len(seqs))])
    x, lengths = batch["x"], batch.get("lengths")
    same = list(ds.classes) == list(extra["classes"])
    labels = torch.as_tensor(ds.y_test[:samples]) if same else None

    def forward(x, lengths):
        return model(x, lengths=lengths)[0]

    def predict(x, lengths):
        with torch.no_grad():
            return forward(x, lengths).argmax(-1)

    target = predict(x, lengths)
    channels = [f"channel {c}" for c in range(x.shape[2])]
    title = f"classify {ds.name}: {describe(config, extra.get('frame'))}"
    return Inputs(model, forward, x, lengths, title, channels, target=target, labels=labels, predict=predict,
                  meta={"explained": "logit of the predicted class", "data": ds.name})


__all__ = ["HEADS", "Config", "SequenceModelConfig", "TASK", "MODELS", "train", "evaluate", "predict",
           "RecurrentClassifier", "ConvRecurrentClassifier", "FCN", "TransformerClassifier",
           "build_model", "load_run", "dtw_baseline", "minirocket_baseline", "explain_inputs"]
