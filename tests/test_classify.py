"""classify: real-data training beats majority class; heads, baselines, reload, predict."""

import json

import numpy as np
import pytest
import torch

from gyre import cells
from gyre.data import classification as cd
from gyre.tasks import base, classify


def _quick(tmp_path, **kw):
    opts = dict(out=str(tmp_path / "run"), epochs=3, hidden=32, dtw=False, progress=False,
                tensorboard=False, device="cpu")
    opts.update(kw)
    return classify.Config(**opts)


def test_japanese_vowels_brief_training_beats_majority_and_reloads(tmp_path):
    m = classify.train(_quick(tmp_path))
    out = tmp_path / "run"
    assert m["test"]["accuracy"] > m["baselines"]["majority"]["accuracy"] + 0.4
    assert m["test"]["accuracy"] > 0.6 and m["train"]["n_test"] == 370
    for f in ("config.toml", "checkpoint", "metrics.json", "loss.png", "confusion.png", "log.csv"):
        assert (out / f).is_file(), f
    assert json.loads((out / "metrics.json").read_text()) == m
    assert base.task_of_run(out) == "classify"
    assert m["published"]["fcn accuracy"] == 0.99
    # reloading from the run directory gives the same test accuracy
    again = classify.evaluate(out)
    assert again["test"] == pytest.approx(m["test"], abs=1e-9)
    # predict on a long-format CSV of the first test sequences: same labels as the model gives
    data = cd.load("japanese_vowels")
    rows = ["id,label," + ",".join(f"c{i}" for i in range(12))]
    for i in range(5):
        for step in data.X_test[i]:
            rows.append(f"{i},?," + ",".join(repr(float(v)) for v in step))
    path = tmp_path / "five.csv"
    path.write_text("\n".join(rows) + "\n")
    pred = classify.predict(out, str(path))
    _, model, extra = classify.load_run(out)
    scaler = cd.Standardizer.from_state(extra["scaler"])
    with torch.no_grad():
        want = [int(model(torch.from_numpy(x)[None])[0].argmax()) for x in scaler(data.X_test[:5])]
    assert [r["label"] for r in pred] == [data.classes[i] for i in want]
    assert all(abs(sum(v for k, v in r.items() if k.startswith("prob_")) - 1) < 1e-4 for r in pred)


def test_dtw_baseline_matches_published_ucr_figure():
    # UCR 2018 summary: 1-NN DTW (full window) error .050 on ItalyPowerDemand
    acc = classify.dtw_baseline(cd.load("italy_power_demand"))["accuracy"]
    assert abs(acc - 0.950) < 0.002


def test_cnn_and_transformer_baselines_train_by_the_same_trainer(tmp_path):
    m = classify.train(_quick(tmp_path, data="italy_power_demand", epochs=1, hidden=8,
                              baselines=["cnn", "transformer"]))
    assert set(m["baselines"]) == {"majority", "cnn", "transformer"}
    for name in ("cnn", "transformer"):
        assert 0 <= m["baselines"][name]["accuracy"] <= 1
        assert (tmp_path / "run" / "baselines" / name / "checkpoint").is_file()


@pytest.mark.parametrize("head", classify.HEADS)
def test_heads_ignore_padding(head):
    """A padded batch with lengths gives each sequence the logits it gets alone."""
    torch.manual_seed(0)
    model = classify.RecurrentClassifier("lstm", 3, 4, hidden=5, bidirectional=True, head=head)
    model.eval()
    seqs = [torch.randn(n, 3) for n in (6, 2, 4)]
    batch = cd.collate([(s, torch.tensor(0)) for s in seqs])
    with torch.no_grad():
        together = model(batch["x"], lengths=batch["lengths"])[0]
        alone = torch.cat([model(s[None])[0] for s in seqs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", cells.names())
def test_every_cell_builds_a_classifier(cell):
    torch.manual_seed(0)
    model = classify.RecurrentClassifier(cell, 2, 3, hidden=4, bidirectional=True)
    x = torch.randn(2, 5, 2)
    logits, _ = model(x, lengths=torch.tensor([5, 3]))
    logits.sum().backward()
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kw, match", [
    ({"cell": "nope"}, "cell"), ({"head": "first"}, "head"), ({"baselines": ["knn"]}, "baselines"),
    ({"hidden": 0}, "hidden"), ({"val_fraction": 1.0}, "val_fraction"), ({"epochs": "3"}, "epochs"),
])
def test_bad_config_values(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        classify.Config(**kw)


def test_config_toml_round_trip(tmp_path):
    c = classify.Config(data="gunpoint", hidden=7, baselines=["cnn"], lr=1e-2, out="x")
    base.write_config(c, tmp_path / "c.toml")
    assert base.load_config(classify.Config, tmp_path / "c.toml") == c
    (tmp_path / "bad.toml").write_text("hiden = 3\n")
    with pytest.raises(ValueError, match="unknown key.*hiden"):
        base.load_config(classify.Config, tmp_path / "bad.toml")
    assert np.isclose(c.train_config().lr, 1e-2)
