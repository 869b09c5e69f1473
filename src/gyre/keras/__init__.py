"""Keras 3 layers run by gyre's engine: ``from gyre.keras.layers import LSTM`` where a Keras text
writes ``from tensorflow.keras.layers import LSTM`` (and ``gyre.keras.models`` for
``keras.models``).

:class:`LSTM`, :class:`GRU` and :class:`SimpleRNN` are Keras's own layers (subclasses of
``keras.layers.LSTM`` / ``GRU`` / ``SimpleRNN``: the same constructor, weights, initializers,
regularizers, constraints, config, ``get_weights``/``set_weights`` layout, ``model.save``),
whose loop over time runs on :func:`gyre.engine.run` instead of Keras's per-step Python loop.
:class:`Sequential` and :class:`Model` are Keras's models with a lean ``fit``
(:mod:`gyre.keras.training`).
:class:`Recurrent` runs any gyre cell by name. Needs Keras 3 on its torch backend
(``pip install 'gyre[keras]'``, ``KERAS_BACKEND=torch``); when no backend is chosen yet
(``KERAS_BACKEND`` unset and Keras not imported), importing this module chooses torch.
"""

from __future__ import annotations

import os
import sys

_NEED = "gyre.keras needs Keras 3 on its torch backend"

if "keras" not in sys.modules and "KERAS_BACKEND" not in os.environ:
    os.environ["KERAS_BACKEND"] = "torch"
try:
    import keras as _keras
except ImportError as e:
    raise ImportError(f"{_NEED}: importing Keras failed ({e}); pip install 'gyre[keras]'") from None
if not hasattr(_keras, "backend") or not _keras.__version__.startswith("3."):
    raise ImportError(f"{_NEED}: found Keras {getattr(_keras, '__version__', '?')}; "
                      "pip install 'gyre[keras]'")
if _keras.backend.backend() != "torch":
    raise ImportError(f"{_NEED}: Keras runs on the {_keras.backend.backend()!r} backend; set "
                      "KERAS_BACKEND=torch before Keras is first imported")

from .rnn import GRU, LSTM, Recurrent, SimpleRNN  # noqa: E402
from .training import Model, Sequential  # noqa: E402

Bidirectional = _keras.layers.Bidirectional

__all__ = ["LSTM", "GRU", "SimpleRNN", "Recurrent", "Bidirectional", "Sequential", "Model"]
