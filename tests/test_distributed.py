"""Data parallel training: 2 processes (torchrun's launcher, gloo on 127.0.0.1) end with the
weights of one process trained on the same global batches, resume included."""

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


def _ddp(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    p = subprocess.run([sys.executable, "-m", "gyre", "train", *args, "--nproc", "2"], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _single(args):
    before = torch.get_num_threads()
    try:
        assert main(["train", *args, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)


COMMON = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--epochs", "1", "--hidden", "8"]
# classify: the recurrent model; conv-rnn's batch statistics are per process under DDP
CLASSIFY = ["--model", "rnn"]


@pytest.mark.parametrize("task", ["classify", "forecast"])
def test_two_processes_equal_one_with_the_same_global_batch(task, italy64, tmp_path):
    """Two epochs with gradient accumulation over 2 micro-steps (classify: the second epoch a
    resume under DDP): each process takes half of every global batch and syncs once per
    optimizer step."""
    if task == "classify":
        args = ["classify", "--data", str(italy64), "--head-dropout", "0", "--no-dtw",
                "--batch-size", "8", "--accumulate", "2", *CLASSIFY, *COMMON]
    else:  # 70 training windows of the airline series at lookback 25
        args = ["forecast", "--data", "airline", "--lookback", "25", "--baselines", "none",
                "--batch-size", "10", "--accumulate", "2", "--patience", "0", *COMMON]
    resume = task == "classify"
    if not resume:
        args[args.index("--epochs") + 1] = "2"
    _ddp([*args, "--out", "d"], tmp_path)
    if resume:
        _ddp([task, "--out", "d", "--resume", "--epochs", "2", "--no-progress"], tmp_path)
    _single([*args, "--out", str(tmp_path / "s")])
    if resume:
        _single([task, "--out", str(tmp_path / "s"), "--resume", "--epochs", "2", "--no-progress"])
    a, b = load_checkpoint(tmp_path / "d"), load_checkpoint(tmp_path / "s")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    for ra, rb in zip(a["history"], b["history"], strict=True):  # loss over both processes
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
    # rank 0 alone wrote: one set of files, metrics from the run's own test split
    assert (tmp_path / "d" / "metrics.json").is_file()
    assert not [f for f in (tmp_path / "d").iterdir() if ".tmp-" in f.name]
