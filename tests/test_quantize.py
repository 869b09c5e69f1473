"""int8: onnxruntime's dynamic per-channel quantization of a run's export; gyre quantize
measures metric and time before and after and saves them with the run; bad input."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

pytest.importorskip("onnxruntime")

from gyre import quantize  # noqa: E402
from gyre.cli import main  # noqa: E402
from gyre.tasks import lm  # noqa: E402


def test_gyre_quantize_on_a_classify_run(italy_run, tmp_path, capsys):
    shutil.copytree(italy_run, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert main(["quantize", str(tmp_path / "run"), "--threads", "1"]) == 0
    res = json.loads((tmp_path / "run" / "quantize.json").read_text())
    rows = res["rows"]
    assert set(rows) == {"torch fp32", "onnxruntime fp32", "onnxruntime int8"}
    assert rows["torch fp32"]["accuracy"] == pytest.approx(m["test"]["accuracy"], abs=1e-9)
    assert rows["onnxruntime fp32"]["accuracy"] == pytest.approx(m["test"]["accuracy"], abs=1e-3)
    assert abs(rows["onnxruntime int8"]["accuracy"] - m["test"]["accuracy"]) < 0.05
    ops = {n.op_type for n in onnx.load(str(tmp_path / "run" / "model.int8.onnx")).graph.node}
    assert "DynamicQuantizeLSTM" in ops  # the LSTM's own weights are int8
    assert "int8 vs fp32" in capsys.readouterr().out


def test_gyre_quantize_on_a_forecast_run(airline_run, tmp_path):
    """The task's metric (MASE and the rest) before and after, from the same test windows."""
    shutil.copytree(airline_run, tmp_path / "run")
    want = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert main(["quantize", str(tmp_path / "run"), "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "run" / "quantize.json").read_text())["rows"]
    assert rows["torch fp32"]["mase"] == pytest.approx(want["mase"], abs=1e-9)
    assert rows["onnxruntime fp32"]["mase"] == pytest.approx(want["mase"], rel=1e-4)
    assert rows["onnxruntime int8"]["mase"] == pytest.approx(want["mase"], rel=0.05)
    assert all(r["test_seconds"] > 0 for r in rows.values())


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="src"):
        quantize.quantize_onnx(tmp_path / "none.onnx", tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="'lm' is not covered"):
        quantize.quantize_run(lm, tmp_path)
