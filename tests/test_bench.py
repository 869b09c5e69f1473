"""``gyre bench``: a tiny quick run has the promised structure and every timed gyre layer equals
torch with the same weights. Times are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gyre import bench
from gyre.bench import cases

TINY = ["--quick", "--shapes", "5,2,3,4", "--stream-steps", "3", "--threads", "1", "--clock", "cpu",
        "--min-window", "0", "--max-case-seconds", "0.05", "--long-lengths", "8,16"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    path = d / "run.json"
    rc = bench.main([*TINY, "--cells", "rnn,lstm,gru,peephole,mingru", "--backends", "all",
                     "--json", str(path), "--markdown", str(d / "RUN.md")])
    return rc, json.loads(path.read_text()), d


def test_quick_run_json_structure(quick_run):
    rc, rec, _ = quick_run
    assert rc == 0
    assert rec["errors"] == []
    meta = rec["meta"]
    for key in ("cpu", "logical_cores", "threads", "torch", "date", "python", "spec"):
        assert meta[key] not in (None, ""), key
    assert meta["torch"] == torch.__version__ and meta["threads"] == 1
    assert "gyre_commit" in meta  # the checkout's commit, None outside git
    assert rec["gemm"][0]["gemm"] == "square" and rec["gemm"][0]["M"] == 2048
    assert all(g["gflops_per_s"] > 0 for g in rec["gemm"])
    assert {(g["M"], g["K"], g["N"]) for g in rec["gemm"][1:]} == {(2, 4, 16), (1, 128, 512)}
    impls = meta["spec"]["impls"]
    assert impls[:3] == ["torch", "eager", "auto"] and set(bench.gyre_backends()) <= set(impls)
    got = {(r["cell"], r["mode"], r["impl"]) for r in rec["results"]}
    for cell in ("rnn", "lstm", "gru", "peephole", "mingru"):
        for mode in ("fwd", "train", "train-params", "stream"):
            for impl in ("torch", "eager", "auto"):
                assert (cell, mode, impl) in got, (cell, mode, impl)
    # each shape also has the 2-layer bidirectional LSTM, against torch's own 2-layer one
    stacked = [r for r in rec["results"] if r.get("layers") == 2]
    assert {(r["mode"], r["impl"]) for r in stacked} >= {
        (m, i) for m in ("fwd", "train", "train-params") for i in ("torch", "auto", "fused")}
    assert all(r["bidirectional"] and r["mode"] != "stream" for r in stacked)
    one = next(r for r in rec["results"] if r["cell"] == "lstm" and r["impl"] == "torch"
               and r["mode"] == "fwd" and "layers" not in r)
    two = next(r for r in stacked if r["impl"] == "torch" and r["mode"] == "fwd")
    # 2 directions of layer 1 (I=3) + 2 of layer 2 (input 2H=8) over one direction of layer 1
    assert two["min_s"] * two["gflops_per_s"] == pytest.approx(
        one["min_s"] * one["gflops_per_s"] * (2 * (3 + 4) + 2 * (8 + 4)) / (3 + 4))
    # the long section: every implementation at each length, with its peak memory
    long = {(r["cell"], r["impl"], r["T"]) for r in rec["long"]}
    for cell, impl in cases.LONG_IMPLS:
        for T in (8, 16):
            assert (cell, impl, T) in long
    for r in rec["long"]:
        assert r["min_s"] > 0 and r["gflops_per_s"] > 0 and (r["B"], r["I"], r["H"]) == (2, 16, 16)
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
    assert ("mingru", "train", "scan") in got and ("lstm", "fwd", "native") in got
    assert ("peephole", "fwd", "native") not in got  # native cannot run it: not timed
    for r in rec["results"]:
        assert r["min_s"] > 0 and r["n"] >= 1 and r["gflops_per_s"] > 0
        assert "foreign_cpu_frac" in r  # how busy the rest of the machine was meanwhile
        shape = (r["T"], r["B"], r["I"], r["H"])
        assert shape == ((1, 1, 64, 128) if r["mode"] == "stream" else (5, 2, 3, 4))
        if r["mode"] == "stream":
            assert r["steps"] == 3
            assert r["per_step_s"] == pytest.approx(r["min_s"] / 3)
        if r["impl"] == "torch":
            want = {"rnn": "RNN", "gru": "GRU"}.get(r["cell"], "LSTM")
            assert r["layer"] == f"torch.nn.{want}"
        else:
            assert r["backend"] in ("reference", "native", "scan", "fused")
            # timed in alternation with the case's torch layer: its time from the same window
            assert r["torch_paired_min_s"] > 0
    assert meta["spec"]["timing"]["clock"] == "cpu"
    assert meta["autotune"] is True  # auto as users run it: autotuned, choices made in the run
    assert all(r["chosen_by"] == "autotune" for r in rec["results"] if r["impl"] == "auto")
    auto = {r["cell"]: r["backend"] for r in rec["results"] if r["impl"] == "auto"}
    assert auto["mingru"] in ("scan", "fused")
    assert auto["lstm"] != "reference"


def test_every_timed_gyre_layer_equals_torch(quick_run):
    _, rec, _ = quick_run
    checked = 0
    for r in rec["results"]:
        if r["impl"] == "torch" or "same_as" in r:
            continue
        c = r["check"]
        if r["cell"] in ("rnn", "lstm", "gru"):
            assert c["against"] == f"torch.nn.{r['cell'].upper()}"
        elif r["backend"] == "reference":
            assert c["against"].startswith("none")  # the eager loop is the reference itself
            continue
        assert c["out_max_abs_err"] <= 1e-5, r
        if r["mode"] in ("train", "train-params"):
            assert c["grad_max_rel_err"] <= 1e-5, r
        if r["mode"] == "stream":
            assert c["state_max_abs_err"] <= 1e-5, r
        checked += 1
    assert checked >= 20


def test_check_catches_a_wrong_layer():
    """The numerics check is not vacuous: a perturbed weight shows up."""
    m = cases.build("lstm", "auto", 3, 4)
    x = cases.inputs(5, 2, 3)
    assert cases.check("lstm", m, "train", x)["out_max_abs_err"] < 1e-6
    with torch.no_grad():
        m.weight_hh_l0[0, 0] += 0.5
    c = cases.check("lstm", m, "train", x)
    assert c["out_max_abs_err"] > 1e-3 and c["grad_max_rel_err"] > 1e-3


def test_train_mode_computes_the_input_gradient():
    m = cases.build("lstm", "fused", 3, 4)
    x = cases.inputs(5, 2, 3)
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].requires_grad))
    cases.make_fn(m, "train", x)()
    cases.make_fn(m, "train-params", x)()
    assert seen == [True, False]
    # the input's gradient is part of the check in train mode: a layer that gets it wrong fails
    twin = cases.build("lstm", "fused", 3, 4)
    assert cases.check("lstm", twin, "train", x)["grad_max_rel_err"] < 1e-5
    with torch.no_grad():
        twin.weight_ih_l0[0, 0] += 0.5
        twin.bias_ih_l0[0] -= 0.5  # changes the input gradient; the weight's only through it
    assert cases.check("lstm", twin, "train", x)["grad_max_rel_err"] > 1e-3


def test_auto_column_is_what_autotune_chose(monkeypatch, tmp_path):
    """The bench reports the backend auto ran: autotune's choice where autotune chooses (here
    made to pick the static rule's last candidate), the static rule where it is off."""
    from gyre import engine
    from gyre.engine import autotune, fused

    monkeypatch.setenv("GYRE_CACHE_DIR", str(tmp_path))
    x = cases.inputs(5, 2, 3)
    m = cases.build("lstm", "auto", 3, 4)
    static = engine.select_backend(m.cell, "auto", size=(2, 4), grad=True)
    assert static == "native"
    assert cases.auto_backend(m, "train", x) == "native"  # GYRE_AUTOTUNE=0 in the suite
    monkeypatch.setenv("GYRE_AUTOTUNE", "1")
    asked = []

    def last(key, candidates, measure):
        asked.append(list(candidates))
        return candidates[-1]

    monkeypatch.setattr(autotune, "choose", last)
    ran = []
    run_layer = fused.run_layer
    monkeypatch.setattr(fused, "run_layer", lambda *a, **k: ran.append(1) or run_layer(*a, **k))
    assert cases.auto_backend(m, "train", x) == asked[-1][-1] == "fused"
    assert asked[-1][0] == "native" and ran  # the call it made ran fused
    assert autotune.choose is last  # the spy is removed again


def test_peak_memory_sees_a_big_allocation():
    from gyre.bench import harness

    peak = harness.peak_memory(lambda: torch.ones(64, 2**20 // 4).sum())  # 64 MiB held at once
    if peak is not None:  # None where /proc/self/clear_refs is not there
        assert 60 * 2**20 <= peak < 200 * 2**20


def test_markdown_from_json(quick_run, tmp_path):
    _, rec, d = quick_run
    out = bench.write_markdown(d / "run.json", tmp_path / "BENCHMARKS.md")
    text = out.read_text()
    assert rec["meta"]["cpu"] in text and rec["meta"]["torch"] in text
    assert "| cell | mode | T,B,I,H | torch layer | torch | eager | auto |" in text
    assert "## sgemm ceiling" in text and "## Targets" in text and "## Numerics" in text
    for cell in ("rnn", "lstm", "gru", "peephole", "mingru"):
        assert f"| {cell} | train | 5,2,3,4 |" in text
        assert f"| {cell} | train-params | 5,2,3,4 |" in text
    assert "| lstm 2L-bi | train | 5,2,3,4 | LSTM |" in text
    assert "## Long sequences" in text and "| mingru | scan | scan | 16 |" in text
    # a gyre layer's ratio is to the torch time from its own window, not the torch row's
    for r in rec["results"]:
        if r["impl"] == "auto" and r["mode"] == "train" and r["cell"] == "lstm" \
                and "layers" not in r:
            row = next(line for line in text.splitlines() if line.startswith("| lstm | train |"))
            want = f"[{r['min_s'] / r['torch_paired_min_s']:.2f}x]"
            assert want in row.split("|")[7], (want, row)  # the auto column
    # a target row whose auto ran torch's own kernel says so
    for r in rec["results"]:
        targeted = {"rnn": ("fwd",), "lstm": ("fwd", "train"), "gru": ("fwd", "train")}
        if r["impl"] == "auto" and r["mode"] in targeted.get(r["cell"], ()) and "layers" not in r:
            row = next(line for line in text.splitlines() if line.startswith("| <= ")
                       and f" | {r['cell']} {r['mode']} 5,2,3,4 |" in line)
            assert ("torch's own kernel" in row) == (r["backend"] == "native"), row
    assert (d / "RUN.md").read_text().startswith("# gyre benchmarks")
    # latest() picks the newest run by its recorded date
    older = dict(rec, meta=dict(rec["meta"], date="2000-01-01T00:00:00+00:00"))
    bench.save(older, tmp_path / "res" / "zzz-old.json")
    bench.save(rec, tmp_path / "res" / "aaa-new.json")
    assert bench.latest(tmp_path / "res").name == "aaa-new.json"


def test_time_pair_alternates_and_keeps_both_minima():
    from gyre.bench import harness

    calls = []
    timing = harness.Timing(warmup=1, reps=4, min_window_s=0.0, max_case_s=1.0, min_reps=1)
    r = harness.time_pair(lambda: calls.append("a"), lambda: calls.append("b"), timing)
    assert r["n"] == 4 and r["min_s"] > 0 and r["base_min_s"] > 0
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2  # warm-up, then order swapped each round


def test_flops_formulas():
    T, B, I, H = 7, 3, 5, 11
    assert cases.flops_fwd("lstm", T, B, I, H) == 2 * T * B * 4 * H * (I + H)
    assert cases.flops_fwd("peephole", T, B, I, H) == 2 * T * B * 4 * H * (I + H)
    assert cases.flops_fwd("gru", T, B, I, H) == 2 * T * B * 3 * H * (I + H)
    assert cases.flops_fwd("rnn", T, B, I, H) == 2 * T * B * H * (I + H)
    assert cases.flops_fwd("mingru", T, B, I, H) == 2 * T * B * 2 * H * I
    assert cases.flops_fwd("rnn_output", T, B, I, H) == 2 * T * B * H * (I + H) + 2 * T * B * H * H


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"cells: got \['lstmm'\], expected names from"):
        bench.run(cells=["lstmm"])
    with pytest.raises(ValueError, match=r"backends: got \['cuda'\], expected some of"):
        bench.run(cells=["lstm"], backends=["cuda"])
    with pytest.raises(ValueError, match=r"shapes: got \(1, 2, 3\), expected \(T, B, I, H\)"):
        bench.run(cells=["lstm"], shapes=[(1, 2, 3)])
    with pytest.raises(ValueError, match=r"modes: got \['slow'\]"):
        bench.run(cells=["lstm"], modes=["slow"])
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "1,2,x,4", "--no-json"])
    with pytest.raises(ValueError, match=r"clock: 'cpu' .* needs threads=1; got threads=2"):
        bench.run(cells=["lstm"], threads=2, timing=bench.Timing(clock="cpu"))


def test_cpu_clock_counts_the_calls_cpu_not_waiting():
    """--clock cpu (one thread): a call that sleeps costs almost nothing, one that computes
    costs its CPU time; the wall clock charges both."""
    import time

    from gyre.bench import harness

    def waits():
        time.sleep(0.02)

    cpu = harness.time_fn(waits, bench.Timing(warmup=1, reps=3, min_window_s=0, clock="cpu"))
    wall = harness.time_fn(waits, bench.Timing(warmup=1, reps=3, min_window_s=0))
    assert cpu["min_s"] < 0.005 and wall["min_s"] >= 0.02


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "gyre.bench", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--backends" in r.stdout and "--quick" in r.stdout


def test_no_eager_leaves_the_eager_column_out():
    rec = bench.run(cells=["rnn"], shapes=[(3, 2, 3, 4)], modes=["fwd"], threads=1, eager=False,
                    gemm=False, check=False, stacks=(), timing=bench.Timing.quick(),
                    log=lambda *a: None)
    assert rec["meta"]["spec"]["impls"] == ["torch", "auto"]
    assert {r["impl"] for r in rec["results"]} == {"torch", "auto"}
