"""gyre: recurrent neural networks on PyTorch."""
