"""Magnitude pruning of a trained run, with a short fine-tune, made permanent.

* **Unstructured** (per weight): ``torch.nn.utils.prune.l1_unstructured`` zeroes the fraction
  ``sparsity`` of smallest-magnitude entries of every weight matrix (the recurrent layers' input
  and recurrent weights, the head's linear weights); ``prune.remove`` makes the zeros the
  parameter itself, and a gradient mask keeps them zero through the fine-tune (Adam's update of
  an entry whose gradient is always 0 is 0), so the saved state dict is a plain one.
* **Structured** (``structured=True``): whole hidden units go, each with its rows in every gate
  block, its column of the recurrent weights, its per-unit vectors (peepholes, layer norm) and
  the columns of the next layer's and the head's inputs it fed. The model is rebuilt with the
  smaller ``hidden`` and the kept units' weights copied in: it runs faster, not only sparser.
  Which axes hold units is read off the parameter shapes of the two sizes (an axis ``g * H + c``
  long becomes ``g * H' + c``), so no cell is special-cased. The ``g`` blocks of ``H`` come
  first on such an axis and the ``c`` other entries after them: the rule of every built-in
  head that reads the recurrence beside other features (a forecast head's future covariates
  and series embedding, a conv-rnn head's fused front-end mean). Units are ranked per layer by
  the L2 norm of their rows over both directions.

An output layer tied to an embedding (lm) is left as it is (pruning its weight would untie
it). Starts from a task's ``load_run``; the pruned model is built by the task's ``build_like``
(the run's model from a config) and fine-tuned by its ``finetune``; ``score_test`` scores it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .nn import Recurrent

SWEEP = (0.0, 0.25, 0.5, 0.75, 0.9)


def _check_sparsity(s) -> float:
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < 1:
        raise ValueError(f"sparsity: got {s!r}, expected a number in [0, 1)")
    return float(s)


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weight matrices pruning acts on: the recurrence's and the head's (Linear) weights."""
    out = []
    # an output layer tied to an embedding (lm) shares its weight: left as it is (pruning it
    # would replace the parameter and untie the two)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) in tied:
            continue
        if isinstance(mod, Recurrent):
            out += [(mod, n) for n, p in mod.named_parameters(recurse=False)
                    if n.startswith("weight") and p.dim() == 2]
        elif isinstance(mod, nn.Linear):
            out.append((mod, "weight"))
    return out


def unstructured(model: nn.Module, sparsity: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero ``sparsity`` of each weight matrix in place (permanent); returns the gradient hooks
    that keep the zeros zero while fine-tuning (remove them afterwards)."""
    import torch.nn.utils.prune as prune
    sparsity = _check_sparsity(sparsity)
    hooks = []
    for mod, name in _weights(model):
        if sparsity == 0:
            continue
        prune.l1_unstructured(mod, name, amount=sparsity)
        prune.remove(mod, name)
        p = getattr(mod, name)
        keep = (p != 0).to(p.dtype)
        hooks.append(p.register_hook(lambda g, k=keep: g * k))
    return hooks


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros over the weight matrices pruning acts on."""
    ws = [getattr(m, n) for m, n in _weights(model)]
    return float(sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws)))


def _unit_order(rnn: Recurrent) -> list[torch.Tensor]:
    """Per layer, its hidden units by decreasing L2 norm of their rows (both directions)."""
    H = rnn.hidden_size
    orders = []
    for layer in range(rnn.num_layers):
        score = torch.zeros(H)
        for name, p in rnn.named_parameters():
            if not name.endswith(f"_l{layer}") and not name.endswith(f"_l{layer}_reverse"):
                continue
            if p.dim() >= 1 and p.shape[0] % H == 0:
                rows = p.detach().reshape(p.shape[0] // H, H, -1)
                score += rows.pow(2).sum(dim=(0, 2))
        orders.append(torch.argsort(score.sqrt(), descending=True))
    return orders


def _layer_of(name: str, layers: int) -> int:
    for layer in range(layers):
        if name.endswith(f"_l{layer}") or name.endswith(f"_l{layer}_reverse"):
            return layer
    return layers - 1  # the head reads the last layer


def structured(model: nn.Module, small: nn.Module, sparsity: float) -> nn.Module:
    """Copy ``model``'s kept units into ``small`` (the same model built with the smaller hidden
    size ``round(H * (1 - sparsity))``) and return it."""
    rnn, srnn = model.rnn, small.rnn
    H, Hs = rnn.hidden_size, srnn.hidden_size
    if getattr(rnn.cell, "proj_size", 0):
        raise ValueError("structured: a projected LSTM's state is proj_size wide, not hidden_size; "
                         "prune it unstructured")
    kept = [o[:Hs].sort().values for o in _unit_order(rnn)]
    big, out = model.state_dict(), small.state_dict()
    for name, v in out.items():
        if name not in big:
            # a layer the small model has and the big one has not: the projection to the
            # embedding width of a tied output (lm) whose hidden size was that width (Identity):
            # the kept units' columns of the identity do what Identity did on them
            if name.endswith("proj.weight") and tuple(v.shape) == (H, Hs):
                w = torch.zeros(H, Hs, dtype=v.dtype)
                w[kept[-1], torch.arange(Hs)] = 1
                out[name] = w
                continue
            if name.endswith("proj.bias") and tuple(v.shape) == (H,):
                out[name] = torch.zeros_like(v)
                continue
            raise ValueError(f"structured: the smaller model has {name}, which the run's has not")
        w = big[name]
        if tuple(w.shape) == tuple(v.shape):
            out[name] = w.clone()
            continue
        in_rnn = name.startswith("rnn.")
        layer = _layer_of(name, rnn.num_layers) if in_rnn else rnn.num_layers - 1
        base = name.removeprefix("rnn.").rsplit("_l", 1)[0]
        for axis, (a, b) in enumerate(zip(w.shape, v.shape, strict=True)):
            if a == b:
                continue
            # a = g * H + c, b = g * Hs + c: g blocks of units, then c entries kept as they are
            g, rest = divmod(a - b, H - Hs)
            c = a - g * H
            if rest or g < 1 or c < 0 or c != b - g * Hs:
                raise ValueError(f"structured: cannot tell the hidden units of {name} "
                                 f"({tuple(w.shape)} -> {tuple(v.shape)})")
            # a stacked layer's input columns are the previous layer's units (one block per
            # direction); every other axis that scales with H holds this layer's units
            src = layer - 1 if in_rnn and axis == 1 and base in ("weight_ih", "weight_xh") \
                else layer
            sel = torch.cat([kept[src] + k * H for k in range(g)] + [torch.arange(c) + g * H])
            w = w.index_select(axis, sel)
        out[name] = w.clone()
    small.load_state_dict(out)
    return small.eval()


def plot(rows: list[dict], metric: str, path: Path, title: str) -> None:
    from .tasks.base import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = [(r["sparsity"], r[metric]) for r in rows if r["kind"] == kind]
        ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load(task, out_dir) -> tuple:
    """``(config, model, checkpoint extra)`` of a run (a text task's ``load_run`` also gives its
    tokeniser; lm's gives no extra, its ``run_extra`` does)."""
    loaded = task.load_run(out_dir)
    extra = task.run_extra(out_dir) if hasattr(task, "run_extra") else loaded[-1]
    return loaded[0], loaded[1], extra


def prune_run(task, out_dir, sparsities, *, structured_units: bool = False, epochs: int = 3,
              dest=None) -> list[dict]:
    """Prune the run in ``out_dir`` at each sparsity, fine-tune each for ``epochs`` epochs into
    its own run directory under ``dest`` (default ``out_dir/prune``), and write ``prune.json``,
    ``prune.md`` (the table) and ``prune.png`` (metric against sparsity) there. Each row's
    ``test_seconds`` (the forward over the test split) is timed alternately with the unpruned
    run's, best of 3, and ``speedup`` is their ratio. The original run is not touched. Returns
    the table rows."""
    from .tasks import base
    if not all(hasattr(task, f) for f in ("finetune", "score_test", "build_like")):
        raise ValueError(f"prune: task {task.__name__.rsplit('.', 1)[-1]!r} has no finetune(); "
                         "pruning (fine-tune and test score) is available for classify, regress, "
                         "forecast, sentiment and lm runs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: got {epochs!r}, expected an int >= 1 (fine-tune epochs)")
    sparsities = [_check_sparsity(s) for s in sparsities]
    config, model, extra = _load(task, out_dir)
    if not isinstance(getattr(model, "rnn", None), Recurrent):
        raise ValueError(f"prune: the run's model is {type(model).__name__}, which has no "
                         "gyre.nn.Recurrent .rnn to prune")
    dest = Path(dest) if dest else Path(out_dir) / "prune"
    kind = "structured" if structured_units else "unstructured"
    rows = []
    for s in sparsities:
        _, model, extra = _load(task, out_dir)
        sub = dest / f"{kind}-{s:g}"
        hidden = config.hidden
        hooks = []
        if structured_units:
            hidden = max(1, round(config.hidden * (1 - s)))
            small = task.build_like(dataclasses.replace(config, hidden=hidden), extra)
            model = structured(model, small, s)
        else:
            hooks = unstructured(model, s)
        cfg = dataclasses.replace(config, hidden=hidden, epochs=epochs, out=str(sub))
        task.finetune(model, cfg, extra)
        for h in hooks:
            h.remove()
        scores, seconds = task.score_test(sub)
        base_s = float("inf")
        for _ in range(3):  # paired with the unpruned run's, alternating (a shared machine)
            base_s = min(base_s, task.score_test(out_dir)[1])
            seconds = min(seconds, task.score_test(sub)[1])
        _, pruned, _ = _load(task, sub)
        rows.append({"kind": kind, "sparsity": s, "hidden": hidden,
                     "weight_sparsity": round(sparsity_of(pruned), 4),
                     "parameters": sum(int((p != 0).sum()) for p in pruned.parameters()),
                     **scores, "test_seconds": round(seconds, 4),
                     "speedup": round(base_s / seconds, 3), "run": str(sub)})
    dest.mkdir(parents=True, exist_ok=True)
    base.write_json(rows, dest / f"prune-{kind}.json")
    metric = "mase" if "mase" in rows[0] else next(
        k for k in rows[0] if k not in ("kind", "sparsity", "hidden", "weight_sparsity",
                                        "parameters", "run", "test_seconds", "speedup"))
    plot(rows, metric, dest / f"prune-{kind}.png", f"{kind} pruning: test {metric} vs sparsity")
    cols = ["sparsity", "hidden", "weight_sparsity", "parameters", metric, "test_seconds",
            "speedup"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (dest / f"prune-{kind}.md").write_text("\n".join(lines) + "\n")
    return rows


__all__ = ["SWEEP", "unstructured", "structured", "sparsity_of", "prune_run"]
