"""int8: onnxruntime's dynamic per-channel quantization of a run's export; gyre quantize
measures metric and time before and after and saves them with the run; bad input."""

from __future__ import annotations

import json

import onnx
import pytest

pytest.importorskip("onnxruntime")

from gyre import quantize  # noqa: E402
from gyre.cli import main  # noqa: E402
from gyre.tasks import classify, forecast  # noqa: E402


def test_gyre_quantize_on_a_classify_run(tmp_path, capsys):
    cfg = classify.Config(data="italy_power_demand", out=str(tmp_path / "run"), epochs=2, model="rnn",
                          hidden=16, dtw=False, progress=False, tensorboard=False, device="cpu")
    m = classify.train(cfg)
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


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="src"):
        quantize.quantize_onnx(tmp_path / "none.onnx", tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="no score_test"):
        quantize.quantize_run(forecast, tmp_path)
