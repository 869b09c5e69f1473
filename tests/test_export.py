"""ONNX export: every cell (built-in and user) in onnxruntime equals gyre at lengths and batch
sizes other than the trace's, with and without lengths, stacked and bidirectional; whole runs
with their head through gyre export / gyre predict --runtime onnxruntime; torch.export; bad input."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import shutil

import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx as onnx_lib  # noqa: E402

from gyre import cells  # noqa: E402
from gyre.cli import main  # noqa: E402
from gyre.export import OnnxModel, onnx, torch_export  # noqa: E402
from gyre.nn import LSTM, Recurrent  # noqa: E402
from gyre.tasks import classify  # noqa: E402
from gyre.tasks import forecast as F  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "user_cell", pathlib.Path(__file__).parents[1] / "examples" / "user_cell.py")
user_cell = importlib.util.module_from_spec(spec)
spec.loader.exec_module(user_cell)

NATIVE = {"rnn": "RNN", "rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "peephole": "LSTM",
          "gru": "GRU", "gru_cho": "GRU"}


def _close(a, b):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        # fp32: atol 1e-5 (rtol 1e-5 for LSTM cell states, which grow past 1)
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx_lib.load(str(path)).graph.node}


@pytest.mark.parametrize("name", cells.names() + ["user:mi_rnn"])
def test_every_cell_exports_and_matches_onnxruntime(name, tmp_path):
    torch.manual_seed(0)
    cell = user_cell.MIRNN() if name.startswith("user:") else name
    for layers, bi, lens, batch_first in ((1, False, False, False), (2, True, True, True)):
        # gyre's side on the reference loop: no fused kernel to compile per cell here (the
        # backends' equality is test_fused's and test_cells')
        m = Recurrent(cell, 3, 5, layers, bidirectional=bi, batch_first=batch_first,
                      residual=layers > 1, backend="reference").eval()
        path = onnx(m, tmp_path / f"{layers}{bi}.onnx", lengths=lens)
        ops = _ops(path)
        if name in NATIVE:
            assert NATIVE[name] in ops and "Scan" not in ops
        else:
            assert "Scan" in ops
        run = OnnxModel(path)
        K = layers * (2 if bi else 1)
        for B, T in ((4, 9), (1, 1), (3, 13)):  # the trace used B=2, T=3 / 5
            x = torch.randn(B, T, 3) if batch_first else torch.randn(T, B, 3)
            n = torch.randint(1, T + 1, (B,)) if lens else None
            h0 = tuple(torch.randn(K, B, s) for s in m.state_sizes)
            h0 = h0[0] if len(h0) == 1 else h0
            with torch.no_grad():
                want = m(x, h0, lengths=n)
            _close(want[0], run(x, h0, lengths=n)[0])
            _close(want[1], run(x, h0, lengths=n)[1])


def test_zoneout_and_projection_take_the_scan(tmp_path):
    torch.manual_seed(1)
    for m in (LSTM(3, 6, proj_size=2).eval(), Recurrent("gru", 3, 4, zoneout=(0.3,)).eval()):
        path = onnx(m, tmp_path / "m.onnx")
        assert "Scan" in _ops(path)
        x = torch.randn(7, 2, 3)
        with torch.no_grad():
            want = m(x)
        got = OnnxModel(path)(x)
        _close(want[0], got[0])
        _close(want[1], got[1])


def test_bad_input(tmp_path):
    m = LSTM(3, 4)
    with pytest.raises(ValueError, match="opset: got 5"):
        onnx(m, tmp_path / "m.onnx", opset=5)
    with pytest.raises(ValueError, match="opset: got 99"):
        onnx(m, tmp_path / "m.onnx", opset=99)
    with pytest.raises(TypeError, match="model: got LSTM, expected a gyre.nn.Recurrent"):
        onnx(torch.nn.LSTM(3, 4), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="model: got FCN"):
        onnx(classify.FCN(2, 3), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="float32"):
        onnx(LSTM(3, 4).double(), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="lengths: got int"):
        onnx(m, tmp_path / "m.onnx", lengths=1)
    rec = F.Forecaster("lstm", 1, [0], 3, 4, strategy="recursive")
    with pytest.raises(ValueError, match="strategy='recursive'"):
        onnx(rec, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    path = onnx(m, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="without a lengths input"):
        OnnxModel(path)(torch.randn(2, 1, 3), lengths=[2])
    with pytest.raises(FileNotFoundError, match="gyre export"):
        OnnxModel(tmp_path / "nothing.onnx")


@pytest.mark.parametrize("cell", ["lstm", "gated_004", "ln_gru"])
def test_torch_export_traces_the_layer(cell):
    torch.manual_seed(2)
    m = Recurrent(cell, 3, 4, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 3)
    prog = torch_export(m, (x,))
    want = m(x)
    got = prog.module()(x)
    _close(want[0], got[0])
    assert m.backend == "auto"  # restored
    # a second batch through the same program: batch is not baked in beyond the example's
    x2 = torch.randn(2, 6, 3)
    _close(m(x2)[0], prog.module()(x2)[0])


def _wide_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label"] + [f"t{i}" for i in range(len(rows[0]))])
        for r in rows:
            w.writerow(["?"] + [f"{v:.6f}" for v in r])


def test_framed_classifier_exports_with_its_head(tmp_path):
    """frame=5: export_pre's framing (and its lengths) is in the graph."""
    m = classify.RecurrentClassifier("lstm", 2, 3, 8, 1, False, head="last+mean", frame=5).eval()
    x, n = torch.randn(4, 23, 2), torch.tensor([23, 5, 11, 1])
    with torch.no_grad():
        want = m(x, lengths=n)[0]
    torch.testing.assert_close(OnnxModel(onnx(m, tmp_path / "m.onnx"))(x, lengths=n)[0], want,
                               atol=1e-5, rtol=1e-5)


def test_classify_run_exports_and_predicts_the_same_in_onnxruntime(italy_run, tmp_path, capsys):
    from gyre.data import classification as cd
    run = tmp_path / "run"
    shutil.copytree(italy_run, run)
    assert main(["export", str(run)]) == 0
    assert (run / "model.onnx").is_file()
    d = cd.load("italy_power_demand")
    data = tmp_path / "some.csv"
    _wide_csv(data, [x[:, 0] for x in d.X_test[:20]])
    a = classify.predict(run, str(data))
    b = classify.predict(run, str(data), runtime="onnxruntime")
    assert [r["label"] for r in a] == [r["label"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            if k.startswith("prob_"):
                assert abs(ra[k] - rb[k]) < 1e-5
    capsys.readouterr()
    assert main(["predict", str(run), str(data), "--runtime", "onnxruntime"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 21 and out[1].split(",")[1] == a[0]["label"]
    assert main(["export", str(run), "--opset", "3"]) == 2
    assert "gyre: error: opset: got 3" in capsys.readouterr().err


def test_forecast_run_exports_with_its_head(airline_run, tmp_path):
    shutil.copytree(airline_run, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "run" / "model.onnx")]) == 0
    a = F.predict(tmp_path / "run")
    b = F.predict(tmp_path / "run", runtime="onnxruntime")
    assert len(a) == len(b) == 12
    for ra, rb in zip(a, b, strict=True):
        assert ra["step"] == rb["step"] and abs(ra["forecast"] - rb["forecast"]) < 1e-3
    with pytest.raises(ValueError, match="runtime: got 'tvm'"):
        F.predict(tmp_path / "run", runtime="tvm")


@pytest.mark.parametrize("kw", [
    dict(center=True, future=[1, 2]),
    dict(n_ids=3, id_dim=2, future=[2], bidirectional=True),
    dict(quantiles=[0.1, 0.5, 0.9], future=[2], residual="seasonal", season=3),
    dict(distribution="studentt", center=True),
], ids=["future_centered", "ids_bi", "quantiles_seasonal", "studentt"])
def test_forecaster_extras_follow_the_hook_and_export(kw, tmp_path):
    """Future covariates (x holds lookback + horizon steps), the series-id embedding and the
    probabilistic heads: forward is export_head(rnn(export_pre(x)), x) and onnxruntime equals it
    at lengths shorter than x's inputs, the unknown id (-1) included."""
    torch.manual_seed(0)
    bi = kw.pop("bidirectional", False)
    m = F.Forecaster("lstm", 3, [0], 4, 8, bidirectional=bi, **kw).eval()
    x = torch.randn(5, 14, m.export_features)
    if m.n_ids:
        x[:, :, -1] = torch.tensor([0.0, 1, 2, -1, 1])[:, None]
    lengths = torch.tensor([10, 7, 10, 3, 8])
    with torch.no_grad():
        y, _ = m(x, lengths=lengths)
        xr, _ = m.export_pre(x, lengths)
        assert torch.equal(m.export_head(m.rnn(xr, lengths=lengths)[0], x, lengths), y)
    assert y.shape == ((5, 4, 1, 3) if m.probabilistic else (5, 4, 1))
    y_ort, _ = OnnxModel(onnx(m, tmp_path / "m.onnx"))(x, lengths=lengths)
    torch.testing.assert_close(y_ort, y, atol=1e-5, rtol=1e-5)


def test_text_runs_export_and_predict_the_same_in_onnxruntime(tmp_path):
    """sentiment (with an n-gram part) and lm runs: the graph takes token ids (B, T) int64;
    gyre predict --runtime onnxruntime gives what torch gives."""
    from gyre.data import text as td
    from gyre.tasks import lm, sentiment
    quick = dict(progress=False, tensorboard=False, device="cpu", epochs=1, hidden=8, embed=8,
                 tokenizer="word", vocab_size=300)
    food = td.load_sentiment("fine_food")
    small = tmp_path / "food.csv"
    with open(small, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "score"])
        w.writerows([t, food.classes[y]] for t, y in zip(food.train_texts[:240],
                                                         food.y_train[:240], strict=True))
    run = tmp_path / "sent"
    sentiment.train(sentiment.Config(data=str(small), out=str(run), max_tokens=32,
                                     batch_size=64, wide=2, wide_lr_scale=10, **quick))
    assert sentiment.load_run(run)[1].wide.weight.abs().max() > 0  # the part is in the graph
    assert main(["export", str(run)]) == 0
    texts = tmp_path / "few.txt"
    texts.write_text("\n".join(food.test_texts[:6]))
    a = sentiment.predict(run, str(texts))
    b = sentiment.predict(run, str(texts), runtime="onnxruntime")
    assert [r["label"] for r in a] == [r["label"] for r in b] and len(a) == 6
    assert max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b, strict=True) for k in ra
               if k.startswith("prob_")) < 1e-5
    plays = tmp_path / "play.txt"
    plays.write_text(td.shakespeare_plays()["macbeth"][:6000])
    run = tmp_path / "lm"
    lm.train(lm.Config(data=str(plays), out=str(run), tbptt=40, batch_size=8, ngram_order=0,
                       **quick))
    assert main(["export", str(run)]) == 0
    lines = tmp_path / "lines.txt"
    lines.write_text("Fair is foul, and foul is fair:\nHover through the fog and filthy air.\n")
    a = lm.predict(run, str(lines))
    b = lm.predict(run, str(lines), runtime="onnxruntime")
    assert len(a) == 2 and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["bits_per_char"] - rb["bits_per_char"]) < 1e-4
