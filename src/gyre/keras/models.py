"""``keras.models``, for programs that import ``Sequential``/``Model``/``load_model`` beside
``gyre.keras.layers`` (loading finds gyre's layers, which are registered with Keras)."""

from __future__ import annotations

import keras as _keras

from . import LSTM  # noqa: F401  (registers gyre's layers with Keras's serialization)

globals().update({k: getattr(_keras.models, k) for k in dir(_keras.models) if not k.startswith("_")})

__all__ = sorted(k for k in dir(_keras.models) if not k.startswith("_"))
