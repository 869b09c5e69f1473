"""classify: real-data training beats majority class; heads, baselines, reload, predict."""

import csv
import json

import numpy as np
import pytest
import torch

from gyre import cells
from gyre.data import classification as cd
from gyre.tasks import base, classify


def _quick(tmp_path, **kw):
    opts = dict(out=str(tmp_path / "run"), epochs=3, hidden=32, dtw=False, minirocket=False,
                progress=False, tensorboard=False, device="cpu", model="rnn")
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


def test_early_abandoning_1nn_dtw_equals_aeon_s_full_dtw():
    """Distances against aeon's dtw (unequal lengths, 2 channels) and nearest neighbours against
    the argmin of aeon's full pairwise matrix: early abandoning changes neither."""
    from aeon.distances import dtw_pairwise_distance
    rng = np.random.default_rng(0)
    train = [rng.standard_normal((2, rng.integers(3, 40))) for _ in range(15)]
    test = [rng.standard_normal((2, rng.integers(1, 40))) for _ in range(12)]
    want = dtw_pairwise_distance(test, train)
    dtw = classify._dtw_kernel()
    got = np.array([[dtw(a, b, np.inf) for b in train] for a in test])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert classify.nn_dtw_predict(train, test).tolist() == want.argmin(1).tolist()
    assert dtw(test[0], train[0], want[0, 0] / 2) == np.inf  # abandoned past the bound


def test_training_leaves_the_baseline_worker_a_core():
    """While the baselines' worker runs, torch's threads are at most cores - 1; restored after."""
    import math
    import os
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: nothing to leave")
    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        beside = classify.run_beside({"root": (math.sqrt, (4.0,))})
        assert torch.get_num_threads() == cores - 1
        assert beside() == {"root": 2.0}
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


def test_cnn_and_transformer_baselines_train_by_the_same_trainer(tmp_path):
    m = classify.train(_quick(tmp_path, data="italy_power_demand", epochs=1, hidden=8,
                              baselines=["cnn", "transformer"]))
    assert set(m["baselines"]) == {"majority", "cnn", "transformer"}
    for name in ("cnn", "transformer"):
        assert 0 <= m["baselines"][name]["accuracy"] <= 1
        assert (tmp_path / "run" / "baselines" / name / "checkpoint").is_file()


@pytest.mark.parametrize("frame", [1, 3])
@pytest.mark.parametrize("head", [*classify.HEADS, "last+mean", "last+mean+max"])
def test_heads_ignore_padding(head, frame):
    """A padded batch with lengths gives each sequence the logits it gets alone."""
    torch.manual_seed(0)
    model = classify.RecurrentClassifier("lstm", 3, 4, hidden=5, bidirectional=True, head=head,
                                         frame=frame)
    model.eval()
    seqs = [torch.randn(n, 3) for n in (7, 2, 4)]
    batch = cd.collate([(s, torch.tensor(0)) for s in seqs])
    with torch.no_grad():
        together = model(batch["x"], lengths=batch["lengths"])[0]
        alone = torch.cat([model(s[None])[0] for s in seqs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_head_features_are_the_pooled_outputs_concatenated():
    torch.manual_seed(0)
    model = classify.RecurrentClassifier("gru", 2, 3, hidden=4, bidirectional=True,
                                         head="last+mean+max")
    x = torch.randn(2, 6, 2)
    lengths = torch.tensor([6, 4])
    out, _ = model.rnn(x, lengths=lengths)
    want = []
    for b, n in enumerate(lengths.tolist()):  # each sequence by hand over its valid steps
        o = out[b, :n]
        last = torch.cat([o[n - 1, :4], o[0, 4:]])
        want.append(torch.cat([last, o.mean(0), o.amax(0)]))
    feats = torch.stack(want)
    torch.testing.assert_close(model(x, lengths=lengths)[0], model.fc(feats))


def test_frames_stack_consecutive_steps():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    y, lengths = classify.to_frames(x, torch.tensor([7, 5]), 3)
    assert y.shape == (2, 3, 9) and lengths.tolist() == [3, 2]
    for b in range(2):
        for t in range(3):
            want = [float(x[b, s, c]) if s < 7 else 0.0 for s in range(3 * t, 3 * t + 3)
                    for c in range(3)]
            assert y[b, t].tolist() == want
    same, none = classify.to_frames(x, None, 1)
    assert same is x and none is None
    assert [classify.auto_frame([np.zeros((n, 1))] * 3) for n in (5, 16, 17, 251, 1460)] == \
        [1, 1, 2, 16, 92]
    with pytest.raises(ValueError, match="frame"):
        classify.RecurrentClassifier("lstm", 1, 2, frame=0)


def test_forget_bias_is_set_on_lstm_family_cells_only():
    H = 5
    lstm = classify.RecurrentClassifier("lstm", 2, 3, hidden=H, bidirectional=True).rnn
    for d in ("", "_reverse"):
        b_ih, b_hh = getattr(lstm, f"bias_ih_l0{d}"), getattr(lstm, f"bias_hh_l0{d}")
        assert (b_ih[H:2 * H] == 1).all() and (b_hh[H:2 * H] == 0).all()
        assert not (b_ih[:H] == 1).all()  # the other gates keep torch's initialisation
    mlstm = classify.RecurrentClassifier("minlstm", 2, 3, hidden=H, forget_bias=2.0).rnn
    assert (mlstm.bias_ih_l0[:H] == 2).all()
    torch.manual_seed(0)
    gru = classify.RecurrentClassifier("gru", 2, 3, hidden=H, forget_bias=1.0).rnn
    torch.manual_seed(0)
    plain = classify.RecurrentClassifier("gru", 2, 3, hidden=H, forget_bias=None).rnn
    for (k, a), (_, b) in zip(gru.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), k
    assert not classify.set_forget_bias(gru, 1.0)


def test_arrow_head_learns_with_the_rnn_recipe(tmp_path):
    """Regression: a long (251 steps) univariate series with 36 training examples. The old
    defaults (mean-pooled head over every raw step) left the training loss at ln 3 and the test
    accuracy below the majority class."""
    m = classify.train(_quick(tmp_path, data="arrow_head", epochs=100, hidden=64))
    assert m["train"]["frame"] == 16 and m["train"]["n_val"] == 0
    assert m["test"]["accuracy"] > m["baselines"]["majority"]["accuracy"] + 0.15
    history = [float(r["train_loss"]) for r in
               csv.DictReader((tmp_path / "run" / "log.csv").open())]
    assert history[-1] < 0.5 * np.log(3)
    again = classify.evaluate(tmp_path / "run")  # the frame length comes back with the run
    assert again["test"] == pytest.approx(m["test"], abs=1e-9)


@pytest.mark.parametrize("cell", cells.names())
def test_every_cell_builds_a_classifier(cell):
    torch.manual_seed(0)
    model = classify.RecurrentClassifier(cell, 2, 3, hidden=4, bidirectional=True)
    x = torch.randn(2, 5, 2)
    logits, _ = model(x, lengths=torch.tensor([5, 3]))
    logits.sum().backward()
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kw, match", [
    ({"cell": "nope"}, "cell"), ({"head": "first"}, "head"), ({"head": "last+nope"}, "head"),
    ({"head": "mean+mean"}, "head"), ({"frame": -1}, "frame"), ({"baselines": ["knn"]}, "baselines"),
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
