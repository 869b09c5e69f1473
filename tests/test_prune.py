"""Pruning: structured pruning removes whole hidden units and keeps the function of the rest;
unstructured zeroes the asked share of each weight and keeps it zero through the fine-tune;
gyre prune on a real (tiny) classify run writes its table and plot; bad input."""

from __future__ import annotations

import json
import shutil

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
    big.rnn.backend = small.rnn.backend = "reference"  # no fused kernel to compile per config
    x = torch.randn(5, 9, 3)
    n = torch.tensor([9, 3, 7, 1, 5])
    with torch.no_grad():
        torch.testing.assert_close(small(x, lengths=n)[0], big(x, lengths=n)[0], atol=1e-5,
                                   rtol=1e-5)


def _kill(model, H, dead):
    with torch.no_grad():
        for p in model.rnn.parameters():
            if p.shape[0] % H == 0:
                p.view(p.shape[0] // H, H, -1)[:, dead] = 0


def test_structured_pruning_of_heads_reading_other_features_beside_the_units():
    """A forecast head reads the units beside future covariates and a series embedding, a
    fused conv-rnn head beside the front-end's mean: those columns are kept as they are."""
    from gyre.tasks import forecast
    torch.manual_seed(2)
    H, dead = 6, [0, 3, 5]
    kw = dict(horizon=3, layers=2, bidirectional=True, future=[2], n_ids=4, id_dim=2,
              quantiles=(0.1, 0.5, 0.9))
    big = forecast.Forecaster("gru", 4, [0, 1], hidden=H, **kw).eval()
    _kill(big, H, dead)
    small = prune.structured(big, forecast.Forecaster("gru", 4, [0, 1], hidden=3, **kw), 0.5)
    assert small.head.in_features == 2 * 3 + 3 * 1 + 2
    big.rnn.backend = small.rnn.backend = "reference"
    x = torch.randn(5, 10 + 3, 4)
    x[..., 3] = torch.tensor([0, 1, 2, 3, -1.0])[:, None]  # the series ids
    n = torch.tensor([10, 6, 8, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(small(x, lengths=n)[0], big(x, lengths=n)[0], atol=1e-5,
                                   rtol=1e-5)
    big = classify.ConvRecurrentClassifier("lstm", 3, 4, H, channels=8, fuse=True).eval()
    _kill(big, H, dead)
    small = prune.structured(
        big, classify.ConvRecurrentClassifier("lstm", 3, 4, 3, channels=8, fuse=True), 0.5)
    big.rnn.backend = small.rnn.backend = "reference"
    x = torch.randn(5, 12, 3)
    n = torch.tensor([12, 5, 9, 7, 10])
    with torch.no_grad():
        torch.testing.assert_close(small(x, lengths=n)[0], big(x, lengths=n)[0], atol=1e-5,
                                   rtol=1e-5)


def test_unstructured_zeroes_each_weight_and_the_zeros_survive_training():
    torch.manual_seed(1)
    m = classify.RecurrentClassifier("gru", 3, 2, 8, 1, False)
    m.rnn.backend = "reference"  # what is tested is the masks, not a fused kernel's build
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


def test_gyre_prune_on_a_classify_run(italy_run, tmp_path, capsys):
    shutil.copytree(italy_run, tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint").read_bytes()
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0,0.5", "--structured",
                 "--epochs", "1", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-structured.json").read_text())
    assert [r["hidden"] for r in rows] == [16, 8]
    assert all(r["speedup"] > 0 for r in rows)
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "run" / "prune" / "prune-structured.png").stat().st_size > 1000
    _, small, _ = classify.load_run(rows[1]["run"])
    assert small.rnn.hidden_size == 8
    assert (tmp_path / "run" / "checkpoint").read_bytes() == before  # the run is untouched
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0.5", "--epochs", "1",
                 "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-unstructured.json").read_text())
    assert rows[0]["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["prune", str(tmp_path / "run"), "--sparsity", "1.5"])
    assert e.value.code == 2
    assert "sparsity" in capsys.readouterr().err


def test_gyre_prune_on_a_forecast_run(airline_run, tmp_path):
    """Per weight: MASE (the task's metric) before and after, the zeros kept through the
    fine-tune and in the saved run."""
    shutil.copytree(airline_run, tmp_path / "run")
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0,0.5", "--epochs", "1",
                 "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-unstructured.json").read_text())
    assert [r["weight_sparsity"] for r in rows] == [0, pytest.approx(0.5, abs=0.02)]
    assert all(r["mase"] > 0 for r in rows)
    from gyre.tasks import forecast
    _, pruned, _ = forecast.load_run(rows[1]["run"])
    assert prune.sparsity_of(pruned) == pytest.approx(0.5, abs=0.02)
    assert (tmp_path / "run" / "prune" / "prune-unstructured.png").stat().st_size > 1000
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0.5", "--structured",
                 "--epochs", "1", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-structured.json").read_text())
    assert rows[0]["hidden"] == 4 and rows[0]["mase"] > 0
    _, small, _ = forecast.load_run(rows[0]["run"])
    assert small.rnn.hidden_size == 4


def test_gyre_prune_on_a_regress_run(tmp_path):
    from gyre.tasks import regress
    # the LSTM shapes of the classify run's test (16 -> 8 units, forward only): no new kernel
    regress.train(regress.Config(data="covid_3month", out=str(tmp_path / "run"), epochs=1,
                                 hidden=16, bidirectional=False, cell="lstm", model="rnn",
                                 minirocket=False, progress=False, tensorboard=False,
                                 device="cpu"))
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0.5", "--structured",
                 "--epochs", "1", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-structured.json").read_text())
    assert rows[0]["hidden"] == 8 and rows[0]["rmse"] > 0
    _, small, _ = regress.load_run(rows[0]["run"])
    assert small.rnn.hidden_size == 8 and small.fc.out_features == 1


def test_gyre_prune_on_a_sentiment_run(tmp_path):
    """A small CSV of labelled texts (words that say the label, in random order) keeps the
    run cheap; the LSTM shapes are the classify run's test's (16 -> 8 units, forward only)."""
    import random

    from gyre.tasks import sentiment
    rng = random.Random(0)
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "poor", "awful", "sad"]}
    rows = ["review,score"]
    for i in range(160):
        label = "pos" if i % 2 else "neg"
        rows.append(" ".join(rng.choice(words[label] + ["the", "food", "was"])
                             for _ in range(8)) + f",{label}")
    (tmp_path / "texts.csv").write_text("\n".join(rows) + "\n")
    sentiment.train(sentiment.Config(data=str(tmp_path / "texts.csv"), out=str(tmp_path / "run"),
                                     epochs=1, hidden=16, embed=8, bidirectional=False,
                                     cell="lstm", tokenizer="word", vocab_size=64, progress=False,
                                     tensorboard=False, device="cpu"))
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0.5", "--structured",
                 "--epochs", "1", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-structured.json").read_text())
    assert rows[0]["hidden"] == 8 and 0 <= rows[0]["accuracy"] <= 1
    _, small, _, _ = sentiment.load_run(rows[0]["run"])
    assert small.rnn.hidden_size == 8


def test_gyre_prune_on_an_lm_run(tmp_path):
    """Tied output, hidden = embedding width: the small model's projection is the identity's
    kept columns (exact on a model whose other units are dead)."""
    from gyre.tasks import lm
    torch.manual_seed(4)
    H, dead = 16, list(range(8, 16))
    big = lm.LanguageModel(30, "lstm", 16, H).eval()
    _kill(big, H, dead)
    small = prune.structured(big, lm.LanguageModel(30, "lstm", 16, 8), 0.5)
    big.rnn.backend = small.rnn.backend = "reference"
    ids = torch.randint(0, 30, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(small(ids)[0], big(ids)[0], atol=1e-5, rtol=1e-5)
    text = "\n".join(f"the cat {w} sat on the mat" for w in ("sat", "ran", "hid") * 40) + "\n"
    (tmp_path / "t.txt").write_text(text)
    lm.train(lm.Config(data=str(tmp_path / "t.txt"), out=str(tmp_path / "run"), epochs=1,
                       hidden=16, embed=16, cell="lstm", tokenizer="char", ngram_order=0,
                       batch_size=4, progress=False, tensorboard=False, device="cpu"))
    assert main(["prune", str(tmp_path / "run"), "--sparsity", "0,0.5", "--structured",
                 "--epochs", "1", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "prune" / "prune-structured.json").read_text())
    assert [r["hidden"] for r in rows] == [16, 8] and all(r["bits_per_char"] > 0 for r in rows)
    _, pruned, _ = lm.load_run(rows[1]["run"])
    assert pruned.rnn.hidden_size == 8
    assert pruned.head.out.weight is pruned.embedding.weight  # still tied


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="sparsity: got 1"):
        prune.unstructured(classify.RecurrentClassifier("lstm", 2, 2, 4), 1)
    from gyre.tasks import translate
    with pytest.raises(ValueError, match="no finetune"):
        prune.prune_run(translate, tmp_path, [0.5])
    proj = classify.RecurrentClassifier("lstm", 2, 2, 4)
    proj.rnn.cell = type(proj.rnn.cell)(proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        prune.structured(proj, classify.RecurrentClassifier("lstm", 2, 2, 2), 0.5)
