"""Optimizer and learning-rate schedule: built from a TrainConfig, re-planned and rescaled on
resume."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _optimizer_class(name: str):
    if not isinstance(name, str):
        raise TypeError(f"optimizer: got {type(name).__name__}, expected a torch.optim class name")
    table = {k.lower(): v for k, v in vars(torch.optim).items()
             if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)
             and v is not torch.optim.Optimizer}
    if name.lower() not in table:
        raise ValueError(f"optimizer: got {name!r}, expected a torch.optim optimizer, one of "
                         f"{', '.join(sorted(table))}")
    return table[name.lower()]


_SCHED_BASES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
_SHORTHANDS = {"cosine": "cosineannealinglr", "plateau": "reducelronplateau",
               "onecycle": "onecyclelr", "step": "steplr"}


def _scheduler_spec(name: str):
    if not isinstance(name, str):
        raise TypeError(f"scheduler: got {type(name).__name__}, expected a name or 'none'")
    if name.lower() == "none":
        return None
    table = {k.lower(): v for k, v in vars(torch.optim.lr_scheduler).items()
             if isinstance(v, type) and issubclass(v, _SCHED_BASES)
             and not k.startswith("_") and k != "LRScheduler"}
    key = _SHORTHANDS.get(name.lower(), name.lower())
    if key not in table:
        raise ValueError(f"scheduler: got {name!r}, expected 'none', one of "
                         f"{', '.join(sorted(_SHORTHANDS))} or a torch.optim.lr_scheduler class "
                         f"({', '.join(sorted(table))})")
    return table[key]


def build_optimizer(params, config):
    """The ``torch.optim`` optimizer ``config.optimizer`` names, over ``params``, with
    ``config.lr``, ``config.weight_decay`` (when set) and ``config.optimizer_options``.

    ``params`` is parameters, or parameter groups: dicts ``{"params": [...], "lr_scale": s}``,
    each group's rate ``s * config.lr`` (discriminative rates); frozen parameters are left out."""
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = [{"params": [p for p in g["params"] if p.requires_grad],
                   "lr": config.lr * g.get("lr_scale", 1.0)} for g in items]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for p in items if p.requires_grad], "lr": config.lr}]
        groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("model: has no trainable parameters")
    opts = {"lr": config.lr, **config.optimizer_options}
    if config.weight_decay:
        opts["weight_decay"] = config.weight_decay
    return _optimizer_class(config.optimizer)(groups, **opts)


def build_scheduler(optimizer, config, n_batches: int):
    """The schedule ``config.scheduler`` names for a run of ``config.epochs`` epochs of
    ``n_batches`` micro-steps each (batches, or batches times chunks under truncated BPTT;
    ``accumulate`` of them make an optimizer step), None for ``"none"``; shorthand defaults
    derive from that length."""
    cfg = config
    cls = _scheduler_spec(cfg.scheduler)
    if cls is None:
        return None
    opts = dict(cfg.scheduler_options)
    sched = torch.optim.lr_scheduler
    per_step = cfg.scheduler_interval == "step"
    steps = cfg.epochs * math.ceil(n_batches / cfg.accumulate)
    if cls is sched.CosineAnnealingLR:
        opts.setdefault("T_max", steps if per_step else cfg.epochs)
    elif cls is sched.OneCycleLR:
        if not per_step:
            raise ValueError("scheduler: onecycle changes the rate every optimizer step; "
                             "set scheduler_interval='step'")
        opts.setdefault("max_lr", cfg.lr)
        opts.setdefault("total_steps", steps)
    elif cls is sched.StepLR:
        opts.setdefault("step_size", max(1, cfg.epochs // 3))
    elif cls is sched.ReduceLROnPlateau:
        opts.setdefault("mode", cfg.mode)
        if per_step:
            raise ValueError("scheduler: plateau reads the monitored metric once per epoch; "
                             "set scheduler_interval='epoch'")
    try:
        return cls(optimizer, **opts)
    except TypeError as e:
        raise ValueError(f"scheduler_options: {cls.__name__} rejected {opts}: {e}") from e


#: scheduler state that :func:`build_scheduler` derives from the run's length
_LENGTH_KEYS = {"CosineAnnealingLR": ("T_max",), "OneCycleLR": ("total_steps", "_schedule_phases"),
                "StepLR": ("step_size",)}


def load_scheduler_state(sched, optimizer, state: dict, config) -> None:
    """Load a checkpoint's scheduler state into ``sched`` (built by :func:`build_scheduler`
    for the new config). Where the schedule's length came from the number of epochs (not from
    ``scheduler_options``) and the run is now longer or shorter, the schedule is re-planned
    for the new length from the current step on: position and base rates come from the
    checkpoint, the length from the new config."""
    keys = [k for k in _LENGTH_KEYS.get(type(sched).__name__, ())
            if k not in config.scheduler_options]
    fresh = {k: getattr(sched, k) for k in keys}
    sched.load_state_dict(state)
    changed = [k for k in keys if state.get(k) != fresh[k]]
    if not changed:
        return
    for k in keys:
        setattr(sched, k, fresh[k])
    if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
        # the recursive cosine update continues from the closed form at the new length
        t = min(sched.last_epoch, sched.T_max)
        lrs = [sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * t / sched.T_max)) / 2
               for base in sched.base_lrs]
    elif isinstance(sched, torch.optim.lr_scheduler.OneCycleLR):
        with torch.optim.lr_scheduler._enable_get_lr_call(sched):
            lrs = [float(lr) for lr in sched.get_lr()]  # the rate at this step, new phases
    else:
        return
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = list(lrs)


def rescale_lr(optimizer, sched, factor: float) -> None:
    """A new ``lr`` on resume: every rate the optimizer and schedule hold (the current one, a
    schedule's base, peak and floor) is multiplied by new/old, so the schedule keeps its shape
    and position at the new scale."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if isinstance(group.get(key), int | float | Tensor):
                group[key] = group[key] * factor
    if sched is None:
        return
    for attr in ("base_lrs", "_last_lr", "min_lrs"):
        if isinstance(getattr(sched, attr, None), list):
            setattr(sched, attr, [v * factor for v in getattr(sched, attr)])
    if isinstance(getattr(sched, "eta_min", None), int | float):
        sched.eta_min = sched.eta_min * factor
