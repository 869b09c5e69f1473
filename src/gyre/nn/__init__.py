"""torch.nn-compatible recurrent layers."""

from .layers import GRU, LSTM, RNN
from .recurrent import Recurrent

__all__ = ["RNN", "LSTM", "GRU", "Recurrent"]
