"""Trainer: hand-computed clipping, accumulation and truncated BPTT; exact resume; NaN stop."""

import copy
import os
import signal

import pytest
import torch
from torch import nn

from gyre.nn import Recurrent
from gyre.train import CHECKPOINT, NonFiniteLossError, TrainConfig, Trainer, load_checkpoint


class SeqModel(nn.Module):
    """Per-step regression: Recurrent + linear head; the contract's forward(x, state, lengths)."""

    def __init__(self, cell="lstm", dropout=0.0):
        super().__init__()
        self.rnn = Recurrent(cell, 3, 5, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(5, 2)

    def forward(self, x, state=None, *, lengths=None):
        out, state = self.rnn(x, state, lengths=lengths)
        return self.head(self.drop(out)), state


class LastModel(SeqModel):
    def forward(self, x, state=None, *, lengths=None):
        out, state = super().forward(x, state, lengths=lengths)
        return out[:, -1], state


def _data(n=8, T=6, per_step=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, T, 3, generator=g)
    Y = torch.randn(n, T, 2, generator=g) if per_step else torch.randn(n, 2, generator=g)
    return list(zip(X, Y, strict=True)), X, Y


def _cfg(**kw):
    base = dict(epochs=1, batch_size=4, optimizer="sgd", lr=0.1, shuffle=False, progress=False,
                tensorboard=False, csv=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _sgd_by_hand(model, grads, lr):
    return {k: p.detach() - lr * grads[k] for k, p in model.named_parameters()}


def _grads(model, x, y, loss_scale=1.0):
    model.zero_grad()
    out, _ = model(x)
    (nn.functional.mse_loss(out, y) * loss_scale).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _assert_params(model, expected, atol=1e-6):
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], atol=atol, rtol=0, msg=k)


def test_accumulation_equals_one_big_batch():
    data, X, Y = _data(n=8, per_step=False)
    torch.manual_seed(0)
    model = LastModel()
    start = copy.deepcopy(model)
    # 4 micro-batches of 2 accumulated == one batch of 8 == the hand computation
    expected = _sgd_by_hand(start, _grads(copy.deepcopy(start), X, Y), 0.1)
    Trainer(model, nn.functional.mse_loss, _cfg(batch_size=2, accumulate=4)).fit(data)
    _assert_params(model, expected)
    big = copy.deepcopy(start)
    Trainer(big, nn.functional.mse_loss, _cfg(batch_size=8)).fit(data)
    _assert_params(model, dict(big.named_parameters()))


@pytest.mark.parametrize("how", ["norm", "value"])
def test_clipping_matches_hand_computation(how):
    data, X, Y = _data(n=4, per_step=False)
    torch.manual_seed(1)
    model = LastModel()
    g = _grads(copy.deepcopy(model), X, Y)
    if how == "norm":
        limit = 0.05
        total = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        assert total > limit  # the clip is active
        clipped = {k: v * (limit / (total + 1e-6)) for k, v in g.items()}
        cfg = _cfg(clip_norm=limit, lr=1.0)
    else:
        limit = 0.01
        assert max(v.abs().max() for v in g.values()) > limit
        clipped = {k: v.clamp(-limit, limit) for k, v in g.items()}
        cfg = _cfg(clip_value=limit, lr=1.0)
    expected = _sgd_by_hand(model, clipped, 1.0)
    Trainer(model, nn.functional.mse_loss, cfg).fit(data)
    _assert_params(model, expected)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_truncated_bptt_matches_manual_detach(accumulate):
    data, X, Y = _data(n=4, T=10)
    torch.manual_seed(2)
    model = SeqModel()
    manual = copy.deepcopy(model)
    full = copy.deepcopy(model)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    state, k = None, 4  # chunks of 4, 4, 2 steps
    for i, s in enumerate(range(0, 10, k)):
        out, state = manual(X[:, s:s + k], state)
        (nn.functional.mse_loss(out, Y[:, s:s + k]) / accumulate).backward()
        state = tuple(t.detach() for t in state)
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    Trainer(model, nn.functional.mse_loss, _cfg(tbptt=k, accumulate=accumulate)).fit(data)
    _assert_params(model, dict(manual.named_parameters()))
    if accumulate == 3:  # detaching changes the gradient: full BPTT of the same losses differs
        opt = torch.optim.SGD(full.parameters(), lr=0.1)
        out, _ = full(X)
        sum(nn.functional.mse_loss(out[:, s:s + k], Y[:, s:s + k]) / 3
            for s in range(0, 10, k)).backward()
        opt.step()
        w = "rnn.weight_hh_l0"
        assert not torch.allclose(dict(full.named_parameters())[w], dict(model.named_parameters())[w],
                                  atol=1e-7)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_onecycle_length_counts_tbptt_chunks(accumulate):
    """A per-step schedule is planned in optimizer steps: under truncated BPTT each batch
    takes one per chunk (3 chunks of a 10-step batch here), so onecycle ends on the last one."""
    data, _, _ = _data(n=8, T=10)
    t = Trainer(SeqModel(), nn.functional.mse_loss,
                _cfg(epochs=2, tbptt=4, accumulate=accumulate, scheduler="onecycle",
                     scheduler_interval="step"))
    t.fit(data)
    assert t.global_step == 2 * -(-2 * 3 // accumulate)
    assert t.scheduler.total_steps == t.global_step == t.scheduler.last_epoch


def test_tbptt_rejects_per_sequence_targets():
    data, _, _ = _data(per_step=False)
    with pytest.raises(ValueError, match="tbptt"):
        Trainer(LastModel(), nn.functional.mse_loss, _cfg(tbptt=2)).fit(data)


def _resume_cfg(**kw):
    return _cfg(epochs=4, batch_size=3, optimizer="adam", lr=0.01, shuffle=True,
                scheduler="cosine", clip_norm=1.0, seed=7, **kw)


@pytest.mark.parametrize("stop_at", ["mid_epoch_sigint", "epoch_end"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, stop_at):
    data, _, _ = _data(n=10, T=5, seed=3)
    train, val = data[:8], data[8:]
    torch.manual_seed(0)
    init = SeqModel(dropout=0.3).state_dict()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background

    def model():
        m = SeqModel(dropout=0.3)
        m.load_state_dict(init)
        return m

    ref = model()
    Trainer(ref, nn.functional.mse_loss, _resume_cfg(), out_dir=tmp_path / "a").fit(train, val)

    def stop(trainer, event, info):
        if stop_at == "mid_epoch_sigint" and event == "step" and info["global_step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the handler asks for a stop
        if stop_at == "epoch_end" and event == "epoch" and info["epoch"] == 2:
            trainer.request_stop()

    first = model()
    res = Trainer(first, nn.functional.mse_loss, _resume_cfg(), out_dir=tmp_path / "b",
                  callback=stop).fit(train, val)
    assert res["interrupted"]
    ckpt = load_checkpoint(tmp_path / "b")
    assert (ckpt["epoch"], ckpt["batch"]) == ((1, 1) if stop_at != "epoch_end" else (2, 0))
    torch.manual_seed(123)  # disturb global RNG: resume must restore it
    resumed = SeqModel(dropout=0.3)  # fresh weights: resume loads them
    res = Trainer(resumed, nn.functional.mse_loss, _resume_cfg(), out_dir=tmp_path / "b").fit(
        train, val, resume=True)
    assert not res["interrupted"] and res["epochs_run"] == 4
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is removed


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data, _, _ = _data(n=8, T=5)
    torch.manual_seed(0)
    model = SeqModel()
    after_first = {}

    def poison(trainer, event, info):
        if event == "epoch" and info["epoch"] == 1:
            after_first.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            with torch.no_grad():
                trainer.model.head.bias.fill_(float("nan"))

    trainer = Trainer(model, nn.functional.mse_loss, _cfg(epochs=3), out_dir=tmp_path,
                      callback=poison)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 1.*last good checkpoint "
                                                 r"\(epoch 1\) is kept"):
        trainer.fit(data)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 1
    for k, v in after_first.items():
        assert torch.equal(ckpt["model"][k], v)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temp files left


def test_early_stopping_restores_best_and_writes_logs(tmp_path):
    data, _, _ = _data(n=10, T=5)
    snapshots = {}

    def keep(trainer, event, info):
        if event == "epoch":
            snapshots[info["epoch"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    torch.manual_seed(0)
    model = SeqModel()
    # "epoch" only grows, so with mode=min the first epoch stays best: stop after patience more
    cfg = _cfg(epochs=10, patience=2, monitor="epoch", mode="min", tensorboard=True, csv=True)
    res = Trainer(model, nn.functional.mse_loss, cfg, out_dir=tmp_path, callback=keep).fit(
        data[:8], data[8:])
    assert res["stopped_early"] and res["epochs_run"] == 3 and res["best_epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k])
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "train_loss", "lr"] and len(rows) == 4
    assert "val_loss" in rows[0]
    assert any((tmp_path / "tensorboard").iterdir())


def test_bf16_autocast_trains_finite():
    data, _, _ = _data(n=8, T=6)
    torch.manual_seed(0)
    model = SeqModel()
    res = Trainer(model, nn.functional.mse_loss, _cfg(epochs=2, bf16=True, tbptt=3)).fit(data)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in res["history"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_trainer_takes_lengths_and_any_optimizer():
    data, _, _ = _data(n=6, T=5, per_step=False)

    def collate(items):
        xs, ys = zip(*items, strict=True)
        return {"x": torch.stack(xs), "y": torch.stack(ys),
                "lengths": torch.tensor([5, 3, 2][: len(xs)])}

    model = LastModel()
    res = Trainer(model, nn.functional.mse_loss, _cfg(batch_size=3, optimizer="RMSprop",
                                                      scheduler="step"), collate=collate).fit(data)
    assert res["epochs_run"] == 1


@pytest.mark.parametrize("kw, match", [
    ({"epochs": 0}, "epochs"), ({"clip_norm": -1.0}, "clip_norm"), ({"optimizer": "nope"},
                                                                     "optimizer"),
    ({"scheduler": "nope"}, "scheduler"), ({"device": "tpu"}, "device"), ({"mode": "up"}, "mode"),
    ({"accumulate": 0}, "accumulate"), ({"lr": 0.0}, "lr"),
])
def test_bad_train_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="no CUDA device"):
        Trainer(SeqModel(), nn.functional.mse_loss, _cfg(device="cuda"))


def test_resume_without_checkpoint_and_patience_without_val(tmp_path):
    data, _, _ = _data()
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        Trainer(SeqModel(), nn.functional.mse_loss, _cfg(), out_dir=tmp_path).fit(data, resume=True)
    with pytest.raises(ValueError, match="patience"):
        Trainer(SeqModel(), nn.functional.mse_loss, _cfg(patience=2)).fit(data)


@pytest.mark.parametrize("scheduler,interval", [("cosine", "epoch"), ("onecycle", "step")])
def test_resume_with_more_epochs_replans_the_schedule(tmp_path, scheduler, interval):
    """A run of 2 epochs resumed with epochs=4 follows the 4-epoch schedule from the resumed step
    on: the rates of epochs 3-4 are those of an uninterrupted 4-epoch run (computed by torch's
    own scheduler on a fresh optimizer), not a schedule that already ended."""
    data, _, _ = _data(n=8, T=4)
    kw = dict(scheduler=scheduler, scheduler_interval=interval, lr=0.05)
    torch.manual_seed(0)
    Trainer(SeqModel(), nn.functional.mse_loss, _cfg(epochs=2, **kw), out_dir=tmp_path).fit(data)
    torch.manual_seed(0)
    trainer = Trainer(SeqModel(), nn.functional.mse_loss, _cfg(epochs=4, **kw), out_dir=tmp_path)
    result = trainer.fit(data, resume=True)
    assert result["epochs_run"] == 4
    lrs = [r["lr"] for r in result["history"]]  # the rate after each epoch's scheduler steps

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    if scheduler == "cosine":
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        steps_per_epoch = 1
    else:
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=4 * 2)
        steps_per_epoch = 2  # 8 examples, batch 4
    expected = []  # the history's lr: at the end of the epoch, before an epoch-level step
    for _ in range(4):
        for _ in range(steps_per_epoch):
            opt.step()
            if interval == "step":
                ref.step()
        expected.append(opt.param_groups[0]["lr"])
        if interval == "epoch":
            ref.step()
    # epochs 1-2 ran under the 2-epoch plan; the resumed epochs 3-4 follow the 4-epoch plan
    assert lrs[2:] == pytest.approx(expected[2:], rel=1e-9, abs=1e-12)
    assert lrs[-1] != pytest.approx(lrs[1])


def test_progress_bar_in_a_log_file_is_not_redrawn_every_batch(capsys):
    """stderr that is not a terminal (a log file, CI) gets a redraw every 30 s, not one per
    batch: 40 batches in well under 30 s leave the first and the final line only."""
    data, _, _ = _data(n=40, T=3)
    Trainer(SeqModel(), nn.functional.mse_loss, _cfg(batch_size=1, progress=True)).fit(data)
    err = capsys.readouterr().err
    assert "40/40" in err and err.count("\r") <= 3
