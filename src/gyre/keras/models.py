"""``keras.models``, for programs that import ``Sequential``/``Model``/``load_model`` beside
``gyre.keras.layers``, with gyre's :class:`~gyre.keras.Sequential` and :class:`~gyre.keras.Model`
(Keras's, with a lean ``fit``: see :mod:`gyre.keras.training`) in place of Keras's; loading finds
gyre's layers and models, which are registered with Keras."""

from __future__ import annotations

import keras as _keras

from . import Model, Sequential  # noqa: F401  (re-exported; registers gyre's classes)

globals().update({k: getattr(_keras.models, k) for k in dir(_keras.models)
                  if not k.startswith("_") and k not in ("Model", "Sequential")})

__all__ = sorted(k for k in dir(_keras.models) if not k.startswith("_"))
