"""The README's "Using it" snippets, verbatim (a test checks they match and runs this file).

Run: ``.venv/bin/python examples/quickstart.py``
"""

import torch

import gyre.nn

lstm = gyre.nn.LSTM(12, 64, num_layers=2, batch_first=True, bidirectional=True,
                    peephole=True, recurrent_dropout=0.1, zoneout=0.05)
x = torch.randn(8, 29, 12)                            # (batch, time, features), padded
out, (h_n, c_n) = lstm(x, lengths=[29, 25, 20, 17, 12, 9, 8, 7])

# torch.nn state dicts load as they are, both ways
plain = gyre.nn.LSTM(12, 64, 2, batch_first=True, bidirectional=True)
plain.load_state_dict(torch.nn.LSTM(12, 64, 2, batch_first=True, bidirectional=True).state_dict())

# streaming, one step at a time with carried state
stream = gyre.nn.LSTM(12, 64).eval()
state = None
for x_t in torch.randn(100, 1, 12):
    y_t, state = stream.step(x_t, state)

layer = gyre.nn.Recurrent("gru_cho", input_size=12, hidden_size=64, num_layers=2)

print("output", tuple(out.shape), "streamed", tuple(y_t.shape), "gru_cho",
      tuple(layer(torch.randn(5, 3, 12))[0].shape))
