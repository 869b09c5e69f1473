"""The user cell of examples/user_cell.py runs in every layer and backend and equals its formula."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from gyre import engine
from gyre.nn import Recurrent

spec = importlib.util.spec_from_file_location(
    "user_cell", pathlib.Path(__file__).parents[1] / "examples" / "user_cell.py")
user_cell = importlib.util.module_from_spec(spec)
spec.loader.exec_module(user_cell)

DT = torch.float64


def test_user_cell_matches_formula():
    m = Recurrent(user_cell.MIRNN(), 3, 4, backend="reference").to(DT)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1, 1)
    x = torch.randn(5, 2, 3, dtype=DT)
    out, h_n = m(x)
    h = torch.zeros(2, 4, dtype=DT)
    for t in range(5):
        u, v = x[t] @ m.weight_ih_l0.T, h @ m.weight_hh_l0.T
        h = torch.tanh(m.alpha_l0 * u * v + m.beta1_l0 * u + m.beta2_l0 * v + m.bias_l0)
        torch.testing.assert_close(out[t], h, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n[0], h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", [b for b in engine.BACKENDS if b not in ("native", "scan")])
def test_user_cell_in_every_backend(backend):
    ref = Recurrent(user_cell.MIRNN(), 3, 4, num_layers=2, bidirectional=True,
                    backend="reference").to(DT)
    m = Recurrent(user_cell.MIRNN(), 3, 4, num_layers=2, bidirectional=True, backend=backend).to(DT)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=DT, requires_grad=True)
    a, ha = ref(x, lengths=[5, 3])
    b, hb = m(x, lengths=[5, 3])
    torch.testing.assert_close(b, a, atol=1e-10, rtol=0)
    torch.testing.assert_close(hb, ha, atol=1e-10, rtol=0)
    ga = torch.autograd.grad((a.sum() + ha.sum()), [x, *ref.parameters()])
    gb = torch.autograd.grad((b.sum() + hb.sum()), [x, *m.parameters()])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=0)


def test_example_script_runs(capsys):
    user_cell.main()
    assert "output (4, 20, 32)" in capsys.readouterr().out
