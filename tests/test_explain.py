"""gyre explain: attributions land where the model looks, gradients in eval mode on every
backend, state and gate maps equal the cell's formula, and the deletion curve on real data."""

import json

import numpy as np
import pytest
import torch

from gyre.cli import main
from gyre.explain import Inputs, attribute, states
from gyre.nn import Recurrent
from gyre.tasks.classify import RecurrentClassifier

pytest.importorskip("captum")


def _inputs(model, x, lengths=None):
    model.eval()

    def forward(x, lengths):
        return model(x, lengths=lengths)[0]

    with torch.no_grad():
        target = forward(x, lengths).argmax(-1)
    return Inputs(model, forward, x, lengths, "t", [f"c{i}" for i in range(x.shape[2])],
                  target=target)


def _planted(channel=1, C=3, cell="lstm", backend="auto"):
    """A classifier whose recurrence reads only ``channel``: the other input columns are 0."""
    torch.manual_seed(0)
    m = RecurrentClassifier(cell, C, 3, hidden=8, bidirectional=False, head="last",
                            forget_bias=None)
    m.rnn.backend = backend
    with torch.no_grad():
        for name, p in m.rnn.named_parameters():
            if name.startswith("weight_ih_l0"):
                keep = torch.zeros(C, dtype=torch.bool)
                keep[channel] = True
                p[:, ~keep] = 0.0
                p[:, keep] *= 4.0  # a strong signal through the planted channel
    return m


@pytest.mark.parametrize("method", ["ig", "shap"])
def test_planted_channel_gets_the_attribution(method):
    m = _planted()
    x = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(1))
    a = attribute(_inputs(m, x), method, n_samples=400)
    share = np.abs(a).sum(axis=(0, 1))
    share = share / share.sum()
    assert share[1] >= 0.9, share


def test_eval_mode_gradients_equal_on_every_backend():
    """Integrated Gradients in eval mode (where cuDNN refuses an RNN backward) on the reference,
    native and fused backends for an LSTM, and on scan for minGRU: all equal the reference."""
    x = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([9, 6])
    for cell, backends in (("lstm", ["reference", "native", "fused"]),
                           ("mingru", ["reference", "scan"])):
        got = {}
        for b in backends:
            m = _planted(cell=cell, backend=b)
            got[b] = attribute(_inputs(m, x, lengths), "ig")
            assert np.isfinite(got[b]).all() and np.abs(got[b]).sum() > 0
            assert (got[b][1, 6:] == 0).all()  # padded steps
        for b in backends[1:]:
            np.testing.assert_allclose(got[b], got["reference"], atol=1e-5, rtol=1e-4,
                                       err_msg=f"{cell} {b}")


def test_state_and_gate_maps_follow_the_cell_formula():
    torch.manual_seed(3)
    rnn = Recurrent("lstm", 3, 4, num_layers=2, batch_first=True, bidirectional=True).eval()
    x, lengths = torch.randn(2, 6, 3), torch.tensor([6, 4])
    maps = states.record(rnn, lambda: rnn(x, lengths=lengths))
    _, _, st = rnn.forward_with_states(x, lengths=lengths)
    h = np.concatenate([maps["rnn.l1.h"], maps["rnn.l1_reverse.h"]], -1)
    np.testing.assert_allclose(h, st[0].detach().numpy(), atol=1e-6)
    # the forward direction's gates of layer 0, by hand from torch's LSTM formula
    p = {k: getattr(rnn, f"{k}_l0").detach() for k in ("weight_ih", "weight_hh", "bias_ih",
                                                        "bias_hh")}
    hs = torch.as_tensor(maps["rnn.l0.h"])
    prev = torch.cat([torch.zeros(2, 1, 4), hs[:, :-1]], 1)
    a = x @ p["weight_ih"].T + p["bias_ih"] + prev @ p["weight_hh"].T + p["bias_hh"]
    i, f, _, o = a.chunk(4, -1)
    for name, want in (("i", torch.sigmoid(i)), ("f", torch.sigmoid(f)), ("o", torch.sigmoid(o))):
        got = torch.as_tensor(maps[f"rnn.l0.{name}"])
        valid = (torch.arange(6)[None] < lengths[:, None])[..., None]
        torch.testing.assert_close(got, want * valid, atol=1e-5, rtol=0, msg=name)
    gru = Recurrent("gru", 3, 4, batch_first=True).eval()
    names = {k.split(".")[-1] for k in states.record(gru, lambda: gru(x))}
    assert {"r", "z", "n", "h"} <= names


FAST = ["--no-progress", "--no-tensorboard", "--device", "cpu", "--threads", "1"]


def test_deletion_curve_on_a_real_classification_run(tmp_path, capsys):
    """ItalyPowerDemand: deleting (setting to the training mean) the steps IG ranks highest
    lowers test accuracy more than deleting as many random steps."""
    out = tmp_path / "r"
    assert main(["train", "classify", "--data", "italy_power_demand", "--model", "rnn",
                 "--hidden", "16", "--epochs", "15", "--no-dtw", "--no-minirocket", "--frame", "1",
                 "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["explain", str(out), "--samples", "120", "--threads", "1"]) == 0
    assert "deletion curve" in capsys.readouterr().out
    s = json.loads((out / "explain" / "summary.json").read_text())
    d = s["deletion"]
    assert d["none"] > 0.85
    assert d["top"][1] < d["random"][1] - 0.05 and d["top"][2] < d["random"][2]
    z = np.load(out / "explain" / "ig.npz")
    assert z["attributions"].shape == z["x"].shape == (120, 24, 1)
    assert (out / "explain" / "ig.png").stat().st_size > 0
    assert any(k.endswith(".f") for k in np.load(out / "explain" / "states.npz").files)


def test_forecast_explain_with_occlusion_and_lime(tmp_path, capsys):
    out = tmp_path / "f"
    assert main(["train", "forecast", "--data", "airline", "--hidden", "4", "--epochs", "1",
                 "--baselines", "none", "--patience", "0", "--ensemble", "1", "--no-refit",
                 "--out", str(out), *FAST]) == 0
    for method in ("occlusion", "lime"):
        assert main(["explain", str(out), "--method", method]) == 0
        a = np.load(out / "explain" / f"{method}.npz")["attributions"]
        assert a.shape[0] == 1 and np.isfinite(a).all() and np.abs(a).sum() > 0
    capsys.readouterr()
    assert main(["explain", str(out), "--method", "gradcam"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gyre: error: --method: got 'gradcam'") and len(err.splitlines()) == 1


# -- text: attributions per token, through the embeddings --------------------------------------------
PLANTED = "great"


def _planted_text_model(vocab=16, planted=5, E=6):
    """A bidirectional LSTM text classifier (max+mean head) built to read one token: every
    other token's embedding lies in the dimensions the recurrence's input weights ignore."""
    from gyre.tasks.sentiment import TextClassifier
    torch.manual_seed(4)
    m = TextClassifier(vocab, 2, "lstm", embed=E, hidden=8, bidirectional=True, head="max+mean",
                       forget_bias=None)
    with torch.no_grad():
        w = m.embedding.weight
        w[:, :3] = 0.0
        w[planted, :3] = torch.tensor([2.0, -2.0, 2.0])
        w[0] = 0.0  # padding
        for name, p in m.rnn.named_parameters():
            if name.startswith("weight_ih_l0"):
                p[:, 3:] = 0.0
                p[:, :3] *= 3.0
        m.fc.weight *= 10.0  # a clear effect of the planted token on the output
    return m.eval()


@pytest.mark.parametrize("method", ["ig", "shap"])
def test_planted_token_gets_the_attribution(method):
    """Texts of different lengths with the planted token at different places: >= 90% of the
    attribution mass lands on it, at its own position (padding and the reverse direction
    put back in place)."""
    from gyre.explain.text import classifier_inputs
    rng = np.random.default_rng(5)
    ids, where = [], []
    for n in (4, 9, 6, 12, 7, 3):
        seq = [int(v) for v in rng.integers(6, 16, n)]
        k = int(rng.integers(0, n + 1))
        seq.insert(k, 5)
        ids.append(seq)
        where.append(k)
    tokens = [[PLANTED if t == 5 else f"w{t}" for t in s] for s in ids]
    inputs = classifier_inputs(_planted_text_model(), ids, tokens, "planted")
    per_token = attribute(inputs, method, n_samples=300).sum(-1)  # (N, T)
    a = np.abs(per_token)
    on = sum(a[i, k] for i, k in enumerate(where))
    assert on / a.sum() >= 0.9, (on / a.sum(), a.round(3))
    # completeness: a text's token attributions add up to f(text) - f(all padding)
    with torch.no_grad():
        rows = torch.arange(len(ids))
        gap = (inputs.forward(inputs.x, inputs.lengths)[rows, inputs.target]
               - inputs.forward(torch.zeros_like(inputs.x), inputs.lengths)[rows, inputs.target])
    assert gap.abs().min() > 0.02  # the planted token moves every text's output
    np.testing.assert_allclose(per_token.sum(1), gap.numpy(), rtol=0.03, atol=1e-3)
    assert all(int(np.argmax(a[i])) == k for i, k in enumerate(where))
    assert all((a[i, len(s):] == 0).all() for i, s in enumerate(ids))


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A sentiment run trained (word tokens, unidirectional LSTM, last-state head) on texts
    whose label the planted word alone decides."""
    from test_resume import planted_texts
    folder = tmp_path_factory.mktemp("planted")
    data = planted_texts(folder / "planted.csv", n=400)
    out = folder / "s"
    assert main(["train", "sentiment", "--data", str(data), "--text-column", "text",
                 "--label-column", "label", "--tokenizer", "word", "--hidden", "8", "--embed", "8",
                 "--no-bidirectional", "--head", "last", "--epochs", "8", "--lr", "0.01",
                 # from scratch: the shares below were measured on a model that learnt the
                 # planted word alone (a pretrained language model also reads the context)
                 "--pretrain-epochs", "0", "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.parametrize("method", ["ig", "shap"])
def test_sentiment_explain_finds_the_planted_word(planted_run, method, capsys):
    """gyre explain on a trained sentiment run: in every test text holding the planted word,
    that word is the most attributed token; deleting top tokens costs more than random ones;
    per-token .npz and PNG, state and gate maps over the tokens."""
    capsys.readouterr()
    assert main(["explain", str(planted_run), "--method", method, "--samples", "40",
                 "--threads", "1"]) == 0
    assert "most attributed token: " in capsys.readouterr().out
    dest = planted_run / "explain"
    z = np.load(dest / f"{method}.npz")
    a, tok, lengths = np.abs(z["attributions"]), z["tokens"], z["lengths"]
    assert a.shape == tok.shape and a.shape[0] == 40
    has = (tok == PLANTED).any(1)
    assert has.sum() >= 15
    assert all(tok[k][a[k].argmax()] == PLANTED for k in np.where(has)[0])
    share = a[has][tok[has] == PLANTED].sum() / a[has].sum()
    assert share > 0.6, share  # trained, unidirectional: 0.79 (IG) / 0.91 (SHAP) measured
    assert all((a[k, n:] == 0).all() for k, n in enumerate(lengths))
    s = json.loads((dest / "summary.json").read_text())
    assert s["deletion"]["top"][0] < s["deletion"]["random"][0] - 0.2
    assert (dest / f"{method}.png").stat().st_size > 0
    maps = np.load(dest / "states.npz")
    assert {"rnn.l0.h", "rnn.l0.c", "rnn.l0.f"} <= set(maps.files)
    assert maps["rnn.l0.h"].shape[:2] == a.shape
