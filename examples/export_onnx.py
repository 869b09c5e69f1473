"""Export a stacked bidirectional layer of a variant cell to ONNX and run it in onnxruntime
(needs ``pip install 'gyre[deploy]'``). The README's deployment snippet is this file's code."""

import tempfile

import torch

import gyre.nn
from gyre.export import OnnxModel, onnx

path = f"{tempfile.mkdtemp()}/m.onnx"
lstm = gyre.nn.Recurrent("gated_004", 12, 64, num_layers=2, bidirectional=True).eval()
onnx(lstm, path, lengths=True)         # inputs x, lengths, h0; outputs y, h_n; T and B dynamic
x = torch.randn(30, 8, 12)
y, h_n = OnnxModel(path)(x, lengths=torch.full((8,), 30))

with torch.no_grad():
    ref, ref_h = lstm(x)
torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(h_n, ref_h, atol=1e-5, rtol=1e-5)
print("output", tuple(y.shape), "equals gyre's; state", tuple(h_n.shape))
