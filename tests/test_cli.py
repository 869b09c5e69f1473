"""The gyre command line: train / resume / eval / predict / data list, and bad options."""

import csv
import json

import numpy as np
import pytest
import torch

from gyre.cli import main
from gyre.data import classification as cd


@pytest.fixture(scope="module")
def italy_csv(tmp_path_factory):
    """ItalyPowerDemand (real data) as a wide CSV with a split column."""
    d = cd.load("italy_power_demand")
    path = tmp_path_factory.mktemp("data") / "italy.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "split"] + [f"t{i}" for i in range(24)])
        for X, y, split in ((d.X_train, d.y_train, "train"), (d.X_test[:200], d.y_test, "test")):
            for x, label in zip(X, y, strict=False):
                w.writerow([d.classes[label], split] + [f"{v:.6f}" for v in x[:, 0]])
    return path


FAST = ["--model", "rnn", "--hidden", "8", "--no-dtw", "--no-minirocket", "--no-progress", "--no-tensorboard",
        "--device", "cpu"]


def test_train_resume_eval_predict_on_a_user_csv(tmp_path, italy_csv, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text("epochs = 6\ncell = \"gru\"\nhidden = 99\n")
    rc = main(["train", "classify", "--data", str(italy_csv), "--out", str(out), "--config",
               str(cfg), *FAST])
    text = capsys.readouterr().out
    assert rc == 0 and "majority" in text and "accuracy" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["epochs_run"] == 6 and m["model"].startswith("bigru 1x8")  # flag beat TOML
    assert m["test"]["accuracy"] > m["baselines"]["majority"]["accuracy"]
    # resume the finished run with more epochs: continues from epoch 6
    assert main(["train", "classify", "--out", str(out), "--resume", "--epochs", "7",
                 "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["epochs_run"] == 7
    capsys.readouterr()
    before = torch.get_num_threads()
    try:
        assert main(["eval", str(out), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["test"]["accuracy"])
    assert main(["predict", str(out), str(italy_csv), "-o", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 67 + 200 and set(rows[0]) == {"index", "label", "prob_1", "prob_2"}
    assert {r["label"] for r in rows} <= {"1", "2"}
    assert np.isclose(float(rows[0]["prob_1"]) + float(rows[0]["prob_2"]), 1, atol=1e-4)


def test_bad_data_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "classify", "--data", "missing.csv"]) == 2
    assert "data: file 'missing.csv'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    text = capsys.readouterr().out
    assert "japanese_vowels" in text and "offline" in text and "classify:" in text


@pytest.mark.parametrize("argv, match", [
    (["train", "classify", "--cell", "nope"], "gyre: error: cell: got 'nope'"),
    (["train", "classify", "--data", "missing.csv"], "gyre: error: data: file 'missing.csv' does"),
    (["train", "classify", "--resume", "--out", "/nonexistent/run"], "resume: '/nonexistent"),
    (["train", "classify", "--config", "/no/such.toml"], "config: '/no/such.toml' does not"),
    (["train", "classify", "--head", "first"], "head: got 'first'"),
    (["train", "classify", "--device", "tpu"], "device: got 'tpu'"),
    (["eval", "/no/such/run"], "out_dir: '/no/such/run/config.toml' does not exist"),
])
def test_bad_options_give_one_clear_error(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["train", "classify", "--hidden", "x"],
                                  ["train", "classify", "--no-such-flag"],
                                  ["train", "nosuchtask"], ["train", "classify", "--resume"],
                                  ["train", "classify", "--threads", "0"],
                                  ["eval", "somewhere", "--threads", "two"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err
    if "--threads" in argv:
        assert "--threads: got" in err and "expected an int >= 1" in err


def test_config_file_with_unknown_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    assert main(["train", "classify", "--config", str(bad)]) == 2
    assert "unknown key(s) epochz" in capsys.readouterr().err


def test_predict_reads_the_runs_own_data_unless_given(tmp_path, capsys):
    """``gyre predict RUN`` forecasts from the data the run was trained on; a path (positional
    or ``--data``) overrides it; a task that needs a file says so in one line."""
    rng = np.random.default_rng(0)
    own, other = tmp_path / "own.csv", tmp_path / "other.csv"
    own.write_text("v\n" + "".join(f"{10 + np.sin(i / 2) + 0.1 * rng.normal():.4f}\n"
                                   for i in range(60)))
    other.write_text("v\n" + "".join(f"{100 + i:.1f}\n" for i in range(60)))
    out = tmp_path / "run"
    assert main(["train", "forecast", "--data", str(own), "--out", str(out), "--horizon", "3",
                 "--hidden", "4", "--epochs", "2", "--ensemble", "1", "--no-refit",
                 "--baselines", "naive", "--no-progress", "--no-tensorboard", "--threads", "1",
                 "--device", "cpu"]) == 0
    capsys.readouterr()

    def forecasts(*extra):
        assert main(["predict", str(out), *extra, "-o", str(tmp_path / "p.csv")]) == 0
        return [float(r["forecast"]) for r in csv.DictReader(open(tmp_path / "p.csv"))]

    mine = forecasts()
    assert len(mine) == 3 and all(8 < v < 12 for v in mine)
    # the same data given by path: its scaler is refitted on all of it, so nearly the same
    assert forecasts(str(own)) == pytest.approx(mine, rel=1e-2)
    shifted = forecasts("--data", str(other))
    assert shifted == forecasts(str(other)) and all(v > 120 for v in shifted)
    capsys.readouterr()
    assert main(["predict", str(out), str(own), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gyre: error: data_path: give the data once" in err and len(err.splitlines()) == 1


def test_predict_of_a_task_that_needs_a_file_says_so(tmp_path, italy_csv, capsys):
    out = tmp_path / "run"
    assert main(["train", "classify", "--data", str(italy_csv), "--out", str(out), "--epochs",
                 "1", *FAST]) == 0
    capsys.readouterr()
    assert main(["predict", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gyre: error: data_path: task 'classify' predicts for a file" in err
    assert len(err.splitlines()) == 1
