"""The Trainer: BPTT / truncated BPTT, clipping, accumulation, early stopping, checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pickle
import random
import re
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

#: file name of the checkpoint inside a run directory
CHECKPOINT = "checkpoint"
_FORMAT = "gyre-checkpoint-1"
#: the keys every checkpoint the Trainer writes holds
CHECKPOINT_KEYS = ("format", "model", "optimizer", "scheduler", "rng", "loader_rng", "epoch",
                   "batch", "perm", "running", "micro", "global_step", "history", "best",
                   "bad_epochs", "stopped_early", "config", "extra")

Batch = dict[str, Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """How to train. ``0`` switches an option off where noted.

    Attributes:
        epochs: passes over the training data.
        batch_size: sequences per micro-batch (``eval_batch_size``: for evaluation, 0 = same).
        lr, weight_decay: learning rate and weight decay given to the optimizer.
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
        monitor, mode: the history key that defines "best" (``val_loss``, ``val_accuracy``...)
            and whether lower (``min``) or higher (``max``) is better.
        restore_best: load the best epoch's weights at the end (needs a validation split).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        bf16: bfloat16 autocast for forward passes (CPU or CUDA).
        seed: seeds the global RNGs at the start of a fresh run and the shuffling generator.
        shuffle: shuffle the training data every epoch.
        progress, tensorboard, csv: a tqdm bar; ``DIR/tensorboard`` events; ``DIR/log.csv``.
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
        _optimizer_class(self.optimizer)
        _scheduler_spec(self.scheduler)
        resolve_device(self.device, check_available=False)


# -- helpers ------------------------------------------------------------------------------------
def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: got {v!r}, expected an int >= {low}")


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


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


_TMP = re.compile(r"\.(.+)\.tmp-(\d+)")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.tmp-PID`` files that an atomic write killed half-way left in
    ``directory`` (a kill -9 during a checkpoint write), where process PID no longer runs.
    Returns the paths removed."""
    d = Path(directory)
    removed = []
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        m = _TMP.fullmatch(f.name)
        if m and f.is_file() and not _alive(int(m.group(2))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (atomic on POSIX)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint without executing code (``weights_only=True``), with a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} does not exist (expected a run "
                                "directory holding 'checkpoint', or the file itself)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file, or one that carries code
        raise ValueError(f"checkpoint: {str(path)!r} could not be read as a gyre checkpoint "
                         f"({_load_failure(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"checkpoint: {str(path)!r} is not a gyre checkpoint (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else None!r}, "
                         f"expected {_FORMAT!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint: {str(path)!r} has the gyre format tag but lacks "
                         f"{', '.join(missing)}; it was not written by gyre's Trainer (or was "
                         "edited), so it cannot be loaded or resumed")
    return ckpt


def _load_failure(e: Exception) -> str:
    """torch.load's error, reduced to what applies: its advice to retry with
    ``weights_only=False`` would run any code the file carries, so it is never repeated."""
    text = str(e)
    if "weights_only" in text or isinstance(e, pickle.UnpicklingError):
        return ("it holds Python objects other than tensors and plain data; gyre loads "
                "checkpoints with weights_only=True and never runs code from one")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
        if config is None:
            config = TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: got {type(config).__name__}, expected a TrainConfig")
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.collate = collate or _default_collate
        self.metrics = metrics
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.extra = extra or {}
        self.callback = callback
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: has no trainable parameters")
        opts = {"lr": config.lr, **config.optimizer_options}
        if config.weight_decay:
            opts["weight_decay"] = config.weight_decay
        self.optimizer = _optimizer_class(config.optimizer)(params, **opts)
        self.scheduler = None
        self.history: list[dict] = []
        self.global_step = 0
        self._stop = False
        self._loader_gen = torch.Generator().manual_seed(config.seed)

    # -- public ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask :meth:`fit` to save a checkpoint and return at the next optimizer-step boundary."""
        self._stop = True

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT

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
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
        n_batches = math.ceil(n / cfg.batch_size)
        self.scheduler = self._make_scheduler(n_batches)

        pos = {"epoch": 0, "batch": 0, "perm": None, "running": [0.0, 0], "micro": 0}
        best = {"score": None, "epoch": 0, "model": None}
        bad_epochs, stopped_early = 0, False
        if resume:
            ckpt = self._load_for_resume()
            pos = {k: ckpt[k] for k in ("epoch", "batch", "perm", "running", "micro")}
            best, bad_epochs = ckpt["best"], ckpt["bad_epochs"]
            # the patience now in force decides (a longer one continues a run that stopped)
            stopped_early = bool(cfg.patience) and bad_epochs >= cfg.patience
        else:
            seed_everything(cfg.seed)
            self._loader_gen.manual_seed(cfg.seed)
            self.history, self.global_step = [], 0

        if self.callback is not None:
            self.callback(self, "start", {"resumed": resume, "epoch": pos["epoch"]})
        writer = self._tensorboard(purge_step=pos["epoch"] + 1 if resume else None)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.epochs * n_batches, initial=min(
                pos["epoch"] * n_batches + pos["batch"], cfg.epochs * n_batches),
                desc="train", unit="batch", dynamic_ncols=True, leave=True,
                # a log file (not a terminal) gets a line every 30 s instead of every redraw
                mininterval=0.1 if sys.stderr.isatty() else 30.0)
        self._stop = False
        restore = self._install_sigint()
        interrupted = False
        try:
            epoch = pos["epoch"]
            while epoch < cfg.epochs and not stopped_early:
                self.model.train()
                if pos["perm"] is None:
                    perm = (torch.randperm(n, generator=self._loader_gen) if cfg.shuffle
                            else torch.arange(n))
                    start, running, micro = 0, [0.0, 0], 0
                else:
                    perm, start = pos["perm"], pos["batch"]
                    running, micro = list(pos["running"]), pos["micro"]
                pos["perm"] = None
                self.optimizer.zero_grad(set_to_none=True)
                for b in range(start, n_batches):
                    idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()
                    batch = _to_device(self.collate([train[i] for i in idx]), self.device)
                    micro = self._train_batch(batch, running, micro, epoch, b)
                    if bar is not None:  # redrawn by update() at most every mininterval
                        bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} "
                                            f"loss {running[0] / max(running[1], 1):.4f}"
                                            + self._last_val_str(), refresh=False)
                        bar.update(1)
                    if self._stop and micro % cfg.accumulate == 0:
                        self._save(epoch, b + 1, perm, running, micro, best, bad_epochs,
                                   stopped_early)
                        interrupted = True
                        return self._result(best, stopped_early, interrupted)
                if micro % cfg.accumulate:
                    self._optimizer_step()  # flush a partial accumulation at the epoch's end
                micro = 0
                record = {"epoch": epoch + 1, "train_loss": running[0] / max(running[1], 1),
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
                if best["score"] is None or self._better(score, best["score"]):
                    best = {"score": float(score), "epoch": epoch + 1,
                            "model": _clone_state_dict(self.model) if val is not None else None}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                    if cfg.patience and bad_epochs >= cfg.patience:
                        stopped_early = True
                epoch += 1
                self._save(epoch, 0, None, [0.0, 0], 0, best, bad_epochs, stopped_early)
                self._write_logs(writer, record)
                if self.callback is not None:
                    self.callback(self, "epoch", record)
                if self._stop:
                    interrupted = epoch < cfg.epochs and not stopped_early
                    break
        finally:
            restore()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if not interrupted and cfg.restore_best and best["model"] is not None:
            self.model.load_state_dict(best["model"])
        return self._result(best, stopped_early, interrupted)

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

    # -- one batch -----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _train_batch(self, batch: Batch, running: list, micro: int, epoch: int, b: int) -> int:
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
            with self._autocast():
                out, state = self.model(xc, state, lengths=lengths)
            loss = self.loss_fn(_to_float(out), yc)
            value = float(loss.detach())
            if not math.isfinite(value):
                where = f"epoch {epoch + 1}, batch {b + 1}" + (
                    f", tbptt chunk {c + 1}" if cfg.tbptt else "")
                kept = ("no checkpoint was written yet" if not self.history else
                        f"the last good checkpoint (epoch {len(self.history)}) is kept"
                        + (f" at {self.checkpoint_path}" if self.checkpoint_path else ""))
                raise NonFiniteLossError(
                    f"loss: got {value} at {where}; training stopped and {kept}. Try a lower lr, "
                    "clip_norm, or check the data for NaN/inf")
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

    # -- internals -----------------------------------------------------------------------------
    def _better(self, a: float, b: float) -> bool:
        return a < b if self.config.mode == "min" else a > b

    def _last_val_str(self) -> str:
        if not self.history:
            return ""
        last = self.history[-1]
        parts = [f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_")]
        return (" | " + " ".join(parts)) if parts else ""

    def _make_scheduler(self, n_batches: int):
        cfg = self.config
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
            return cls(self.optimizer, **opts)
        except TypeError as e:
            raise ValueError(f"scheduler_options: {cls.__name__} rejected {opts}: {e}") from e

    #: scheduler state that :meth:`_make_scheduler` derives from the run's length
    _LENGTH_KEYS = {"CosineAnnealingLR": ("T_max",), "OneCycleLR": ("total_steps", "_schedule_phases"),
                    "StepLR": ("step_size",)}

    def _load_scheduler(self, state: dict) -> None:
        """Load a checkpoint's scheduler state. Where the schedule's length came from the
        number of epochs (not from ``scheduler_options``) and the run is now longer or shorter,
        the schedule is re-planned for the new length from the current step on: position and
        base rates come from the checkpoint, the length from the new config."""
        sched = self.scheduler
        keys = [k for k in self._LENGTH_KEYS.get(type(sched).__name__, ())
                if k not in self.config.scheduler_options]
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
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = list(lrs)

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
        if self.out_dir is not None:
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

    def _rescale_lr(self, factor: float) -> None:
        """A new ``lr`` on resume: every rate the optimizer and scheduler hold (the current
        one, a schedule's base, peak and floor) is multiplied by new/old, so the schedule keeps
        its shape and position at the new scale."""
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if isinstance(group.get(key), int | float | Tensor):
                    group[key] = group[key] * factor
        sched = self.scheduler
        if sched is None:
            return
        for attr in ("base_lrs", "_last_lr", "min_lrs"):
            if isinstance(getattr(sched, attr, None), list):
                setattr(sched, attr, [v * factor for v in getattr(sched, attr)])
        if isinstance(getattr(sched, "eta_min", None), int | float):
            sched.eta_min = sched.eta_min * factor

    def _result(self, best, stopped_early, interrupted) -> dict:
        return {"history": list(self.history), "best_epoch": best["epoch"],
                "best_score": best["score"], "stopped_early": stopped_early,
                "interrupted": interrupted, "epochs_run": len(self.history)}

    def _tensorboard(self, purge_step):
        if self.out_dir is None or not self.config.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def _write_logs(self, writer, record: dict) -> None:
        if writer is not None:
            for k, v in record.items():
                if k != "epoch":
                    writer.add_scalar(k, v, record["epoch"])
            writer.flush()
        if self.out_dir is not None and self.config.csv:
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
