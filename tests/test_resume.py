"""Resume cannot lose a run: flags given with --resume take effect or are refused before anything
is written; broken files and paths get one `gyre: error:` line; a kill -9 loses nothing."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_train import SeqModel, _data
from torch import nn

from gyre.cli import main
from gyre.train import CHECKPOINT, TrainConfig, Trainer, load_checkpoint

FAST = ["--data", "italy_power_demand", "--model", "rnn", "--hidden", "4", "--no-dtw",
        "--no-minirocket", "--no-progress", "--no-tensorboard", "--device", "cpu", "--batch-size", "32",
        "--threads", "1"]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gyre: error: "), err
    for n in needles:
        assert n in err, err
    assert "Traceback" not in err and "weights_only=False" not in err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch classify run on real data (ItalyPowerDemand), one-cycle schedule."""
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "classify", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("flags, names", [
    (["--hidden", "16"], ["--hidden 4 -> 16"]),
    (["--scheduler", "none"], ["--scheduler 'onecycle' -> 'none'"]),
    (["--optimizer", "sgd"], ["--optimizer 'adam' -> 'sgd'"]),
    (["--data", "gunpoint"], ["--data"]),
    (["--cell", "gru", "--batch-size", "8"], ["--cell", "--batch-size"]),
])
def test_refused_resume_changes_nothing_and_later_resumes_work(run, flags, names, capsys,
                                                               tmp_path):
    import shutil
    r = tmp_path / "r"
    shutil.copytree(run, r)
    before = {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "classify", "--out", str(r), "--resume", *flags]) == 2
    _one_line_error(capsys, "resume:", "cannot change", "--epochs, --lr", *names)
    assert {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()} == before
    assert main(["eval", str(r)]) == 0
    assert main(["train", "classify", "--out", str(r), "--resume", "--epochs", "2",
                 "--no-progress", "--threads", "1"]) == 0
    assert load_checkpoint(r)["epoch"] == 2


def test_resume_honours_lr_epochs_patience_and_logging(run, tmp_path, capsys):
    import shutil
    r = tmp_path / "r"
    shutil.copytree(run, r)
    assert main(["train", "classify", "--out", str(r), "--resume", "--epochs", "2", "--lr", "0.5",
                 "--tensorboard", "--patience", "0", "--no-progress", "--threads", "1"]) == 0
    ckpt = load_checkpoint(r)
    assert ckpt["epoch"] == 2 and ckpt["config"]["lr"] == 0.5
    # one-cycle peak 0.01 in the first epoch's plan, now 0.5: the schedule's rates scaled by 50
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["max_lr"] == pytest.approx(0.5) and group["initial_lr"] == pytest.approx(0.5 / 25)
    assert 'lr = 0.5' in (r / "config.toml").read_text()
    assert any((r / "tensorboard").iterdir())


def test_trainer_new_lr_rescales_the_schedule(tmp_path):
    """A 2-epoch run resumed for 4 epochs with lr doubled: epochs 3-4 run at twice the rates of
    an uninterrupted 4-epoch cosine run (the first two followed the 2-epoch plan)."""
    data, _, _ = _data(n=8, T=4)
    cfg = dict(epochs=4, batch_size=4, optimizer="adam", scheduler="cosine", progress=False,
               tensorboard=False, csv=False, device="cpu", shuffle=False)
    torch.manual_seed(0)
    ref = Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(lr=0.01, **cfg)).fit(data)
    torch.manual_seed(0)
    Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(lr=0.01, **{**cfg, "epochs": 2}),
            out_dir=tmp_path).fit(data)
    res = Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(lr=0.02, **cfg),
                  out_dir=tmp_path).fit(data, resume=True)
    got = [r["lr"] for r in res["history"]]
    want = [r["lr"] for r in ref["history"]]
    assert got[2:] == pytest.approx([2 * v for v in want[2:]], rel=1e-9)


def test_trainer_longer_patience_continues_an_early_stopped_run(tmp_path):
    data, _, _ = _data(n=10, T=5)
    cfg = dict(epochs=10, batch_size=4, optimizer="sgd", lr=0.1, monitor="epoch", mode="min",
               progress=False, tensorboard=False, csv=False, device="cpu")
    r = Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(patience=1, **cfg),
                out_dir=tmp_path).fit(data[:8], data[8:])
    assert r["stopped_early"] and r["epochs_run"] == 2
    r = Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(patience=3, **cfg),
                out_dir=tmp_path).fit(data[:8], data[8:], resume=True)
    assert r["stopped_early"] and r["epochs_run"] == 4


def test_trainer_refuses_other_model_or_optimizer(tmp_path):
    data, _, _ = _data(n=8, T=4)
    cfg = dict(epochs=1, batch_size=4, progress=False, tensorboard=False, csv=False, device="cpu")
    Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(**cfg), out_dir=tmp_path).fit(data)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match="resume: optimizer 'sgd' differs from the checkpoint's "
                                         "'adam'"):
        Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(optimizer="sgd", **cfg),
                out_dir=tmp_path).fit(data, resume=True)
    with pytest.raises(ValueError, match="resume: the model does not match the checkpoint"):
        Trainer(SeqModel(cell="gru"), nn.functional.mse_loss, TrainConfig(**cfg),
                out_dir=tmp_path).fit(data, resume=True)
    with pytest.raises(ValueError, match="resume: scheduler 'cosine' differs"):
        Trainer(SeqModel(), nn.functional.mse_loss, TrainConfig(scheduler="cosine", **cfg),
                out_dir=tmp_path).fit(data, resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


class _Planted:
    """Unpickling this runs code: creates the file named in its argument."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_broken_checkpoints_and_paths_give_one_line(run, tmp_path, capsys):
    import shutil
    r = tmp_path / "r"
    shutil.copytree(run, r)
    torch.save({"format": "gyre-checkpoint-1"}, r / CHECKPOINT)
    assert main(["eval", str(r)]) == 2
    _one_line_error(capsys, str(r / CHECKPOINT), "lacks model")
    assert main(["train", "classify", "--out", str(r), "--resume", "--no-progress"]) == 2
    _one_line_error(capsys, "lacks")
    good = (run / CHECKPOINT).read_bytes()
    for broken in (good[:len(good) // 2], b"garbage", b""):  # cut short, or another kind of file
        (r / CHECKPOINT).write_bytes(broken)
        assert main(["eval", str(r)]) == 2
        _one_line_error(capsys, str(r / CHECKPOINT), "truncated or not a torch checkpoint")
    planted = tmp_path / "code-ran"
    torch.save({"format": "gyre-checkpoint-1", "x": _Planted(str(planted))}, r / CHECKPOINT)
    assert main(["eval", str(r)]) == 2
    _one_line_error(capsys, "never runs code")
    assert not planted.exists()
    (tmp_path / "afile").write_text("x")
    assert main(["train", "classify", *FAST, "--epochs", "1", "--out", str(tmp_path / "afile")]) == 2
    _one_line_error(capsys, "out: ", "is a file")
    shutil.rmtree(r)
    shutil.copytree(run, r)
    assert main(["predict", str(r), str(tmp_path / "d.npz"), "-o",
                 str(tmp_path / "missing" / "p.csv")]) == 2
    _one_line_error(capsys, "--output", "missing")
    np.savez(tmp_path / "obj.npz", X=np.array([np.zeros((3, 1)), np.zeros((4, 1))], dtype=object),
             y=np.array(["a", "b"]))
    assert main(["predict", str(r), str(tmp_path / "obj.npz")]) == 2
    _one_line_error(capsys, str(tmp_path / "obj.npz"), "--data", "'X'", "dtype object")


_KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    sys.path.insert(0, {root!r})
    from test_train import SeqModel, _data
    from gyre.train import Trainer, TrainConfig
    import gyre.train.trainer as tr
    writes = [0]
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith("checkpoint"):
            writes[0] += 1
            if writes[0] == 2:  # the second checkpoint write: its temporary file is complete
                os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    tr.os.replace = replace
    data, _, _ = _data(n=10, T=5, seed=3)
    torch.manual_seed(0)
    Trainer(SeqModel(dropout=0.3), nn.functional.mse_loss, TrainConfig(**{cfg!r}),
            out_dir={out!r}).fit(data[:8], data[8:])
""")


def test_kill_9_during_checkpoint_write_loses_nothing(tmp_path):
    """kill -9 in the middle of the second checkpoint write: the first epoch's checkpoint is
    intact, its stale temporary file is removed at the next start, and the resumed run ends
    bit-identical to an uninterrupted one."""
    cfg = dict(epochs=3, batch_size=3, optimizer="adam", lr=0.01, scheduler="cosine",
               clip_norm=1.0, seed=7, progress=False, tensorboard=False, csv=True, device="cpu")
    data, _, _ = _data(n=10, T=5, seed=3)
    torch.manual_seed(0)
    ref = SeqModel(dropout=0.3)
    Trainer(ref, nn.functional.mse_loss, TrainConfig(**cfg)).fit(data[:8], data[8:])
    out = tmp_path / "killed"
    root = os.path.dirname(os.path.abspath(__file__))
    script = _KILLED.format(root=root, cfg=cfg, out=str(out))
    p = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    stale = [f.name for f in out.iterdir() if ".tmp-" in f.name]
    assert stale and all(f.startswith(".checkpoint.tmp-") for f in stale)
    assert load_checkpoint(out)["epoch"] == 1
    torch.manual_seed(99)
    resumed = SeqModel(dropout=0.3)
    res = Trainer(resumed, nn.functional.mse_loss, TrainConfig(**cfg), out_dir=out).fit(
        data[:8], data[8:], resume=True)
    assert res["epochs_run"] == 3
    assert not [f for f in out.iterdir() if ".tmp-" in f.name]
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# -- the text tasks: the same resume rules through the same checks -----------------------------------
def planted_texts(path, n=240, seed=0, word="great"):
    """A CSV of ``n`` texts of 5-10 random neutral words; half hold ``word`` at a random place and
    are labelled ``pos``, the others ``neg``: the planted word alone decides the label."""
    rng = np.random.default_rng(seed)
    rows = ["text,label"]
    for i in range(n):
        words = [f"w{k}" for k in rng.integers(0, 12, rng.integers(5, 11))]
        if i % 2:
            words.insert(int(rng.integers(0, len(words) + 1)), word)
        rows.append(f"{' '.join(words)},{'pos' if i % 2 else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


TEXT_FAST = ["--hidden", "4", "--embed", "4", "--no-progress", "--no-tensorboard", "--device",
             "cpu", "--threads", "1", "--epochs", "1"]


def _text_args(task, folder):
    if task == "sentiment":
        return ["--data", str(planted_texts(folder / "p.csv", n=60)), "--tokenizer", "word",
                "--text-column", "text", "--label-column", "label"]
    if task == "lm":
        text = "".join(f"line {i} of a small text to model.\n" for i in range(80))
        (folder / "t.txt").write_text(text)
        return ["--data", str(folder / "t.txt"), "--batch-size", "4", "--tbptt", "20",
                "--ngram-order", "0", "--eval-tracks", "2"]
    pairs = "".join(f"the {w} number {i}\tle {w} numero {i}\n" for i in range(12)
                    for w in ("cat", "dog"))
    (folder / "p.tsv").write_text(pairs)
    return ["--data", str(folder / "p.tsv"), "--tokenizer", "word", "--beam", "1",
            "--batch-size", "8"]


#: per text task: a refused change, then changes a resumed run makes (with the key they set)
TEXT_CASES = {
    "sentiment": (["--max-tokens", "8"], ["--lr", "0.5"], ("lr", 0.5)),
    "lm": (["--tbptt", "10"], ["--lr", "0.5", "--eval-tracks", "3"], ("eval_tracks", 3)),
    "translate": (["--attention", "luong"], ["--lr", "0.5", "--beam", "2"], ("beam", 2)),
}


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """One finished 1-epoch run of each text task on a tiny file."""
    pytest.importorskip("sklearn")
    runs = {}
    for task in TEXT_CASES:
        folder = tmp_path_factory.mktemp(task)
        args = _text_args(task, folder)
        assert main(["train", task, *args, *TEXT_FAST, "--out", str(folder / "r")]) == 0
        runs[task] = folder / "r"
    return runs


@pytest.mark.parametrize("task", list(TEXT_CASES))
def test_text_task_resume_refuses_then_honours(task, text_runs, tmp_path, capsys):
    """sentiment / lm / translate: a changed data or architecture flag is refused in one line
    with nothing written; the resumable flags (and the task's evaluation settings) take effect,
    config.toml is rewritten at the resumed start, and a stale temporary checkpoint goes."""
    import shutil
    import tomllib
    refused, allowed, (key, value) = TEXT_CASES[task]
    r = tmp_path / "r"
    shutil.copytree(text_runs[task], r)
    before = {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", task, "--out", str(r), "--resume", *refused]) == 2
    _one_line_error(capsys, "resume:", "cannot change", refused[0])
    assert {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()} == before
    (r / ".checkpoint.tmp-999999").write_bytes(b"partial")
    assert main(["train", task, "--out", str(r), "--resume", "--epochs", "2", *allowed,
                 "--no-progress", "--threads", "1"]) == 0
    ckpt = load_checkpoint(r)
    assert ckpt["epoch"] == 2 and ckpt["config"]["lr"] == 0.5
    saved = tomllib.loads((r / "config.toml").read_text())
    assert saved["epochs"] == 2 and saved["lr"] == 0.5 and saved[key] == value
    assert not [f for f in r.iterdir() if ".tmp-" in f.name]
