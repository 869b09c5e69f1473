"""The Trainer: BPTT / truncated BPTT, clipping, accumulation, early stopping, checkpoints."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as _dist
from .checkpoint import (  # noqa: F401  (re-exported: the names this module always had)
    _FORMAT,
    CHECKPOINT,
    CHECKPOINT_KEYS,
    _atomic_write_bytes,
    _rng_state,
    _set_rng_state,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from .optim import (  # noqa: F401
    _optimizer_class,
    _scheduler_spec,
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    rescale_lr,
)

Batch = dict[str, Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """How to train. ``0`` switches an option off where noted.

    Attributes:
        epochs: passes over the training data.
        batch_size: sequences per micro-batch (``eval_batch_size``: for evaluation, 0 = same).
        lr, weight_decay: the optimizer's learning rate; its weight decay.
        optimizer: a ``torch.optim`` class name, any case (``adam``, ``adamw``, ``sgd``,
            ``rmsprop``...); ``optimizer_options`` go to its constructor.
        scheduler: ``none``, a ``torch.optim.lr_scheduler`` class name (any case, options in
            ``scheduler_options``), or a shorthand: ``cosine`` (CosineAnnealingLR over the
            epochs), ``plateau`` (ReduceLROnPlateau on ``monitor``), ``onecycle`` (OneCycleLR
            per step, peak ``lr``), ``step`` (StepLR, ``step_size`` = a third of the epochs).
        scheduler_interval: ``epoch`` or ``step`` (after each optimizer step).
        clip_value: clamp every gradient element to ``[-v, v]`` (0 = off); applied first.
        clip_norm: rescale gradients to total 2-norm at most this (0 = off).
        accumulate: micro-steps (batches, or tbptt chunks) whose gradients are summed before one
            optimizer step; each micro-loss is divided by ``accumulate``.
        tbptt: truncated BPTT chunk length in steps (0 = full BPTT).
        patience: stop after this many epochs without improvement of ``monitor`` (0 = never).
        monitor, mode: the history key that defines "best" (``val_loss``,
            ``val_accuracy``...); whether lower (``min``) or higher (``max``) is better.
        restore_best: load the best epoch's weights at the end (needs a validation split).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        bf16: bfloat16 autocast for forward passes (CPU or CUDA).
        seed: seeds the global RNGs at the start of a fresh run and the shuffling generator.
        shuffle: shuffle the training data every epoch.
        shard: how a distributed run deals the items to its processes: ``interleave`` (each
            its share of every global batch of ``batch_size``) or ``contiguous`` (each a
            contiguous block, for state carried between batches); see
            :func:`gyre.train.distributed.shard`.
        progress, tensorboard, csv: show a tqdm progress bar; write ``DIR/tensorboard``
            events; write ``DIR/log.csv``.
    """

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    optimizer_options: dict = field(default_factory=dict)
    scheduler: str = "none"
    scheduler_options: dict = field(default_factory=dict)
    scheduler_interval: str = "epoch"
    clip_value: float = 0.0
    clip_norm: float = 0.0
    accumulate: int = 1
    tbptt: int = 0
    patience: int = 0
    monitor: str = "val_loss"
    mode: str = "min"
    restore_best: bool = True
    device: str = "auto"
    bf16: bool = False
    seed: int = 0
    shuffle: bool = True
    shard: str = "interleave"
    progress: bool = True
    tensorboard: bool = True
    csv: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulate"):
            _check_int(name, getattr(self, name), 1)
        for name in ("eval_batch_size", "tbptt", "patience", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "weight_decay", "clip_value", "clip_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or v == math.inf:
                raise ValueError(f"{name}: got {v!r}, expected a finite number >= 0")
        if self.lr == 0:
            raise ValueError("lr: got 0, expected a learning rate > 0")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode: got {self.mode!r}, expected 'min' or 'max'")
        if self.scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval: got {self.scheduler_interval!r}, "
                             "expected 'epoch' or 'step'")
        if self.shard not in _dist.SHARDS:
            raise ValueError(f"shard: got {self.shard!r}, expected one of {', '.join(_dist.SHARDS)}")
        _optimizer_class(self.optimizer)
        _scheduler_spec(self.scheduler)
        resolve_device(self.device, check_available=False)


# -- helpers ------------------------------------------------------------------------------------
def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: got {v!r}, expected an int >= {low}")


def resolve_device(device: str | torch.device, check_available: bool = True) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``; ``cuda`` / ``cuda:N`` (must exist)."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device: got {type(device).__name__}, expected 'auto', 'cpu' or 'cuda'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if check_available and not torch.cuda.is_available():
            raise ValueError(f"device: got {device!r} but no CUDA device is available here; "
                             "use 'auto' or 'cpu'")
        return torch.device(device)
    raise ValueError(f"device: got {device!r}, expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def detach_state(state):
    """Detach a recurrent state (a tensor, or nested tuples/lists of tensors, or None)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple | list):
        return type(state)(detach_state(s) for s in state)
    raise TypeError(f"state: got {type(state).__name__}, expected a Tensor, a tuple/list of "
                    "Tensors or None")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise TypeError(f"batch: got {type(batch).__name__}"
                        f"{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}, "
                        "expected a dict with tensors 'x', 'y' and optionally 'lengths'")
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            # lengths stay on the CPU: the recurrent layers read them there
            out[k] = v if k == "lengths" else v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out


def _clone_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the trainer --------------------------------------------------------------------------------
class Trainer:
    """Train ``model`` with ``loss_fn`` under ``config`` (see the package docstring for the
    model/batch contract).

    Args:
        model: ``model(x, state=None, *, lengths=None) -> (output, state)``.
        loss_fn: ``loss_fn(output, y) -> scalar tensor`` (mean over the batch).
        config: a :class:`TrainConfig`.
        collate: ``collate(list_of_items) -> batch dict``; default stacks ``(x, y)`` pairs.
        metrics: ``metrics(outputs, targets) -> dict[str, float]`` on a whole split.
        out_dir: where ``checkpoint``, ``log.csv`` and ``tensorboard/`` go (None: no files).
        extra: task state stored in the checkpoint (tensors, numbers, strings, lists, dicts).
        callback: ``callback(trainer, event, info)`` called once when training starts, after
            a resumed run's checkpoint was loaded and checked and before anything is written
            (``event="start"``, ``info={"resumed", "epoch"}``), after every optimizer step
            (``"step"``) and epoch (``"epoch"``); it may call :meth:`request_stop`.
        distributed: ``None`` (default): data parallel over the processes of an initialized
            ``torch.distributed`` process group, when there is one (see
            :mod:`gyre.train.distributed`); ``False``: this process alone.
        params: what the optimizer updates, parameters of ``model`` or groups of them with a
            rate scale each (:func:`gyre.train.optim.build_optimizer`); None: all of them.

    The parts a variant changes are separate seams: checkpoint I/O (:meth:`_checkpoint`,
    :meth:`_save`, :meth:`_load_for_resume`, :mod:`gyre.train.checkpoint`), optimizer and
    schedule (:meth:`_make_scheduler`, :mod:`gyre.train.optim`), which items a process trains on
    (:meth:`_epoch_order`, :meth:`_local_order`), one batch and its micro-steps
    (:meth:`_train_batch`, :meth:`_sync`, :meth:`_optimizer_step`), and the epoch's end
    (:meth:`_end_epoch`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        config: TrainConfig | None = None,
        *,
        collate: Callable[[list], Batch] | None = None,
        metrics: Callable[[Tensor, Tensor], dict[str, float]] | None = None,
        out_dir: str | os.PathLike | None = None,
        extra: dict | None = None,
        callback: Callable[[Trainer, str, dict], None] | None = None,
        distributed: bool | None = None,
        params=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
        if config is None:
            config = TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: got {type(config).__name__}, expected a TrainConfig")
        self.config = config
        self.dist = _dist.context() if distributed is not False else _dist.Context()
        if distributed and not self.dist.active:
            raise ValueError("distributed: got True but no torch.distributed process group of "
                             "more than one process is initialized (start with torchrun)")
        self.device = resolve_device(config.device)
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.collate = collate or _default_collate
        self.metrics = metrics
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.extra = extra or {}
        self.callback = callback
        self.optimizer = build_optimizer(model.parameters() if params is None else params, config)
        self.scheduler = None
        self.history: list[dict] = []
        self.global_step = 0
        self._stop = False
        self._loader_gen = torch.Generator().manual_seed(config.seed)
        _dist.shard([], config.batch_size, self.dist, config.shard)  # batch_size and shard check
        # the module the training forward runs through: DDP all-reduces the gradients in
        # backward (broadcasting rank 0's weights once, here); evaluation uses self.model
        self._net = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel
            self._net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- public ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask :meth:`fit` to save a checkpoint and return at the next optimizer-step boundary."""
        self._stop = True

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT

    @property
    def writes(self) -> bool:
        """True where this process writes files (not on the ranks but 0 of a distributed run)."""
        return self.out_dir is not None and self.dist.main

    def fit(self, train: Sequence, val: Sequence | None = None, *, resume: bool = False) -> dict:
        """Train; returns ``{"history", "best_epoch", "best_score", "stopped_early",
        "interrupted", "epochs_run"}``.

        A checkpoint is written atomically after every epoch. ``resume=True`` loads
        ``out_dir/checkpoint`` and continues exactly (same batches, RNG draws and optimizer
        state), also from the middle of an epoch. What the config may change on resume takes
        effect: ``epochs`` (a schedule derived from it is re-planned), ``lr`` (every rate of
        the optimizer and schedule scaled by new/old), ``patience``, logging and progress; a
        different optimizer type, scheduler or model is refused with a ``ValueError`` before
        anything is written. Stale temporary files of a killed write are removed. Ctrl-C
        (SIGINT, when fit runs in the main thread) or :meth:`request_stop` saves a checkpoint
        at the next optimizer-step boundary and returns with ``interrupted=True``; a second
        Ctrl-C raises ``KeyboardInterrupt``. A NaN/inf loss raises :class:`NonFiniteLossError`
        without touching the checkpoint.

        Distributed (see :mod:`gyre.train.distributed`): every process runs ``fit`` on the same
        data; each trains on its share of every global batch of ``batch_size`` items, evaluates
        the whole validation split (so every process takes the same early-stopping decision)
        and loads the same checkpoint on resume (on several machines ``out_dir`` must then be on
        a shared file system); rank 0 alone writes the checkpoint, logs and progress bar.
        """
        cfg = self.config
        n = len(train)
        if n == 0:
            raise ValueError("train: got an empty dataset, expected at least one example")
        if val is not None and len(val) == 0:
            val = None
        if cfg.patience and val is None:
            raise ValueError("patience: early stopping needs a validation split, got none")
        if self.out_dir is not None:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise ValueError(f"out_dir: {str(self.out_dir)!r} is a file, expected a directory")
            if self.writes:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(self.out_dir)
        n_batches = self._n_batches(n)
        self.scheduler = self._make_scheduler(n_batches * self._chunks_per_batch(train))

        loop = _Loop()
        if resume:
            ckpt = self._load_for_resume()
            for k in ("epoch", "batch", "perm", "running", "micro", "best", "bad_epochs"):
                setattr(loop, k, ckpt[k])
            if self.dist.active and not self.dist.main:
                loop.running = [0.0, 0]  # the saved loss sum is all processes'; rank 0 holds it
            # the patience now in force decides (a longer one continues a run that stopped)
            loop.stopped_early = bool(cfg.patience) and loop.bad_epochs >= cfg.patience
        else:
            seed_everything(cfg.seed)
            self._loader_gen.manual_seed(cfg.seed)
            self.history, self.global_step = [], 0
        if self.callback is not None:
            self.callback(self, "start", {"resumed": resume, "epoch": loop.epoch})

        writer = self._tensorboard(purge_step=loop.epoch + 1 if resume else None)
        bar = self._progress(loop, n_batches)
        self._stop = False
        restore = self._install_sigint()
        interrupted = False
        try:
            while loop.epoch < cfg.epochs and not loop.stopped_early:
                if self._train_epoch(train, loop, n_batches, bar):
                    self._save(loop.epoch, loop.batch, loop.perm, self._global_running(loop),
                               loop.micro, loop.best, loop.bad_epochs, loop.stopped_early)
                    return self._result(loop.best, loop.stopped_early, True)
                record = self._end_epoch(val, loop)
                self._save(loop.epoch, 0, None, [0.0, 0], 0, loop.best, loop.bad_epochs,
                           loop.stopped_early)
                self._write_logs(writer, record)
                if self.callback is not None:
                    self.callback(self, "epoch", record)
                if _dist.any_true(self._stop, self.device):
                    interrupted = loop.epoch < cfg.epochs and not loop.stopped_early
                    break
        finally:
            restore()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if not interrupted and cfg.restore_best and loop.best["model"] is not None:
            self.model.load_state_dict(loop.best["model"])
        return self._result(loop.best, loop.stopped_early, interrupted)

    @torch.no_grad()
    def predict(self, data: Sequence) -> tuple[Tensor, Tensor]:
        """``(outputs, targets)`` of the whole split in order, outputs in float32 on the CPU."""
        self.model.eval()
        outs, ys = [], []
        bs = self.config.eval_batch_size or self.config.batch_size
        for s in range(0, len(data), bs):
            batch = _to_device(self.collate([data[i] for i in range(s, min(s + bs, len(data)))]),
                               self.device)
            with self._autocast():
                out, _ = self.model(batch["x"], lengths=batch.get("lengths"))
            outs.append(out.float().cpu())
            ys.append(batch["y"].cpu())
        return torch.cat(outs), torch.cat(ys)

    @torch.no_grad()
    def evaluate(self, data: Sequence) -> dict[str, float]:
        """``{"loss": mean loss, **metrics(outputs, targets)}`` on a whole split."""
        out, y = self.predict(data)
        result = {"loss": float(self.loss_fn(out, y))}
        if self.metrics is not None:
            result.update({k: float(v) for k, v in self.metrics(out, y).items()})
        return result

    # -- which items, in which order -----------------------------------------------------------
    def _epoch_order(self, n: int) -> Tensor:
        """The epoch's global order of the ``n`` training items (the same on every process: the
        loader generator is seeded alike and saved in the checkpoint)."""
        return torch.randperm(n, generator=self._loader_gen) if self.config.shuffle \
            else torch.arange(n)

    def _local_order(self, perm: list[int]) -> tuple[list[int], int]:
        """This process's items of the global order and its batch size
        (:func:`gyre.train.distributed.shard`; all of them and ``batch_size`` alone)."""
        return _dist.shard(perm, self.config.batch_size, self.dist, self.config.shard)

    def _n_batches(self, n: int) -> int:
        order, bs = self._local_order(list(range(n)))
        return math.ceil(len(order) / bs)

    def _chunks_per_batch(self, train: Sequence) -> int:
        """Forward/backward passes (micro-steps) per batch: 1, or with ``tbptt`` the chunks of
        the first batch (a stream's batches all have one length), so a per-step schedule
        counts one step per chunk."""
        if not self.config.tbptt:
            return 1
        order, bs = self._local_order(list(range(len(train))))
        x = self.collate([train[i] for i in order[:bs]])["x"]
        return max(1, math.ceil(x.shape[1] / self.config.tbptt))

    # -- one epoch -------------------------------------------------------------------------------
    def _train_epoch(self, train: Sequence, loop: _Loop, n_batches: int, bar) -> bool:
        """Train the rest of ``loop.epoch`` from ``loop.batch``; True when stopped in it (the
        loop's position then says where)."""
        cfg = self.config
        self.model.train()
        if loop.perm is None:
            loop.perm = self._epoch_order(len(train))
            loop.batch, loop.running, loop.micro = 0, [0.0, 0], 0
        order, bs = self._local_order(loop.perm.tolist())
        self.optimizer.zero_grad(set_to_none=True)
        for b in range(loop.batch, n_batches):
            idx = order[b * bs:(b + 1) * bs]
            batch = _to_device(self.collate([train[i] for i in idx]), self.device)
            loop.micro = self._train_batch(batch, loop.running, loop.micro, loop.epoch, b,
                                           final=b == n_batches - 1)
            loop.batch = b + 1
            if bar is not None:  # redrawn by update() at most every mininterval
                bar.set_postfix_str(f"epoch {loop.epoch + 1}/{cfg.epochs} "
                                    f"loss {loop.running[0] / max(loop.running[1], 1):.4f}"
                                    + self._last_val_str(), refresh=False)
                bar.update(1)
            if loop.micro % cfg.accumulate == 0 and _dist.any_true(self._stop, self.device):
                return True
        if loop.micro % cfg.accumulate:
            self._optimizer_step()  # flush a partial accumulation at the epoch's end
        return False

    def _end_epoch(self, val: Sequence | None, loop: _Loop) -> dict:
        """The epoch's record (train loss over all processes, lr, validation metrics), the
        schedule's epoch step, best weights and early stopping; advances ``loop.epoch``."""
        cfg = self.config
        total, count = self._global_running(loop)
        record = {"epoch": loop.epoch + 1, "train_loss": total / max(count, 1),
                  "lr": self.optimizer.param_groups[0]["lr"]}
        if val is not None:
            record.update({f"val_{k}": v for k, v in self.evaluate(val).items()})
        self.history.append(record)
        if cfg.monitor not in record and val is not None:
            raise ValueError(f"monitor: got {cfg.monitor!r}, expected a key of the epoch "
                             f"record: {', '.join(sorted(record))}")
        score = record.get(cfg.monitor, record["train_loss"])
        if self.scheduler is not None and cfg.scheduler_interval == "epoch":
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(score)
            else:
                self.scheduler.step()
        if loop.best["score"] is None or self._better(score, loop.best["score"]):
            loop.best = {"score": float(score), "epoch": loop.epoch + 1,
                         "model": _clone_state_dict(self.model) if val is not None else None}
            loop.bad_epochs = 0
        else:
            loop.bad_epochs += 1
            if cfg.patience and loop.bad_epochs >= cfg.patience:
                loop.stopped_early = True
        loop.epoch += 1
        loop.perm, loop.batch, loop.running, loop.micro = None, 0, [0.0, 0], 0
        return record

    def _global_running(self, loop: _Loop) -> list:
        """The epoch's loss sum and item count so far, over all processes."""
        if not self.dist.active:
            return list(loop.running)
        total, count = _dist.all_sum([float(loop.running[0]), float(loop.running[1])],
                                     self.device)
        return [total, int(count)]

    # -- one batch -----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _sync(self, last_micro_step: bool):
        """The context of one micro-step's forward and backward: under DDP the gradients are
        all-reduced only in the backward of the last micro-step before an optimizer step
        (``no_sync`` in the others), so accumulation costs one all-reduce per step."""
        if self._net is self.model or last_micro_step:
            return contextlib.nullcontext()
        return self._net.no_sync()

    def _train_batch(self, batch: Batch, running: list, micro: int, epoch: int, b: int,
                     final: bool = False) -> int:
        """Forward and backward of one batch (chunk by chunk with ``tbptt``), an optimizer
        step after every ``accumulate`` micro-steps; ``final``: the epoch's last batch, whose
        last micro-step ends the epoch's accumulation. Returns the micro-step count."""
        cfg = self.config
        x, y, lengths = batch["x"], batch["y"], batch.get("lengths")
        B = x.shape[0]
        if cfg.tbptt:
            if lengths is not None:
                raise ValueError("tbptt: truncated BPTT needs equal-length sequences; got a batch "
                                 "with 'lengths' (use full BPTT, tbptt=0, for variable length)")
            if y.dim() < 2 or y.shape[:2] != x.shape[:2]:
                raise ValueError(f"tbptt: needs one target per step, y of shape (B, T, ...) "
                                 f"matching x {tuple(x.shape[:2])}; got y {tuple(y.shape)}")
            chunks = [(x[:, s:s + cfg.tbptt], y[:, s:s + cfg.tbptt])
                      for s in range(0, x.shape[1], cfg.tbptt)]
        else:
            chunks = [(x, y)]
        state = None
        for c, (xc, yc) in enumerate(chunks):
            last = (micro + 1) % cfg.accumulate == 0 or (final and c == len(chunks) - 1)
            with self._sync(last):
                with self._autocast():
                    out, state = self._net(xc, state, lengths=lengths)
                loss = self.loss_fn(_to_float(out), yc)
                value = float(loss.detach())
                if not math.isfinite(value):
                    where = f"epoch {epoch + 1}, batch {b + 1}" + (
                        f", tbptt chunk {c + 1}" if cfg.tbptt else "")
                    kept = ("no checkpoint was written yet" if not self.history else
                            f"the last good checkpoint (epoch {len(self.history)}) is kept"
                            + (f" at {self.checkpoint_path}" if self.checkpoint_path else ""))
                    raise NonFiniteLossError(
                        f"loss: got {value} at {where}; training stopped and {kept}. Try a "
                        "lower lr, clip_norm, or check the data for NaN/inf")
                (loss / cfg.accumulate).backward()
            state = _upcast(detach_state(state))
            running[0] += value * B
            running[1] += B
            micro += 1
            if micro % cfg.accumulate == 0:
                self._optimizer_step()
        return micro

    def _optimizer_step(self) -> None:
        cfg = self.config
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.clip_value:
            torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
        if cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None and cfg.scheduler_interval == "step":
            self.scheduler.step()
        if self.callback is not None:
            self.callback(self, "step", {"global_step": self.global_step})

    # -- optimizer and schedule ------------------------------------------------------------------
    def _make_scheduler(self, n_batches: int):
        return build_scheduler(self.optimizer, self.config, n_batches)

    def _load_scheduler(self, state: dict) -> None:
        load_scheduler_state(self.scheduler, self.optimizer, state, self.config)

    def _rescale_lr(self, factor: float) -> None:
        rescale_lr(self.optimizer, self.scheduler, factor)

    # -- checkpoint I/O ----------------------------------------------------------------------------
    def _checkpoint(self, epoch, batch, perm, running, micro, best, bad_epochs, stopped_early):
        return {
            "format": _FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": _rng_state(),
            "loader_rng": self._loader_gen.get_state(),
            "epoch": epoch, "batch": batch, "perm": perm, "running": list(running),
            "micro": micro, "global_step": self.global_step,
            "history": list(self.history), "best": best, "bad_epochs": bad_epochs,
            "stopped_early": stopped_early,
            "config": dataclasses.asdict(self.config),
            "extra": self.extra,
        }

    def _save(self, *args) -> None:
        if self.writes:
            save_checkpoint(self._checkpoint(*args), self.out_dir / CHECKPOINT)

    def _load_for_resume(self) -> dict:
        if self.out_dir is None:
            raise ValueError("resume: needs out_dir, the run directory holding 'checkpoint'")
        path = self.out_dir / CHECKPOINT
        ckpt = load_checkpoint(path, map_location=self.device)
        old = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
        fixed = "a resumed run continues the checkpoint's model and optimizer state"
        if _optimizer_class(str(old.get("optimizer", self.config.optimizer))) is not \
                _optimizer_class(self.config.optimizer):
            raise ValueError(f"resume: optimizer {self.config.optimizer!r} differs from the "
                             f"checkpoint's {old.get('optimizer')!r} in {str(path)!r}; {fixed}, "
                             "so the optimizer type cannot change (start a new run instead)")
        if (ckpt["scheduler"] is None) != (self.scheduler is None) or (
                self.scheduler is not None and _scheduler_spec(str(old.get("scheduler", "none")))
                is not type(self.scheduler)):
            raise ValueError(f"resume: scheduler {self.config.scheduler!r} differs from the "
                             f"checkpoint's {old.get('scheduler')!r} in {str(path)!r}; {fixed}, "
                             "so the scheduler cannot change (start a new run instead)")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise ValueError(f"resume: the model does not match the checkpoint in {str(path)!r} "
                             f"(the architecture cannot change on resume): {detail[:300]}") from None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"resume: the optimizer state in {str(path)!r} does not fit this "
                             f"model's parameters ({type(e).__name__}: {e})") from None
        if self.scheduler is not None:
            self._load_scheduler(ckpt["scheduler"])
        old_lr = old.get("lr")
        if isinstance(old_lr, int | float) and old_lr > 0 and old_lr != self.config.lr:
            self._rescale_lr(self.config.lr / old_lr)
        _set_rng_state(ckpt["rng"])
        self._loader_gen.set_state(ckpt["loader_rng"])
        self.history = list(ckpt["history"])
        self.global_step = ckpt["global_step"]
        return ckpt

    # -- logs and progress ---------------------------------------------------------------------
    def _better(self, a: float, b: float) -> bool:
        return a < b if self.config.mode == "min" else a > b

    def _last_val_str(self) -> str:
        if not self.history:
            return ""
        last = self.history[-1]
        parts = [f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_")]
        return (" | " + " ".join(parts)) if parts else ""

    def _progress(self, loop: _Loop, n_batches: int):
        if not self.config.progress or not self.dist.main:
            return None
        try:
            from tqdm.auto import tqdm
        except ModuleNotFoundError:
            raise ValueError("progress: the progress bar needs tqdm (pip install 'gyre[tasks]'), "
                             "or set progress=False") from None
        total = self.config.epochs * n_batches
        return tqdm(total=total, initial=min(loop.epoch * n_batches + loop.batch, total),
                    desc="train", unit="batch", dynamic_ncols=True, leave=True,
                    # a log file (not a terminal) gets a line every 30 s instead of every redraw
                    mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def _result(self, best, stopped_early, interrupted) -> dict:
        return {"history": list(self.history), "best_epoch": best["epoch"],
                "best_score": best["score"], "stopped_early": stopped_early,
                "interrupted": interrupted, "epochs_run": len(self.history)}

    def _tensorboard(self, purge_step):
        if not self.writes or not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            raise ValueError("tensorboard: logging needs the tensorboard package (pip install "
                             "'gyre[tasks]'), or set tensorboard=False") from None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def _write_logs(self, writer, record: dict) -> None:
        if writer is not None:
            for k, v in record.items():
                if k != "epoch":
                    writer.add_scalar(k, v, record["epoch"])
            writer.flush()
        if self.writes and self.config.csv:
            keys = list(dict.fromkeys(k for r in self.history for k in r))
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
            _atomic_write_bytes(self.out_dir / "log.csv", buf.getvalue().encode())

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop:  # second Ctrl-C: stop now
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self._stop = True
            msg = "\ninterrupt: saving a checkpoint at the next step (Ctrl-C again to abort)"
            print(msg, flush=True)

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)


@dataclass
class _Loop:
    """Where training stands: the epoch, the next batch in it, the epoch's order (None before
    it is drawn), the loss sum and count so far, micro-steps since the epoch began, the best
    score so far and the epochs since it improved."""

    epoch: int = 0
    batch: int = 0
    perm: Tensor | None = None
    running: list = field(default_factory=lambda: [0.0, 0])
    micro: int = 0
    best: dict = field(default_factory=lambda: {"score": None, "epoch": 0, "model": None})
    bad_epochs: int = 0
    stopped_early: bool = False


def _to_float(out):
    if isinstance(out, Tensor) and out.is_floating_point() and out.dtype != torch.float32 \
            and out.dtype != torch.float64:
        return out.float()
    return out


def _upcast(state):
    """Carried state back to float32 after a bf16-autocast chunk (the layer's dtype)."""
    if isinstance(state, Tensor):
        return state.float() if state.dtype == torch.bfloat16 else state
    if isinstance(state, tuple | list):
        return type(state)(_upcast(s) for s in state)
    return state


def _default_collate(items: list) -> Batch:
    """Stack ``(x, y)`` pairs into ``{"x": (B, ...), "y": (B, ...)}``."""
    xs, ys = zip(*items, strict=True)
    return {"x": torch.stack([torch.as_tensor(v) for v in xs]),
            "y": torch.stack([torch.as_tensor(v) for v in ys])}
