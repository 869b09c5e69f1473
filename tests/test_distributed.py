"""Data parallel training: 2 processes (torchrun's launcher, gloo on 127.0.0.1) end with the
weights of one process trained on the same global batches, resume included."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gyre.cli import main
from gyre.data import classification as cd
from gyre.train import load_checkpoint
from gyre.train.distributed import Context, shard


def test_shard_deals_each_global_batch_once():
    order = list(np.random.default_rng(0).permutation(12))
    parts = [shard(order, 4, Context(r, 2)) for r in range(2)]
    assert all(bs == 2 for _, bs in parts)
    for b in range(3):  # process r's b-th batch of 2, together: the global b-th batch of 4
        got = sorted(i for items, bs in parts for i in items[b * bs:(b + 1) * bs])
        assert got == sorted(order[4 * b:4 * b + 4])
    blocks = [shard(list(range(10)), 4, Context(r, 2), "contiguous")[0] for r in range(2)]
    assert blocks == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="batch_size: 5 does not split evenly over 2 processes"):
        shard(order, 5, Context(0, 2))


@pytest.fixture(scope="module")
def italy64(tmp_path_factory):
    """64 training and 40 test sequences of ItalyPowerDemand (an even count: no sampler padding)."""
    d = cd.load("italy_power_demand")
    path = tmp_path_factory.mktemp("data") / "italy64.npz"
    names = np.array(d.classes)
    np.savez(path, X_train=np.stack(d.X_train[:64]), y_train=names[d.y_train[:64]],
             X_test=np.stack(d.X_test[:40]), y_test=names[d.y_test[:40]])
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}

#: run in each of torchrun's processes: several trainings (and resumes) in one process group,
#: each from its command-line flags as ``gyre train`` reads them
DRIVER = """
import json, sys, torch
from gyre import cli, tasks
from gyre.train import distributed
torch.set_num_threads(1)
assert distributed.init_from_env("cpu")
try:
    for task, argv in json.load(open(sys.argv[1])):
        config, resume = cli._build_config(task, tasks.get(task), argv)
        tasks.get(task).train(config, resume=resume)
finally:
    distributed.shutdown()
"""


def _ddp(args, cwd):
    """``gyre train ... --nproc 2``: the launcher this machine's users run."""
    p = subprocess.run([sys.executable, "-m", "gyre", "train", *args, "--nproc", "2"], cwd=cwd,
                       env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _ddp_many(runs, cwd):
    """``torchrun --standalone --nproc-per-node 2`` of :data:`DRIVER` over ``runs`` (task,
    flags): one start-up of the processes for all of them."""
    (cwd / "driver.py").write_text(DRIVER)
    (cwd / "runs.json").write_text(json.dumps(runs))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "driver.py", "runs.json"], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def _single(args):
    before = torch.get_num_threads()
    try:
        assert main(["train", *args, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)


COMMON = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--epochs", "1", "--hidden", "8"]
# classify: the recurrent model; conv-rnn's batch statistics are per process under DDP
CLASSIFY = ["--model", "rnn"]


def _lm_text(folder):
    text = "".join(f"line {i} of a small text, {i % 7} times over.\n" for i in range(120))
    (folder / "t.txt").write_text(text)
    return folder / "t.txt"


def _cases(italy64, folder):
    """Per task: the flags of a run of 1 epoch, and whether its second epoch is a resume.
    Every case accumulates gradients over 2 micro-steps (lm: 2 truncated-BPTT chunks)."""
    from test_resume import planted_texts
    return {
        "classify": (["--data", str(italy64), "--head-dropout", "0", "--no-dtw", "--no-minirocket",
                      "--batch-size", "8", "--accumulate", "2", *CLASSIFY, *COMMON], True),
        # 70 training windows of the airline series at lookback 25
        "forecast": (["--data", "airline", "--lookback", "25", "--baselines", "none",
                      "--batch-size", "10", "--accumulate", "2", "--patience", "0", "--ensemble", "1",
                      "--no-refit", *COMMON], False),
        # 8 contiguous tracks (4 a process) in chunks of 16 tokens, state carried between chunks
        "lm": (["--data", str(_lm_text(folder)), "--batch-size", "8", "--tbptt", "16",
                "--accumulate", "2", "--embed", "8", "--ngram-order", "0", "--eval-tracks", "2",
                *COMMON], True),
        # 48 training texts, interleaved over the processes (DistributedSampler)
        "sentiment": (["--data", str(planted_texts(folder / "p.csv", n=60)), "--tokenizer", "word",
                       "--text-column", "text", "--label-column", "label", "--val-fraction", "0",
                       "--embed", "8", "--embed-dropout", "0", "--head-dropout", "0",
                       "--batch-size", "8", "--accumulate", "2", *COMMON], False),
    }


def test_two_processes_equal_one_with_the_same_global_batch(italy64, tmp_path):
    """Two epochs of classify, forecast, lm (truncated BPTT with carried state, contiguous
    tracks per process) and sentiment, with gradient accumulation over 2 micro-steps (classify
    and lm: the second epoch a resume under DDP): each process takes its part of every global
    batch and syncs once per optimizer step, and the weights equal one process's."""
    cases = _cases(italy64, tmp_path)
    first, second = [], []
    for task, (args, resume) in cases.items():
        args = list(args)
        if not resume:
            args[args.index("--epochs") + 1] = "2"
        (first if task != "classify" else []).append([task, [*args, "--out", f"d_{task}"]])
        if resume:
            second.append([task, ["--out", f"d_{task}", "--resume", "--epochs", "2",
                                  "--no-progress"]])
    # classify through the command users run, the others (and the resumes) in one start-up
    _ddp(["classify", *cases["classify"][0], "--out", "d_classify"], tmp_path)
    _ddp_many(first + second, tmp_path)
    for task, (args, resume) in cases.items():
        args = list(args)
        if not resume:
            args[args.index("--epochs") + 1] = "2"
        single = str(tmp_path / f"s_{task}")
        _single([task, *args, "--out", single])
        if resume:
            _single([task, "--out", single, "--resume", "--epochs", "2", "--no-progress"])
        a, b = load_checkpoint(tmp_path / f"d_{task}"), load_checkpoint(single)
        assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"], task
        for k, v in b["model"].items():
            torch.testing.assert_close(a["model"][k], v, atol=1e-5, rtol=1e-4, msg=f"{task} {k}")
        for ra, rb in zip(a["history"], b["history"], strict=True):  # loss over both processes
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5), task
        # rank 0 alone wrote: one set of files, metrics from the run's own test split
        d = tmp_path / f"d_{task}"
        assert (d / "metrics.json").is_file(), task
        assert not [f for f in d.iterdir() if ".tmp-" in f.name], task


class _CountingDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: records, per forward, whether it ran inside
    ``no_sync`` (where DDP skips the gradient all-reduce of the backward that follows)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.synced, self._off = module, [], False

    def forward(self, *args, **kwargs):
        self.synced.append(not self._off)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self._off = True
        try:
            yield
        finally:
            self._off = False


@pytest.mark.parametrize("tbptt, want", [
    (0, [False, True, False, True, True]),  # 5 batches, accumulate 2: the last flushes alone
    (2, [False, True] * 3),  # 2 batches of 3 chunks: the accumulation runs across batches
])
def test_gradients_sync_only_on_the_last_micro_step(tbptt, want):
    from test_train import SeqModel, _data

    from gyre.train import TrainConfig, Trainer
    data, _, _ = _data(n=10 if not tbptt else 8, T=6)
    t = Trainer(SeqModel(), torch.nn.functional.mse_loss,
                TrainConfig(epochs=1, batch_size=2 if not tbptt else 4, accumulate=2, tbptt=tbptt,
                            shuffle=False, progress=False, tensorboard=False, csv=False,
                            device="cpu"))
    t._net = _CountingDDP(t.model)
    t.fit(data)
    assert t._net.synced == want
    assert t.global_step == sum(want)


def test_nproc_refuses_a_batch_that_does_not_split_before_starting(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "lm", "--data", "t.txt", "--batch-size", "3", "--nproc", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("gyre: error: --batch-size: 3 does not split evenly over --nproc 2 processes; "
                   "the global batch must be a multiple of the process count")
    assert not out.exists()
