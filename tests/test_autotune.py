"""``backend="auto"`` by measurement (gyre.engine.autotune): the mechanism under a fake clock and
forced timings, never real ones; whichever backend wins, results equal the reference."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from gyre import cells, engine
from gyre.engine import autotune


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Autotuning on, a fresh cache dir, and a fake clock: each measured run of backend b
    advances it by ``cost[b]`` seconds; ``calls`` lists the backends measured."""
    monkeypatch.setenv("GYRE_AUTOTUNE", "1")
    monkeypatch.setenv("GYRE_CACHE_DIR", str(tmp_path))
    autotune.forget()
    now = [0.0]
    cost: dict[str, float] = {}
    calls: list[str] = []
    real = engine._measure

    def measure(cell, params, x, hx, grad, backend, kwargs):
        calls.append(backend)
        real(cell, params, x, hx, grad, backend, kwargs)
        now[0] += cost.get(backend, 1.0)

    monkeypatch.setattr(engine, "_measure", measure)
    monkeypatch.setattr(autotune, "clock", lambda: now[0])
    yield cost, calls
    autotune.forget()


def _lstm_call(dtype=torch.float64, grad=True, x_grad=False, T=6, B=3, I=4, H=5):
    torch.manual_seed(1)
    m = torch.nn.LSTM(I, H).to(dtype)
    p = [[{k.replace("_l0", ""): v for k, v in m.named_parameters()}]]
    for d in p[0]:
        for v in d.values():
            v.requires_grad_(grad)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=x_grad)
    h = (torch.zeros(1, B, H, dtype=dtype), torch.zeros(1, B, H, dtype=dtype))
    return p, x, h


def _run(cell, p, x, h, backend="auto"):
    return engine.run(cell, p, x, h, backend=backend)


def test_fastest_measured_backend_is_kept_in_memory_and_on_disk(tuned, caplog):
    cost, calls = tuned
    lstm = cells.get("lstm")
    opts = engine.Options(grad="params", size=(3, 5))
    cands = engine.eligible(lstm, opts, "cpu")
    if "fused" not in cands:
        pytest.skip("fused kernels cannot be built here")
    assert cands[0] == "native"  # the static rule's choice at this size
    cost.update(native=5.0, fused=1.0)
    p, x, h = _lstm_call()
    with caplog.at_level(logging.INFO, logger="gyre.engine"):
        out = _run(lstm, p, x, h)
    # bounded: WARMUP untimed and at most 1 + CALLS timed runs per backend, reference not among
    # them
    assert set(calls) == {"native", "fused"}
    assert all(calls.count(b) <= autotune.WARMUP + 1 + autotune.CALLS for b in set(calls))
    assert [r for r in caplog.records if "autotune" in r.getMessage()][0].levelno == logging.INFO
    assert "-> fused" in caplog.text
    key = next(iter(autotune._memory))
    assert autotune._memory[key] == "fused"
    # the call itself ran the winner and equals the static choice's result
    ref = _run(lstm, p, x, h, backend="reference")
    torch.testing.assert_close(out.output, ref.output, atol=1e-10, rtol=0)
    # a second call measures nothing and logs nothing
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gyre.engine"):
        _run(lstm, p, x, h)
    assert calls == [] and "autotune" not in caplog.text
    # the disk cache answers after memory is dropped (a new process)
    disk = json.loads(autotune.cache_path().read_text())
    assert disk == {key: "fused"}
    autotune.forget()
    _run(lstm, p, x, h)
    assert calls == []


def test_key_separates_grad_modes_and_shape_buckets(tuned):
    cost, calls = tuned
    lstm = cells.get("lstm")
    if "fused" not in engine.eligible(lstm, engine.Options(), "cpu"):
        pytest.skip("fused kernels cannot be built here")
    keys = set()
    for kw in (dict(grad=False), dict(grad=True), dict(grad=True, x_grad=True),
               dict(grad=False, T=7), dict(grad=False, T=9)):
        p, x, h = _lstm_call(**kw)
        if not kw["grad"]:
            with torch.no_grad():
                _run(lstm, p, x, h)
        else:
            _run(lstm, p, x, h)
        keys |= set(autotune._memory)
    # forward only / parameters / input too; T=6 and T=7 share the bucket 8, T=9 is 16
    assert len(keys) == 4
    assert sum("|none|" in k for k in keys) == 2
    assert sum("|params|" in k for k in keys) == 1 and sum("|input|" in k for k in keys) == 1


def test_every_winner_gives_the_reference_result(tuned):
    """Forced timings make each eligible backend win in turn: outputs, states and every gradient
    (the input's included) equal the reference in float64."""
    cost, calls = tuned
    gru = cells.get("gru")
    cands = [b for b in engine.eligible(gru, engine.Options(grad="input"), "cpu")
             if b != "reference"]  # the eager loop is not measured when another can run
    p, x, h = _lstm_call(x_grad=True)
    torch.manual_seed(2)
    pg = [[{k: torch.randn(3 * 5, *v.shape[1:], dtype=v.dtype, requires_grad=True)
            for k, v in p[0][0].items()}]]
    hg = (h[0],)
    ref = _run(gru, pg, x, hg, backend="reference")
    want = torch.autograd.grad(ref.output.pow(2).sum(), [x, *pg[0][0].values()])
    for winner in cands:
        autotune.forget()
        cost.clear()
        cost.update({b: (0.5 if b == winner else 2.0) for b in cands})
        res = _run(gru, pg, x, hg)
        assert next(iter(autotune._memory.values())) == winner
        got = torch.autograd.grad(res.output.pow(2).sum(), [x, *pg[0][0].values()])
        torch.testing.assert_close(res.output, ref.output, atol=1e-10, rtol=0)
        torch.testing.assert_close(res.state[0], ref.state[0], atol=1e-10, rtol=0)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        autotune.forget()  # the next winner is measured afresh, not read from disk
        autotune.cache_path().unlink(missing_ok=True)


def test_measuring_leaves_the_callers_state_alone(tuned):
    """The measured runs use detached copies: no gradient reaches the caller's parameters and
    the global random state is where it was."""
    lstm = cells.get("lstm")
    p, x, h = _lstm_call()
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    with torch.no_grad():
        _run(lstm, p, x, h)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(v.grad is None for v in p[0][0].values())


def test_off_switch_and_forced_backend_measure_nothing(tuned, monkeypatch):
    cost, calls = tuned
    lstm = cells.get("lstm")
    p, x, h = _lstm_call()
    _run(lstm, p, x, h, backend="native")
    assert calls == []
    monkeypatch.setenv("GYRE_AUTOTUNE", "0")
    _run(lstm, p, x, h)
    assert calls == [] and autotune._memory == {}


def _choose_on_fake_clock(monkeypatch, tmp_path, key, cost_of):
    """``autotune.choose(key, ["a", "b"], ...)`` where the n-th run of backend b advances a fake
    clock by ``cost_of(b, n)`` seconds; (the choice, the backends run in order)."""
    monkeypatch.setenv("GYRE_CACHE_DIR", str(tmp_path))
    now = [0.0]
    seen = []

    def measure(b):
        seen.append(b)
        now[0] += cost_of(b, seen.count(b))

    monkeypatch.setattr(autotune, "clock", lambda: now[0])
    autotune.forget()
    try:
        return autotune.choose(key, ["a", "b"], measure), seen
    finally:
        autotune.forget()


def test_a_slow_backend_is_not_timed_further(monkeypatch, tmp_path):
    """GIVE_UP: a backend whose first timed run (after the untimed ones) is far slower than the
    best is dropped after it, and with one backend left nothing is timed further; the choice
    itself follows the forced timings."""
    chosen, seen = _choose_on_fake_clock(monkeypatch, tmp_path, "k-give-up",
                                         lambda b, n: {"a": 1.0, "b": 100.0}[b])
    assert chosen == "a"
    assert seen.count("b") == autotune.WARMUP + 1
    assert seen.count("a") == autotune.WARMUP + 1  # nothing left to compare it with


def test_one_time_costs_of_a_first_call_drop_no_backend(monkeypatch, tmp_path):
    """A backend whose first call is slow once (a build, a trace) and fast after is timed like
    any other, and wins when it is the fastest."""
    chosen, seen = _choose_on_fake_clock(
        monkeypatch, tmp_path, "k-one-time",
        lambda b, n: 0.5 if (b, n) == ("b", 1) else {"a": 0.02, "b": 0.01}[b])
    assert chosen == "b"
    assert seen.count("b") == autotune.WARMUP + 1 + autotune.CALLS


def test_timed_calls_alternate_between_backends(monkeypatch, tmp_path):
    """After each backend's untimed first call and first timed one, the timed ones go round by
    round, the order reversed each round, so a drift in the machine's speed weighs on every
    backend alike."""
    monkeypatch.setenv("GYRE_CACHE_DIR", str(tmp_path))
    now = [0.0]
    seen = []
    cost = {"a": 0.1, "b": 0.15}  # within BUDGET_S: every round runs

    def measure(b):
        seen.append(b)
        now[0] += cost[b]

    monkeypatch.setattr(autotune, "clock", lambda: now[0])
    autotune.forget()
    try:
        assert autotune.choose("k-alternate", ["a", "b"], measure) == "a"
    finally:
        autotune.forget()
    first = 2 * (autotune.WARMUP + 1)
    assert seen[:first] == ["a"] * (first // 2) + ["b"] * (first // 2)
    assert len(seen) == first + 2 * autotune.CALLS
    rounds = [seen[first + 2 * r:first + 2 + 2 * r] for r in range(autotune.CALLS)]
    assert rounds == [["a", "b"] if r % 2 == 0 else ["b", "a"] for r in range(autotune.CALLS)]


def test_one_thread_measures_cpu_time_not_waiting(monkeypatch, tmp_path):
    """With one torch thread the default clock is the thread's CPU time: time the process spends
    descheduled (here: asleep) is not charged to the backend running."""
    monkeypatch.setenv("GYRE_CACHE_DIR", str(tmp_path))
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    autotune.forget()

    def measure(b):
        if b == "waits":
            time.sleep(0.02)  # wall time, almost no CPU
        else:
            t0 = time.thread_time()
            while time.thread_time() - t0 < 0.005:
                pass

    try:
        assert autotune.choose("k-cpu-clock", ["busy", "waits"], measure) == "waits"
    finally:
        torch.set_num_threads(threads)
        autotune.forget()


def test_cache_file_changes_with_the_engine_source(monkeypatch):
    """Choices measured on other kernels are not reused: the cache file is named after the
    engine's source too."""
    assert autotune.engine_hash() == autotune.engine_hash()  # stable in a process
    before = autotune.cache_path()
    monkeypatch.setattr(autotune, "_engine_hash", "0" * 16)
    assert autotune.cache_path() != before


def test_decision_takes_each_backends_best_call_with_a_margin_for_the_static_order():
    """decide() on injected timings (nothing timed): the smallest best call wins, a later
    backend of the static order only by more than MARGIN; a backend's slow calls (load, a
    first call's leftovers) do not count against its best one; a backend without timings is out."""
    m = autotune.MARGIN
    # the 2L-bi LSTM at (200,16,32,64): native's calls steady, fused's first ones slow, its best
    # 30% faster (what one timed call per backend could get wrong)
    times = {"native": [0.0270, 0.0272, 0.0271, 0.0275],
             "fused": [0.0400, 0.0330, 0.0190, 0.0192]}
    assert autotune.decide(times, ["native", "fused"]) == "fused"
    assert autotune.decide({"native": [1.0], "fused": [1.0 - m / 2]}, ["native", "fused"]) == \
        "native"
    assert autotune.decide({"native": [1.0], "fused": [1.0 - 2 * m]}, ["native", "fused"]) == \
        "fused"
    assert autotune.decide({"native": [1.0, 0.5], "fused": [0.6]}, ["native", "fused"]) == "native"
    assert autotune.decide({"fused": [2.0], "scan": []}, ["native", "fused", "scan"]) == "fused"
    assert autotune.decide({}, ["native", "fused"]) == "native"


def test_warm_up_calls_and_the_best_of_several_decide(monkeypatch, tmp_path):
    """choose() on a fake clock: the second warm-up call of a backend still pays one-time costs
    (not timed), and a backend slower in its first timed calls (a pool still growing, another
    process) but fastest over the rounds wins."""
    def cost(b, n):
        if b == "a":
            return 0.027
        return {1: 0.5, 2: 0.2, 3: 0.04, 4: 0.035}.get(n, 0.019)

    chosen, seen = _choose_on_fake_clock(monkeypatch, tmp_path, "k-warm", cost)
    assert chosen == "b"
    assert seen.count("b") == autotune.WARMUP + 1 + autotune.CALLS
