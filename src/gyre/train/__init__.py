"""Training: :class:`Trainer` and its :class:`TrainConfig`.

The contract between a task and the Trainer:

* **Data** is any map-style dataset (``len()`` and ``[i]``) plus a ``collate(items) -> batch``
  function. A *batch* is a ``dict`` of tensors with ``"x"`` (batch-first ``(B, T, I)``),
  ``"y"`` (targets) and optionally ``"lengths"`` (``(B,)`` int64, for padded variable-length
  batches). The Trainer shuffles with its own seeded generator, so a run is reproducible and
  a resumed run sees exactly the batches an uninterrupted one would.
* **The model** is an ``nn.Module`` whose forward is
  ``model(x, state=None, *, lengths=None) -> (output, state)``: it takes and returns the
  recurrent state (any tensor or nested tuple/list of tensors; ``None`` for a model without
  one). Full BPTT calls it once per batch with ``state=None``. Truncated BPTT
  (``tbptt=k``) cuts ``x`` and ``y`` along time (dim 1) into chunks of ``k`` steps, calls the
  model chunk by chunk with the previous chunk's state detached, and backpropagates each
  chunk's loss; every chunk counts as one micro-step towards ``accumulate``.
* **The loss** is ``loss_fn(output, y) -> scalar`` (mean over the batch); ``metrics`` is an
  optional ``metrics(outputs, targets) -> dict[str, float]`` computed on the concatenated
  outputs of a whole evaluation split.

Checkpoints (``DIR/checkpoint``) hold model, optimizer, scheduler, RNG and loader state,
epoch, history and best weights, are written atomically and loaded with
``torch.load(weights_only=True)``; see :meth:`Trainer.fit` for resume and interruption.

Modules: :mod:`.trainer` (the epoch loop), :mod:`.checkpoint` (checkpoint I/O), :mod:`.optim`
(optimizer and schedule building, re-planning on resume), :mod:`.distributed` (data parallel
over processes started by ``torchrun``: the Trainer wraps the model in DDP when a process group
is initialized).
"""

from . import distributed
from .trainer import (
    CHECKPOINT,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    detach_state,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_device,
    save_checkpoint,
    seed_everything,
)

__all__ = [
    "CHECKPOINT", "NonFiniteLossError", "Trainer", "TrainConfig", "detach_state",
    "load_checkpoint", "resolve_device", "save_checkpoint", "seed_everything", "distributed",
    "remove_stale_temporaries",
]
