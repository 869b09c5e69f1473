"""``gyre explain``: which time steps and channels a trained model's output rests on, and what its
recurrent state and gates do over time.

Attributions come from captum (``pip install 'gyre[explain]'``): Integrated Gradients, Kernel
SHAP, LIME and Occlusion, over every (step, channel) of the input series, for the output the
task names (classify: the predicted class's logit; forecast: the mean scaled forecast of the
first target column over the horizon). The baseline, what a "removed" input becomes, is 0 in
the model's scaled input space: the training mean of every channel. State and gate maps are
:func:`gyre.explain.states.record`.

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


def attribute(inputs: Inputs, method: str = "ig", *, n_samples: int = 200, seed: int = 0,
              ig_steps: int = 32) -> np.ndarray:
    """``(N, T, C)`` attributions of ``inputs.forward`` to every input step and channel (0 at
    padded steps). ``n_samples``: perturbed evaluations per sequence for SHAP and LIME."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, expected one of {', '.join(METHODS)}")
    attr = _captum()
    x, lengths = inputs.x, inputs.lengths
    N, T, C = x.shape
    model = inputs.model
    model.eval()
    out = []
    torch.manual_seed(seed)
    with torch.backends.cudnn.flags(enabled=False):
        for i in range(N):
            xi = x[i:i + 1].clone()
            li = None if lengths is None else lengths[i:i + 1]
            fwd = _Bound(inputs.forward, li)
            base = torch.zeros_like(xi)
            kw = {} if inputs.target is None else {"target": int(inputs.target[i])}
            if method == "ig":
                a = attr.IntegratedGradients(fwd).attribute(xi, baselines=base, n_steps=ig_steps,
                                                            internal_batch_size=ig_steps, **kw)
            else:
                mask, w = feature_mask(T, C)
                if method == "shap":
                    a = attr.KernelShap(fwd).attribute(xi, baselines=base, feature_mask=mask,
                                                       n_samples=n_samples, perturbations_per_eval=50, **kw)
                elif method == "lime":
                    a = attr.Lime(fwd).attribute(xi, baselines=base, feature_mask=mask,
                                                 n_samples=n_samples, perturbations_per_eval=50, **kw)
                else:
                    a = attr.Occlusion(fwd).attribute(xi, sliding_window_shapes=(w, 1),
                                                      strides=(w, 1), baselines=0.0,
                                                      perturbations_per_eval=50, **kw)
            a = a.detach().float()
            if li is not None:
                a[:, int(li[0]):] = 0.0
            out.append(a[0])
    return torch.stack(out).numpy()


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


def _plot_states(maps: dict[str, np.ndarray], path: Path, title: str, sample: int = 0):
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
        ax.set_xlabel("step", fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{title}: states and gates of sequence {sample} (unit x step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def explain_run(out_dir, method: str = "ig", samples: int = 8, data: str | None = None,
                n_samples: int = 200, deletion: bool = True) -> dict:
    """Attributions, state and gate maps of ``samples`` test sequences of the run in
    ``out_dir``, written to ``out_dir/explain/``: ``METHOD.npz`` (``attributions``
    ``(N, T, C)``, ``x``, ``lengths``), ``METHOD.png``, ``states.npz`` (one ``(N, T, k)`` array
    per layer, direction and named intermediate), ``states.png``, and ``summary.json`` (with
    the deletion curve for a classifier). Returns the summary."""
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
                         "explain support (classify and forecast do)")
    inputs = module.explain_inputs(out, data=data, samples=samples)
    a = attribute(inputs, method, n_samples=n_samples)
    dest = out / "explain"
    dest.mkdir(exist_ok=True)
    lengths = (inputs.lengths.numpy() if inputs.lengths is not None
               else np.full(len(a), a.shape[1]))
    np.savez(dest / f"{method}.npz", attributions=a, x=inputs.x.numpy(), lengths=lengths,
             channels=np.asarray(inputs.channels, dtype=str))
    _plot(inputs, a, dest / f"{method}.png", method)
    maps = states.record(inputs.model, lambda: inputs.model(inputs.x, lengths=inputs.lengths))
    np.savez(dest / "states.npz", **maps)
    _plot_states(maps, dest / "states.png", inputs.title)
    mass = np.abs(a).sum(axis=(0, 1))
    summary = {"run": str(out), "task": task, "method": method, "sequences": int(len(a)),
               "channel_share": {c: float(v / max(mass.sum(), 1e-30))
                                 for c, v in zip(inputs.channels, mass, strict=True)},
               "maps": sorted(maps), "files": sorted({p.name for p in dest.iterdir()} | {"summary.json"}),
               **inputs.meta}
    if deletion and inputs.labels is not None:
        summary["deletion"] = deletion_curve(inputs, a)
    base.write_json(summary, dest / "summary.json")
    return summary


__all__ = ["METHODS", "Inputs", "attribute", "deletion_curve", "explain_run", "feature_mask",
           "states"]
