"""Pooling heads shared by every task that reads a whole sequence into one vector
(classification, regression, sentiment): masked mean and max over valid steps, the last valid
step per direction, and ``"+"``-joined combinations of them.

Shapes: ``out`` is ``(B, T, D*O)`` batch-first (``D`` directions of ``O`` features),
``lengths`` is ``(B,)`` int64 or None (every step valid)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

HEADS = ("mean", "last", "max")


def valid_mask(x: Tensor, lengths: Tensor | None) -> Tensor | None:
    """``(B, T, 1)`` True at valid steps, or None when every step is valid."""
    if lengths is None:
        return None
    steps = torch.arange(x.shape[1], device=x.device)
    return (steps[None, :] < lengths.to(x.device)[:, None]).unsqueeze(-1)


def pool(out: Tensor, lengths: Tensor | None, how: str) -> Tensor:
    """``(B, T, F)`` -> ``(B, F)``: the mean or max over the valid steps."""
    mask = valid_mask(out, lengths)
    if how == "mean":
        if mask is None:
            return out.mean(1)
        return (out * mask).sum(1) / mask.sum(1).clamp_min(1)
    if how == "max":
        return (out if mask is None else out.masked_fill(~mask, -torch.inf)).amax(1)
    raise ValueError(f"head: got {how!r}, expected one of mean, max")


def last_step(out: Tensor, lengths: Tensor | None, dirs: int) -> Tensor:
    """The forward direction's output at the last valid step, the reverse direction's at the
    first (which has read the whole sequence): ``(B, T, D*O)`` -> ``(B, D*O)``."""
    B, T = out.shape[:2]
    O = out.shape[2] // dirs
    last = (torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths).to(out.device) - 1
    feats = out[torch.arange(B, device=out.device), last, :O]
    return feats if dirs == 1 else torch.cat([feats, out[:, 0, O:]], dim=1)


def head_parts(head: str) -> list[str]:
    """``"last+mean"`` -> ``["last", "mean"]``, checked against :data:`HEADS`."""
    parts = head.split("+") if isinstance(head, str) else []
    if not parts or any(p not in HEADS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"head: got {head!r}, expected one of {', '.join(HEADS)} or several "
                         "joined by '+' (e.g. 'last+mean'), each at most once")
    return parts


class SequencePool(nn.Module):
    """The features of ``head`` (``mean``, ``last``, ``max`` or several joined by ``+``)
    concatenated: ``forward(out (B, T, D*O), lengths) -> (B, len(parts)*D*O)``."""

    def __init__(self, head: str, dirs: int) -> None:
        super().__init__()
        self.parts = head_parts(head)
        self.dirs = dirs

    def features(self, width: int) -> int:
        """Output width for recurrent outputs of ``width = D*O`` features."""
        return len(self.parts) * width

    def forward(self, out: Tensor, lengths: Tensor | None = None) -> Tensor:
        feats = [last_step(out, lengths, self.dirs) if p == "last" else pool(out, lengths, p)
                 for p in self.parts]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
