"""Tokenisers fitted on a training split, saved as plain state and reloaded from it.

``encode(text) -> list[int]`` and ``decode(ids) -> str`` round-trip every text made of the
training split's symbols (``char``, ``word``) or any text at all (``sentencepiece``, whose
byte fallback spells out unseen characters as UTF-8 bytes). A symbol the tokeniser has not seen
becomes ``UNK`` and decodes to U+FFFD.
"""

from __future__ import annotations

import collections
import io
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
#: what UNK decodes to
REPLACEMENT = "\ufffd"


def _check_texts(texts, who: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not any(texts):
        raise ValueError(f"{who}: got no text to fit on (an empty training split?), expected at "
                         "least one non-empty text")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{who}: got a {type(bad).__name__} among the texts, expected str")
    return texts


class Tokenizer:
    """The common interface: ``kind``, ``vocab_size`` (specials included), ``encode``,
    ``decode``, ``state()`` (a dict of str/int/list/uint8-tensor values, safe for a
    ``weights_only`` checkpoint) and ``id_to_piece``."""

    kind = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class _TableTokenizer(Tokenizer):
    """A vocabulary table after the four specials; tokens joined back with ``""``."""

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = list(SPECIALS) + [s for s in symbols if s not in SPECIALS]
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def split(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        get = self.index.get
        return [get(s, UNK) for s in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == UNK or not 0 <= i < len(self.symbols):
                out.append(REPLACEMENT)
            elif i >= len(SPECIALS):
                out.append(self.symbols[i])
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self.symbols[int(i)]

    def state(self) -> dict:
        return {"kind": self.kind, "symbols": self.symbols[len(SPECIALS):]}

    @classmethod
    def _fit(cls, texts, max_size: int, min_count: int, **kw):
        counts = collections.Counter()
        probe = cls([], **kw)
        for t in _check_texts(texts, f"{cls.kind} tokenizer"):
            counts.update(probe.split(t))
        # most frequent first; ties in first-seen order, so a fit is deterministic
        keep = [s for s, c in counts.most_common() if c >= min_count]
        if max_size:
            keep = keep[:max(0, max_size - len(SPECIALS))]
        return cls(keep, **kw)


class CharTokenizer(_TableTokenizer):
    """One token per character (Unicode code point)."""

    kind = "char"

    def split(self, text: str) -> list[str]:
        return list(text)

    @classmethod
    def fit(cls, texts, max_size: int = 0, min_count: int = 1) -> CharTokenizer:
        return cls._fit(texts, max_size, min_count)


class WordTokenizer(_TableTokenizer):
    """Words (``\\w+``), single punctuation marks and whitespace runs, each a token, so that
    ``decode(encode(t)) == t`` for in-vocabulary text. ``lower=True`` lowercases first (the
    round trip is then up to case)."""

    kind = "word"
    PATTERN = re.compile(r"\w+|\s+|[^\w\s]")

    def __init__(self, symbols: Sequence[str], lower: bool = False) -> None:
        super().__init__(symbols)
        self.lower = bool(lower)

    def split(self, text: str) -> list[str]:
        return self.PATTERN.findall(text.lower() if self.lower else text)

    def state(self) -> dict:
        return {**super().state(), "lower": self.lower}

    @classmethod
    def fit(cls, texts, max_size: int = 20000, min_count: int = 1,
            lower: bool = False) -> WordTokenizer:
        return cls._fit(texts, max_size, min_count, lower=lower)


def _sentencepiece():
    try:
        import sentencepiece
    except ModuleNotFoundError:
        raise ModuleNotFoundError("tokenizer 'sentencepiece' needs the sentencepiece package: "
                                  "pip install 'gyre[text]'") from None
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """Subword units learnt by sentencepiece (unigram LM by default, or ``bpe``) on the training
    texts only. Normalisation is off, whitespace kept as it is and no dummy prefix added, so
    ``decode(encode(t)) == t`` for every text (byte fallback covers unseen characters).
    Newlines, which sentencepiece treats as sentence ends, are one reserved piece."""

    kind = "sentencepiece"
    NEWLINE = "<nl>"

    def __init__(self, model: bytes) -> None:
        spm = _sentencepiece()
        self.model = bytes(model)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        self.nl = self.sp.piece_to_id(self.NEWLINE)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        lines = text.split("\n")
        ids: list[int] = []
        for k, pieces in enumerate(self.sp.encode(lines)):
            if k:
                ids.append(self.nl)
            ids.extend(pieces)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        lines, cur = [], []
        n = self.vocab_size
        for i in ids:
            i = int(i)
            if i == self.nl:
                lines.append(cur)
                cur = []
            elif i == UNK or not 0 <= i < n:
                cur.append(-1)
            elif i >= len(SPECIALS):
                cur.append(i)
        lines.append(cur)
        out = []
        for line in lines:
            parts, run = [], []
            for i in line + [-2]:
                if i >= 0:
                    run.append(i)
                    continue
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if i == -1:
                    parts.append(REPLACEMENT)
            out.append("".join(parts))
        return "\n".join(out)

    def id_to_piece(self, i: int) -> str:
        return "\n" if int(i) == self.nl else self.sp.id_to_piece(int(i))

    def state(self) -> dict:
        return {"kind": self.kind,
                "model": torch.frombuffer(bytearray(self.model), dtype=torch.uint8).clone()}

    @classmethod
    def fit(cls, texts, vocab_size: int = 4000, model_type: str = "unigram",
            max_sentences: int = 2_000_000) -> SentencePieceTokenizer:
        """Learn ``vocab_size`` pieces (an upper bound: a small corpus may give fewer)."""
        spm = _sentencepiece()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 16:
            raise ValueError(f"vocab_size: got {vocab_size!r}, expected an int >= 16")
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type: got {model_type!r}, expected 'unigram' or 'bpe'")
        lines = [ln for t in _check_texts(texts, "sentencepiece tokenizer")
                 for ln in t.split("\n") if ln]
        if not lines:
            raise ValueError("sentencepiece tokenizer: the training texts hold only newlines")
        longest = max(len(ln.encode()) for ln in lines)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                model_type=model_type, character_coverage=0.9995, byte_fallback=True,
                pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
                user_defined_symbols=[cls.NEWLINE], normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
                hard_vocab_limit=False, max_sentence_length=max(4192, longest + 1),
                input_sentence_size=max_sentences, shuffle_input_sentence=True,
                num_threads=1, minloglevel=2)
        except RuntimeError as e:  # sentencepiece reports bad sizes as a RuntimeError
            raise ValueError(f"vocab_size: sentencepiece could not learn {vocab_size} pieces "
                             f"from these texts ({e})") from None
        return cls(buf.getvalue())


TOKENIZERS = {"char": CharTokenizer, "word": WordTokenizer, "sentencepiece": SentencePieceTokenizer}


def fit_tokenizer(kind: str, texts, *, vocab_size: int = 4000, lower: bool = False) -> Tokenizer:
    """A ``char``, ``word`` (at most ``vocab_size`` entries) or ``sentencepiece``
    (``vocab_size`` pieces) tokeniser fitted on ``texts`` (the training split only)."""
    if kind == "char":
        return CharTokenizer.fit(texts)
    if kind == "word":
        return WordTokenizer.fit(texts, max_size=vocab_size, lower=lower)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.fit(texts, vocab_size=vocab_size)
    raise ValueError(f"tokenizer: got {kind!r}, expected one of {', '.join(TOKENIZERS)}")


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokeniser from :meth:`Tokenizer.state`."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char":
        return CharTokenizer(state["symbols"])
    if kind == "word":
        return WordTokenizer(state["symbols"], lower=state.get("lower", False))
    if kind == "sentencepiece":
        model = state["model"]
        return SentencePieceTokenizer(model.numpy().tobytes() if isinstance(model, Tensor)
                                      else bytes(model))
    raise ValueError(f"tokenizer state: got kind {kind!r}, expected one of {', '.join(TOKENIZERS)}")


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = PAD, max_len: int = 0
              ) -> tuple[Tensor, Tensor]:
    """``(ids (B, T) int64 padded with pad_id, lengths (B,) int64)``, ``T`` the longest
    sequence (or ``max_len`` when given, longer sequences cut). ``lengths`` goes to the
    recurrent layers' ``lengths=``; every sequence needs at least one token."""
    if not len(seqs):
        raise ValueError("seqs: got an empty batch, expected at least one sequence")
    lens = [min(len(s), max_len) if max_len else len(s) for s in seqs]
    if min(lens) < 1:
        k = lens.index(min(lens))
        raise ValueError(f"seqs: sequence {k} has no tokens (an empty text?); every text needs "
                         "at least one token")
    T = max(lens)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.int64)
    for b, (s, n) in enumerate(zip(seqs, lens, strict=True)):
        ids[b, :n] = torch.as_tensor(list(s[:n]), dtype=torch.int64)
    return ids, torch.tensor(lens, dtype=torch.int64)
