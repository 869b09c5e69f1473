"""benchmarks/keras_fit.py and benchmarks/keras_step_breakdown.py run (the quiet-machine
commands of BENCHMARKS.md's issue 17 section) and write what they report; no timing is checked."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("keras")
pytest.importorskip("aeon")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keras_fit_writes_every_round(tmp_path):
    out = tmp_path / "fit.json"
    variants = ["gyre.keras", "torch.nn", "keras", "gyre.nn", "gyre.keras-ops"]
    assert _load("keras_fit").main(
        ["--data", "italy_power_demand", "--rounds", "2", "--warmup", "0", "--max-series", "8",
         "--variants", ",".join(variants), "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["data"] == "italy_power_demand" and res["shape"] == [8, 24, 1]
    assert res["steps_per_epoch"] == 1
    for v in variants:
        assert len(res["cpu_s"][v]) == len(res["wall_s"][v]) == 2
        assert all(t > 0 for t in res["cpu_s"][v] + res["wall_s"][v])
    assert set(res["ratios_cpu"]) == {"gyre.keras / torch.nn", "keras / gyre.keras",
                                      "gyre.nn / torch.nn", "gyre.keras / gyre.nn",
                                      "gyre.keras-ops / gyre.keras", "gyre.keras-ops / torch.nn"}


def test_keras_fit_rejects_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        _load("keras_fit").main(["--variants", "gyre.keras,tf", "--json", ""])
    assert "--variants: got ['tf']" in capsys.readouterr().err


def test_keras_step_breakdown_writes_every_part(tmp_path):
    out = tmp_path / "parts.json"
    assert _load("keras_step_breakdown").main(
        ["--data", "italy_power_demand", "--rounds", "1", "--reps", "1", "--layer-reps", "2",
         "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    k, t = res["gyre_keras_ms"], res["torch_ms"]
    for part in ("fit step (epoch / steps)", "forward", "backward", "optimizer", "train_step",
                 "lstm1 fwd: engine.run", "lstm2 fwd: via Keras's RNN.call - engine.run"):
        assert part in k
    assert k["train_step"] > 0 and k["forward"] > 0
    lean = res["gyre_keras_lean_ms"]
    assert {"lstm 1: call", "lstm 2: call", "dense 3: call", "loss", "backward", "optimizer", "metrics",
            "fit loop around train_step"} <= set(lean)
    assert 0 < lean["backward"] < lean["train_step"] < lean["fit step (epoch / steps)"]
    assert t["step"] > 0 and set(t) >= {"lstm1 fwd", "backward", ".item() bookkeeping"}


def test_keras_fit_split_writes_every_part(tmp_path):
    out = tmp_path / "split.json"
    assert _load("keras_fit_split").main(
        ["--data", "italy_power_demand", "--rounds", "1", "--epochs", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    med = res["median_cpu_ms"]
    assert set(med) == {"gyre.keras", "gyre.keras-ops", "torch.nn"}
    for v, parts in med.items():
        assert set(parts) == set(_load("keras_fit_split").PARTS)
        assert 0 < parts["backward"] < parts["steps"] <= parts["epoch"], (v, parts)
        assert parts["forward"] > 0 and parts["optimizer"] > 0 and parts["loss"] > 0, (v, parts)
