"""Pruning: structured pruning removes whole hidden units and keeps the function of the rest;
unstructured zeroes the asked share of each weight and keeps it zero through the fine-tune;
gyre prune on a real (tiny) classify run writes its table and plot; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from gyre import prune
from gyre.cli import main
from gyre.tasks import classify


@pytest.mark.parametrize("cell,layers,bi,head", [("lstm", 2, True, "last+mean"),
                                                 ("gru", 1, False, "max"),
                                                 ("peephole", 2, False, "last")])
def test_structured_pruning_of_dead_units_keeps_the_function(cell, layers, bi, head):
    torch.manual_seed(0)
    H, dead = 8, [1, 4, 6, 7]
    big = classify.RecurrentClassifier(cell, 3, 4, H, layers, bi, head=head).eval()
    with torch.no_grad():
        for p in big.rnn.parameters():
            if p.shape[0] % H == 0:
                rows = p.view(p.shape[0] // H, H, -1)
                rows[:, dead] = 0  # the unit's every gate row: its h stays exactly 0
    small = classify.RecurrentClassifier(cell, 3, 4, H - len(dead), layers, bi, head=head)
    small = prune.structured(big, small, 0.5)
    assert small.rnn.hidden_size == 4
    x = torch.randn(5, 9, 3)
    n = torch.tensor([9, 3, 7, 1, 5])
    with torch.no_grad():
        torch.testing.assert_close(small(x, lengths=n)[0], big(x, lengths=n)[0], atol=1e-5,
                                   rtol=1e-5)


def test_unstructured_zeroes_each_weight_and_the_zeros_survive_training():
    torch.manual_seed(1)
    m = classify.RecurrentClassifier("gru", 3, 2, 8, 1, False)
    hooks = prune.unstructured(m, 0.75)
    assert prune.sparsity_of(m) == pytest.approx(0.75, abs=0.01)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 5, 3))[0].sum().backward()
        opt.step()
    assert prune.sparsity_of(m) == pytest.approx(0.75, abs=0.01)
    for h in hooks:
        h.remove()
    assert not any("orig" in k or "mask" in k for k in m.state_dict())


def test_gyre_prune_on_a_classify_run(tmp_path, capsys):
    cfg = classify.Config(data="italy_power_demand", out=str(tmp_path / "run"), epochs=2, hidden=8,
                          model="rnn",
                          dtw=False, progress=False, tensorboard=False, device="cpu",
                          bidirectional=False)
    classify.train(cfg)
    before = (tmp_path / "run" / "checkpoint").read_bytes()
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0,0.5", "--structured",
                 "--epochs", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-structured.json").read_text())
    assert [r["hidden"] for r in rows] == [8, 4]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "run" / "prune" / "prune-structured.png").stat().st_size > 1000
    _, small, _ = classify.load_run(rows[1]["run"])
    assert small.rnn.hidden_size == 4
    assert (tmp_path / "run" / "checkpoint").read_bytes() == before  # the run is untouched
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0.5", "--epochs", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-unstructured.json").read_text())
    assert rows[0]["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["prune", str(tmp_path / "run"), "--sparsity", "1.5"])
    assert e.value.code == 2
    assert "sparsity" in capsys.readouterr().err


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="sparsity: got 1"):
        prune.unstructured(classify.RecurrentClassifier("lstm", 2, 2, 4), 1)
    from gyre.tasks import forecast
    with pytest.raises(ValueError, match="no finetune"):
        prune.prune_run(forecast, tmp_path, [0.5])
    proj = classify.RecurrentClassifier("lstm", 2, 2, 4)
    proj.rnn.cell = type(proj.rnn.cell)(proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        prune.structured(proj, classify.RecurrentClassifier("lstm", 2, 2, 2), 0.5)
