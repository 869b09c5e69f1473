"""Deployment formats: ONNX (:func:`onnx`, run back with :class:`OnnxModel`) and
``torch.export`` (:func:`torch_export`).

Export starts from an ``nn/`` layer (:class:`gyre.nn.Recurrent` and its subclasses) or from a
task's model that offers the export hook (see :mod:`gyre.export.onnx`); it never reaches into
the engine.
"""

from __future__ import annotations

from .onnx import MIN_OPSET, MissingExtraError, OnnxModel, max_opset, onnx, torch_export

__all__ = ["onnx", "OnnxModel", "torch_export", "MIN_OPSET", "max_opset", "MissingExtraError"]
