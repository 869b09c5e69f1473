"""``gyre explain``: which time steps and channels (or, for text, which tokens) a trained model's
output rests on, and what its recurrent state and gates do over time.

Attributions come from captum (``pip install 'gyre[explain]'``): Integrated Gradients, Kernel
SHAP, LIME and Occlusion, over every (step, channel) of the input series, for the output the
task names (classify: the predicted class's logit; forecast: the mean scaled forecast of the
first target column over the horizon; sentiment: the predicted class's log-odds, per token
through the embeddings, :mod:`gyre.explain.text`). The baseline, what a "removed" input becomes,
is 0 in the model's scaled input space: the training mean of every channel (text: the padding
token's zero embedding). State and gate maps are :func:`gyre.explain.states.record`.

Gradients are taken in eval mode (dropout off) on every backend; cuDNN refuses an RNN's
backward in eval mode, so attributions run with cuDNN switched off (torch's own CUDA kernels
then) and nothing changes on the CPU.

A task supports explain with ``explain_inputs(out_dir, data=None, samples=N) -> Inputs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import states

METHODS = ("ig", "shap", "lime", "occlusion")
#: at most this many features (groups of steps of one channel) for SHAP, LIME and Occlusion
MAX_FEATURES = 64


@dataclass
class Inputs:
    """What a task hands to explain: the model, the sequences, and the scalar to explain.

    ``forward(x (B, T, C), lengths (B,) | None) -> (B,) or (B, K)`` the explained output per
    sequence (with ``K`` outputs, ``target[i]`` says which one of sequence ``i``);
    ``x`` the scaled inputs, right-padded; ``lengths`` the valid steps (None: all);
    ``labels`` the true classes where known (classify: for the deletion curve), ``predict``
    ``(x, lengths) -> (B,)`` the predicted class for it; ``channels`` the channel names.

    Text (``tokens`` set, one list of token strings per sequence): ``x`` is the embedded
    tokens ``(B, T, E)`` and ``forward`` the model from its embedding layer on; every token is
    one feature (its ``E`` values perturbed together), the baseline the zero (padding)
    embedding, and a token's attribution the sum over its embedding dimensions.
    """

    model: nn.Module
    forward: object
    x: Tensor
    lengths: Tensor | None
    title: str
    channels: list[str]
    target: Tensor | None = None
    labels: Tensor | None = None
    predict: object = None
    meta: dict = field(default_factory=dict)
    tokens: list[list[str]] | None = None
    #: ``run()`` calls the model on its own inputs (for the state maps; default
    #: ``model(x, lengths=lengths)``)
    run: object = None


def _captum():
    try:
        import captum.attr as attr
    except ModuleNotFoundError:
        raise ValueError("explain: needs captum (pip install 'gyre[explain]')") from None
    return attr


def feature_mask(T: int, C: int, max_features: int = MAX_FEATURES) -> tuple[Tensor, int]:
    """``(1, T, C)`` int64 feature ids: channel ``c``'s steps in windows of ``w`` steps, ``w``
    the smallest that keeps ``C * ceil(T / w)`` at most ``max_features`` (one window of all
    steps per channel when there are more channels). Returns ``(mask, w)``."""
    w = math.ceil(T / max(1, max_features // C))
    mask = (torch.arange(T) // w)[:, None] * C + torch.arange(C)[None, :]
    return mask[None].long(), w


def token_mask(T: int, E: int) -> Tensor:
    """``(1, T, E)`` int64 feature ids: token ``t`` (all its embedding values) is feature ``t``."""
    return torch.arange(T)[None, :, None].expand(1, T, E).contiguous()


#: at most this many sequences x interpolation steps in one forward of Integrated Gradients
IG_ROWS = 2048


def _integrated_gradients(attr, inputs: Inputs, ig_steps: int) -> Tensor:
    """Integrated Gradients of every sequence, ``IG_ROWS // ig_steps`` sequences a batch (the
    model treats sequences independently, so batching changes nothing but speed)."""
    x, lengths = inputs.x, inputs.lengths
    group = max(1, IG_ROWS // ig_steps)
    ig = attr.IntegratedGradients(_Args(inputs.forward))
    out = []
    for s in range(0, x.shape[0], group):
        xs = x[s:s + group].clone()
        ls = torch.full((xs.shape[0],), x.shape[1]) if lengths is None else lengths[s:s + group]
        kw = {} if inputs.target is None else {"target": inputs.target[s:s + group].long()}
        out.append(ig.attribute(xs, baselines=torch.zeros_like(xs), n_steps=ig_steps,
                                additional_forward_args=(ls,),
                                internal_batch_size=xs.shape[0] * ig_steps, **kw).detach())
    return torch.cat(out)


def attribute(inputs: Inputs, method: str = "ig", *, n_samples: int = 200, seed: int = 0,
              ig_steps: int = 32) -> np.ndarray:
    """``(N, T, C)`` attributions of ``inputs.forward`` to every input step and channel (0 at
    padded steps). ``n_samples``: perturbed evaluations per sequence for SHAP and LIME.

    SHAP, LIME and Occlusion attribute features (:func:`feature_mask`: a window of steps of one
    channel), and every step of a window carries the window's attribution (captum's
    convention). For text (``inputs.tokens``) a token's value is shared evenly over its
    embedding dimensions, so that for every method the sum over them is the token's
    attribution (for Integrated Gradients, it is the sum of the per-dimension ones)."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, expected one of {', '.join(METHODS)}")
    attr = _captum()
    x, lengths = inputs.x, inputs.lengths
    N, T, C = x.shape
    model = inputs.model
    model.eval()
    out = []
    torch.manual_seed(seed)
    text = inputs.tokens is not None
    with torch.backends.cudnn.flags(enabled=False):
        if method == "ig":
            a = _integrated_gradients(attr, inputs, ig_steps).float()
            if lengths is not None:
                a = a * (torch.arange(T)[None, :] < lengths[:, None])[..., None]
            return a.numpy()
        for i in range(N):
            n = T if lengths is None else int(lengths[i])
            # a text's own tokens only: each is a feature, padding is none
            xi = x[i:i + 1, :n].clone() if text else x[i:i + 1].clone()
            li = None if lengths is None else lengths[i:i + 1]
            fwd = _Bound(inputs.forward, li)
            base = torch.zeros_like(xi)
            kw = {} if inputs.target is None else {"target": int(inputs.target[i])}
            mask, w = (token_mask(n, C), 1) if text else feature_mask(T, C)
            if method == "shap":
                a = attr.KernelShap(fwd).attribute(xi, baselines=base, feature_mask=mask,
                                                   n_samples=n_samples, perturbations_per_eval=50,
                                                   **kw)
            elif method == "lime":
                a = attr.Lime(fwd).attribute(xi, baselines=base, feature_mask=mask,
                                             n_samples=n_samples, perturbations_per_eval=50, **kw)
            else:
                window = (1, C) if text else (w, 1)
                a = attr.Occlusion(fwd).attribute(xi, sliding_window_shapes=window,
                                                  strides=window, baselines=0.0,
                                                  perturbations_per_eval=50, **kw)
            a = a.detach().float()
            if text:  # captum gives every value of a feature the feature's attribution: share it
                a = a / C
            if a.shape[1] < T:
                a = torch.cat([a, a.new_zeros(1, T - a.shape[1], C)], 1)
            a[:, n:] = 0.0
            out.append(a[0])
    return torch.stack(out).numpy()


class _Args(nn.Module):
    """``forward(x, lengths)`` as captum calls it, the lengths an additional argument."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, lengths):
        return self.fn(x, lengths)


class _Bound(nn.Module):
    """``forward(x)`` with the sequence's lengths bound, repeated for a batch of perturbations."""

    def __init__(self, fn, lengths):
        super().__init__()
        self.fn, self.lengths = fn, lengths

    def forward(self, x):
        lens = None if self.lengths is None else self.lengths.expand(x.shape[0])
        return self.fn(x, lens)


@torch.no_grad()
def deletion_curve(inputs: Inputs, attributions: np.ndarray, fractions=(0.1, 0.2, 0.3, 0.5),
                   seed: int = 0) -> dict:
    """Accuracy after setting the most-attributed ``fraction`` of each sequence's valid steps to
    the baseline (0), beside the same number of steps chosen at random (mean of 5 draws).

    A step's score is its attributions summed over channels (evidence for the explained
    class). Attributions that find what the model uses lower accuracy faster than random."""
    if inputs.labels is None or inputs.predict is None:
        raise ValueError("deletion: needs labelled sequences and a classifier")
    x, lengths, y = inputs.x, inputs.lengths, inputs.labels
    N, T, _ = x.shape
    lens = torch.full((N,), T) if lengths is None else lengths
    score = torch.as_tensor(attributions).sum(-1)  # (N, T)
    g = torch.Generator().manual_seed(seed)

    def acc(xd):
        return float((inputs.predict(xd, lengths) == y).float().mean())

    result = {"fractions": list(fractions), "top": [], "random": [], "none": acc(x)}
    for f in fractions:
        top = x.clone()
        rand_acc = []
        for i in range(N):
            n = int(lens[i])
            k = max(1, round(f * n))
            order = torch.argsort(score[i, :n], descending=True)[:k]
            top[i, order] = 0.0
        for _ in range(5):
            rnd = x.clone()
            for i in range(N):
                n = int(lens[i])
                k = max(1, round(f * n))
                rnd[i, torch.randperm(n, generator=g)[:k]] = 0.0
            rand_acc.append(acc(rnd))
        result["top"].append(acc(top))
        result["random"].append(float(np.mean(rand_acc)))
    return result


def _plot(inputs: Inputs, attributions: np.ndarray, path: Path, method: str, limit: int = 4):
    from ..tasks import base
    plt = base.pyplot()
    n = min(limit, len(attributions))
    C = attributions.shape[2]
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.4 * n), squeeze=False)
    for k in range(n):
        T = int(inputs.lengths[k]) if inputs.lengths is not None else attributions.shape[1]
        ax = axes[k, 0]
        for c in range(C):
            ax.plot(inputs.x[k, :T, c].numpy(), lw=1, label=inputs.channels[c] if k == 0 else None)
        ax.set_title(f"sequence {k}: input (scaled)", fontsize=9)
        a = attributions[k, :T].T  # (C, T)
        lim = float(np.abs(a).max()) or 1.0
        im = axes[k, 1].imshow(a, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                               interpolation="nearest")
        axes[k, 1].set_title(f"{method} attribution (channel x step)", fontsize=9)
        axes[k, 1].set_yticks(range(C))
        axes[k, 1].set_yticklabels(inputs.channels if C <= 16 else [""] * C, fontsize=6)
        fig.colorbar(im, ax=axes[k, 1])
    if C <= 8:
        axes[0, 0].legend(fontsize=6)
    fig.suptitle(inputs.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_tokens(inputs: Inputs, scores: np.ndarray, path: Path, method: str, limit: int = 6):
    """One row per text: its tokens along the axis, each coloured by its attribution."""
    from ..tasks import base
    plt = base.pyplot()
    n = min(limit, len(scores))
    width = max(len(t) for t in inputs.tokens[:n])
    fig, axes = plt.subplots(n, 1, figsize=(min(2 + 0.42 * width, 40), 1.3 * n + 0.6),
                             squeeze=False)
    for k in range(n):
        toks = inputs.tokens[k]
        a = scores[k, :len(toks)][None]
        lim = float(np.abs(a).max()) or 1.0
        ax = axes[k, 0]
        im = ax.imshow(a, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       interpolation="nearest")
        ax.set_xticks(range(len(toks)))
        ax.set_xticklabels([repr(t)[1:-1] for t in toks], rotation=90, fontsize=6)
        ax.set_yticks([])
        ax.set_title(f"text {k}: {method} attribution per token", fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.01)
    fig.suptitle(inputs.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_states(maps: dict[str, np.ndarray], path: Path, title: str, sample: int = 0,
                 tokens: list[str] | None = None):
    from ..tasks import base
    plt = base.pyplot()
    keys = list(maps)
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys, strict=False):
        ax.axis("on")
        m = maps[k][sample].T  # (units, T)
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(k, fontsize=8)
        if tokens is not None and len(tokens) <= 48:
            ax.set_xticks(range(len(tokens)))
            ax.set_xticklabels([repr(t)[1:-1] for t in tokens], rotation=90, fontsize=5)
        else:
            ax.set_xlabel("token" if tokens is not None else "step", fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{title}: states and gates of sequence {sample} (unit x "
                 f"{'token' if tokens is not None else 'step'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def explain_run(out_dir, method: str = "ig", samples: int = 8, data: str | None = None,
                n_samples: int = 200, deletion: bool = True) -> dict:
    """Attributions, state and gate maps of ``samples`` test sequences of the run in
    ``out_dir``, written to ``out_dir/explain/``: ``METHOD.npz`` (``attributions``
    ``(N, T, C)``, ``x``, ``lengths``; for a text run ``attributions`` ``(N, T)`` per token,
    ``tokens``, ``lengths``), ``METHOD.png``, ``states.npz`` (one ``(N, T, k)`` array per layer,
    direction and named intermediate), ``states.png``, and ``summary.json`` (with the deletion
    curve for a classifier). Returns the summary."""
    from .. import tasks
    from ..tasks import base
    if method not in METHODS:
        raise ValueError(f"--method: got {method!r}, expected one of {', '.join(METHODS)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples: got {samples!r}, expected an int >= 1")
    _captum()
    out = Path(out_dir)
    task = base.task_of_run(out)
    module = tasks.get(task) if task else None
    if module is None or not hasattr(module, "explain_inputs"):
        raise ValueError(f"explain: the {task or 'unknown'} task of {str(out)!r} has no "
                         "explain support (classify, forecast and sentiment do)")
    inputs = module.explain_inputs(out, data=data, samples=samples)
    a = attribute(inputs, method, n_samples=n_samples)
    dest = out / "explain"
    dest.mkdir(exist_ok=True)
    lengths = (inputs.lengths.numpy() if inputs.lengths is not None
               else np.full(len(a), a.shape[1]))
    if inputs.tokens is not None:
        per_token = a.sum(-1)  # (N, T): a token's attribution, summed over its embedding
        width = a.shape[1]
        tokens = np.asarray([t + [""] * (width - len(t)) for t in inputs.tokens], dtype=str)
        np.savez(dest / f"{method}.npz", attributions=per_token, tokens=tokens, lengths=lengths)
        _plot_tokens(inputs, per_token, dest / f"{method}.png", method)
        described = {"top_tokens": [inputs.tokens[k][int(np.abs(per_token[k]).argmax())]
                                    for k in range(len(a))]}
    else:
        np.savez(dest / f"{method}.npz", attributions=a, x=inputs.x.numpy(), lengths=lengths,
                 channels=np.asarray(inputs.channels, dtype=str))
        _plot(inputs, a, dest / f"{method}.png", method)
        mass = np.abs(a).sum(axis=(0, 1))
        described = {"channel_share": {c: float(v / max(mass.sum(), 1e-30))
                                       for c, v in zip(inputs.channels, mass, strict=True)}}
    run = inputs.run or (lambda: inputs.model(inputs.x, lengths=inputs.lengths))
    maps = states.record(inputs.model, run)
    np.savez(dest / "states.npz", **maps)
    _plot_states(maps, dest / "states.png", inputs.title,
                 tokens=None if inputs.tokens is None else inputs.tokens[0])
    summary = {"run": str(out), "task": task, "method": method, "sequences": int(len(a)),
               **described, "maps": sorted(maps),
               "files": sorted({p.name for p in dest.iterdir()} | {"summary.json"}),
               **inputs.meta}
    if deletion and inputs.labels is not None:
        summary["deletion"] = deletion_curve(inputs, a)
    base.write_json(summary, dest / "summary.json")
    return summary


__all__ = ["METHODS", "Inputs", "attribute", "deletion_curve", "explain_run", "feature_mask",
           "states", "token_mask"]
