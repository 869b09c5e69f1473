"""``keras.layers`` with gyre's :class:`~gyre.keras.LSTM`, :class:`~gyre.keras.GRU`,
:class:`~gyre.keras.SimpleRNN` and :class:`~gyre.keras.Recurrent` in place of Keras's, so a
Keras program changes only its import."""

from __future__ import annotations

import keras as _keras

from . import GRU, LSTM, Bidirectional, Recurrent, SimpleRNN  # noqa: F401  (re-exported)

globals().update({k: getattr(_keras.layers, k) for k in dir(_keras.layers)
                  if not k.startswith("_") and k not in globals()})

__all__ = sorted({k for k in dir(_keras.layers) if not k.startswith("_")}
                 | {"LSTM", "GRU", "SimpleRNN", "Recurrent", "Bidirectional"})
