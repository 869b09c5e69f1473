"""A convolutional front-end for padded batches of sequences: Conv1d blocks whose output for
each sequence is exactly what that sequence gives alone, whatever the batch's padding.

Shapes are batch-first: ``x`` is ``(B, T, C)``, ``lengths`` is ``(B,)`` int64 or None (every
step valid). A convolution of kernel ``k`` and stride ``s`` pads ``(k - 1) // 2`` zeros on the
left and ``k - 1 - (k - 1) // 2`` on the right (torch's ``padding="same"`` for ``s = 1``), so a
sequence of length ``L`` gives ``ceil(L / s)`` steps. Padded steps are zeroed before every
convolution (a sequence alone sees zeros past its end too) and batch statistics are taken over
valid steps only (:class:`MaskedBatchNorm1d`), so padding changes nothing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .heads import valid_mask


def conv_lengths(lengths: Tensor | None, stride: int) -> Tensor | None:
    """Valid output steps of a stride-``stride`` front-end layer: ``ceil(lengths / stride)``."""
    # (v + s - 1) // s, not -(-v // s): ONNX's integer Div truncates, so the latter would not
    # trace (gyre.export.onnx)
    return lengths if lengths is None or stride == 1 else (lengths + stride - 1) // stride


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` over ``(B, T, F)`` whose training statistics (and running
    estimates) come from the valid steps only; padded steps come out as zero."""

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:  # type: ignore[override]
        mask = valid_mask(x, lengths)
        if mask is None:
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        if self.training:
            m = mask.to(x.dtype)
            n = m.sum()
            mean = (x * m).sum((0, 1)) / n
            var = (((x - mean) * m) ** 2).sum((0, 1)) / n
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked += 1
                    unbiased = var * (n / (n - 1).clamp_min(1))
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.masked_fill(~mask, 0.0)


class ConvFrontEnd(nn.Module):
    """Conv1d - masked batch norm - ReLU blocks (FCN-style, Wang et al. 2017), optionally
    multi-scale (InceptionTime-style parallel kernels, Ismail Fawaz et al. 2020) and dilated.

    Args:
        in_channels: input features ``C``.
        channels, kernels: one entry per block (output channels, kernel size). A block's
            kernel may be a tuple of sizes: parallel convolutions of those sizes, each
            ``channels`` wide, whose outputs are concatenated (``len * channels`` features).
        stride: stride of the first block (``>= 1``; a kernel shorter than the stride is
            widened to it so no step is skipped); the others have stride 1.
        dilations: one per block (default all 1); a kernel ``k`` of dilation ``d`` spans
            ``d * (k - 1) + 1`` steps and is padded as a kernel of that size.

    ``forward(x (B, T, C), lengths=None) -> (y (B, ceil(T / stride), out_channels),
    out_lengths)``, ``out_lengths = ceil(lengths / stride)`` (None when ``lengths`` is)."""

    def __init__(self, in_channels: int, channels: Sequence[int] = (64, 64, 64),
                 kernels: Sequence[int | Sequence[int]] = (8, 5, 3), stride: int = 1,
                 dilations: Sequence[int] | None = None) -> None:
        super().__init__()
        dilations = [1] * len(channels) if dilations is None else list(dilations)
        if len(channels) != len(kernels) or len(dilations) != len(channels) or not channels:
            raise ValueError(f"channels, kernels, dilations: got {list(channels)}, "
                             f"{list(kernels)} and {dilations}, expected lists of the same "
                             "non-zero length")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride: got {stride!r}, expected an int >= 1")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
            raise ValueError(f"dilations: got {dilations}, expected ints >= 1")
        self.stride = stride
        # every block as a tuple of parallel kernel sizes; the first block's widened to stride
        ks = [tuple(int(k) for k in (kk if isinstance(kk, Sequence) else (kk,)))
              for kk in kernels]
        ks[0] = tuple(max(k, stride) for k in ks[0])
        self.kernels = [k[0] if len(k) == 1 else k for k in ks]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = in_channels
        for i, (c, k, d) in enumerate(zip(channels, ks, dilations, strict=True)):
            branch = [nn.Conv1d(c_in, int(c), kb, stride=stride if i == 0 else 1, dilation=d)
                      for kb in k]
            # a one-kernel block stays a bare Conv1d: the state-dict keys of runs saved before
            # multi-scale blocks existed ("front.convs.0.weight") still load
            self.convs.append(branch[0] if len(k) == 1 else nn.ModuleList(branch))
            c_in = int(c) * len(k)
            self.norms.append(MaskedBatchNorm1d(c_in))
        self.out_channels = c_in

    def out_lengths(self, lengths: Tensor | None) -> Tensor | None:
        return conv_lengths(lengths, self.stride)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        for i, (convs, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            mask = valid_mask(x, lengths)
            if mask is not None:
                x = x.masked_fill(~mask, 0.0)
            xt = x.transpose(1, 2)
            outs = []
            for conv in convs if isinstance(convs, nn.ModuleList) else (convs,):
                # the span d * (k - 1) + 1, padded as "same": every branch gives ceil(T / s)
                span = conv.dilation[0] * (conv.kernel_size[0] - 1)
                left = span // 2
                outs.append(conv(nn.functional.pad(xt, (left, span - left))))
            x = (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).transpose(1, 2)
            if i == 0:
                lengths = conv_lengths(lengths, self.stride)
            x = torch.relu(norm(x, lengths))
        return x, lengths


def pool_frames(x: Tensor, lengths: Tensor | None, k: int) -> tuple[Tensor, Tensor | None]:
    """Masked average over non-overlapping windows of ``k`` steps: ``(B, T, F)`` ->
    ``(B, ceil(T / k), F)``, each window the mean of its valid steps; lengths ``ceil(L / k)``."""
    if k == 1:
        return x, lengths
    B, T, F = x.shape
    n = (T + k - 1) // k
    mask = valid_mask(x, lengths)
    m = torch.ones(B, T, 1, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    # padded even by 0 steps: no branch on the length, so an ONNX trace keeps T dynamic
    x = nn.functional.pad(x, (0, 0, 0, n * k - T))
    m = nn.functional.pad(m, (0, 0, 0, n * k - T))
    s = (x * m).reshape(B, n, k, F).sum(2)
    c = m.reshape(B, n, k, 1).sum(2)
    return s / c.clamp_min(1), conv_lengths(lengths, k)


__all__ = ["ConvFrontEnd", "MaskedBatchNorm1d", "conv_lengths", "pool_frames"]
