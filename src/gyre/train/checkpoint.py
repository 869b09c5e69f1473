"""Checkpoint I/O: atomic writes, loading without running code, RNG state, stale temporaries."""

from __future__ import annotations

import io
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

#: file name of the checkpoint inside a run directory
CHECKPOINT = "checkpoint"
_FORMAT = "gyre-checkpoint-1"
#: the keys every checkpoint the Trainer writes holds
CHECKPOINT_KEYS = ("format", "model", "optimizer", "scheduler", "rng", "loader_rng", "epoch",
                   "batch", "perm", "running", "micro", "global_step", "history", "best",
                   "bad_epochs", "stopped_early", "config", "extra")
_TMP = re.compile(r"\.(.+)\.tmp-(\d+)")


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
    if "Unsupported operand" in text or isinstance(e, EOFError) or (
            isinstance(e, OSError) and not isinstance(e, PermissionError)):
        return ("it is truncated or not a torch checkpoint at all: a file of another kind, or "
                "one cut short")
    if "weights_only" in text or isinstance(e, pickle.UnpicklingError):
        return ("it holds Python objects other than tensors and plain data; gyre loads "
                "checkpoints with weights_only=True and never runs code from one")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
