"""Classification data: aeon loaders, CSV/NPZ formats, standardisation, splits, and bad files."""

import numpy as np
import pytest
import torch

from gyre.data import catalog
from gyre.data import classification as cd


def test_aeon_variable_length_and_multivariate():
    jv = cd.load("japanese_vowels")
    assert (len(jv.X_train), len(jv.X_test), jv.n_channels, len(jv.classes)) == (270, 370, 12, 9)
    lengths = {x.shape[0] for x in jv.X_train + jv.X_test}
    assert jv.variable_length and min(lengths) == 7 and max(lengths) == 29
    bm = cd.load("basic_motions")
    assert bm.X_train[0].shape == (100, 6) and not bm.variable_length
    # classes are indexed in natural order and every label is in range
    gp = cd.load("gunpoint")
    assert gp.classes == ["1", "2"] and set(gp.y_test) == {0, 1}


def test_catalog_lists_every_classification_dataset():
    names = {d.name for d in catalog() if d.task == "classify"}
    assert names == set(cd.AEON)
    assert all(d.available for d in catalog() if d.task == "classify")


def test_standardizer_fits_train_only_per_channel():
    rng = np.random.default_rng(0)
    train = [rng.normal(5, 2, size=(n, 2)).astype(np.float32) for n in (3, 7)]
    test = [rng.normal(-4, 9, size=(4, 2)).astype(np.float32)]
    s = cd.Standardizer.fit(train)
    allv = np.concatenate(train).astype(np.float64)
    np.testing.assert_allclose(s.mean, allv.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.std, allv.std(0), rtol=1e-6)
    z = np.concatenate(s(train))
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(s(test)[0], (test[0] - allv.mean(0)) / allv.std(0), rtol=1e-5)
    s2 = cd.Standardizer.from_state(s.state())
    np.testing.assert_array_equal(s2(test)[0], s(test)[0])


def test_standardizer_log_maps_signed_log1p_then_standardises_and_reloads():
    rng = np.random.default_rng(0)
    train = [(rng.lognormal(2, 3, size=(n, 2)) * rng.choice([-1, 1], (n, 2))).astype(np.float32)
             for n in (5, 9)]
    test = [rng.lognormal(0, 4, size=(6, 2)).astype(np.float32)]
    s = cd.Standardizer.fit(train, log=True)
    ref = lambda x: np.sign(x) * np.log(1 + np.abs(x.astype(np.float64)))  # noqa: E731
    allv = ref(np.concatenate(train))
    np.testing.assert_allclose(s.mean, allv.mean(0), rtol=1e-5)
    np.testing.assert_allclose(s.std, allv.std(0), rtol=1e-5)
    np.testing.assert_allclose(s(test)[0], (ref(test[0]) - allv.mean(0)) / allv.std(0),
                               rtol=1e-4, atol=1e-5)
    s2 = cd.Standardizer.from_state(s.state())
    assert s2.log and not cd.Standardizer.from_state(cd.Standardizer.fit(train).state()).log
    np.testing.assert_array_equal(s2(test)[0], s(test)[0])
    old = {k: v for k, v in s.state().items() if k != "log"}  # a run saved before ``log``
    assert not cd.Standardizer.from_state(old).log


def test_validation_split_is_stratified_and_disjoint():
    y = np.repeat([0, 1, 2], [10, 20, 30])
    tr, va = cd.validation_split(y, 0.2, seed=0)
    assert len(va) == 12 and not set(tr) & set(va) and len(tr) + len(va) == 60
    assert np.bincount(y[va]).tolist() == [2, 4, 6]
    tr, va = cd.validation_split(y, 0.0, seed=0)
    assert len(va) == 0 and len(tr) == 60


def test_collate_pads_and_reports_lengths():
    items = [(torch.ones(3, 2), torch.tensor(0)), (torch.full((5, 2), 2.0), torch.tensor(1))]
    b = cd.collate(items)
    assert b["x"].shape == (2, 5, 2) and b["lengths"].tolist() == [3, 5]
    assert b["x"][0, 3:].abs().sum() == 0 and b["y"].tolist() == [0, 1]
    same = cd.collate([items[0], items[0]])
    assert "lengths" not in same


def test_wide_csv_with_variable_length_and_split(tmp_path):
    p = tmp_path / "wide.csv"
    p.write_text("label,split,t0,t1,t2\n"
                 "a,train,1,2,3\nb,train,4,5,\na,train,1,1,1\nb,test,0,1,\na,test,2,2,2\n")
    d = cd.load(str(p))
    assert d.classes == ["a", "b"] and d.y_train.tolist() == [0, 1, 0]
    assert [x.shape for x in d.X_train] == [(3, 1), (2, 1), (3, 1)]
    np.testing.assert_array_equal(d.X_test[0][:, 0], [0, 1])


def test_long_csv_multivariate_and_automatic_split(tmp_path):
    rows = ["id,label,c1,c2"]
    for i in range(10):
        for t in range(3 + i % 2):
            rows.append(f"s{i},{'up' if i % 2 else 'down'},{t},{t * i}")
    p = tmp_path / "long.csv"
    p.write_text("\n".join(rows) + "\n")
    d = cd.load(str(p), seed=1)
    assert len(d.X_train) + len(d.X_test) == 10 and len(d.X_test) == 3
    assert all(x.shape[1] == 2 for x in d.X_train)
    assert sorted(d.classes) == ["down", "up"]


def test_npz_with_nan_padding(tmp_path):
    X = np.arange(4 * 5 * 2, dtype=np.float64).reshape(4, 5, 2)
    X[1, 3:] = np.nan
    p = tmp_path / "d.npz"
    np.savez(p, X_train=X, y_train=np.array([0, 1, 0, 1]), X_test=X[:2], y_test=np.array([1, 0]))
    d = cd.load(str(p))
    assert [x.shape[0] for x in d.X_train] == [5, 3, 5, 5] and d.classes == ["0", "1"]
    assert len(cd.read_sequences(p)) == 6


@pytest.mark.parametrize("name, content, error, match", [
    ("missing.csv", None, FileNotFoundError, "does not exist"),
    ("empty.csv", "", ValueError, "is empty"),
    ("header.csv", "label,t0,t1\n", ValueError, "no rows"),
    ("nolabel.csv", "t0,t1\n1,2\n3,4\n", ValueError, "no 'label' column"),
    ("novalues.csv", "label,split\na,train\n", ValueError, "no value columns"),
    ("text.csv", "label,t0,t1\na,1,2\nb,x,3\n", ValueError, "line 3, column 't0'.*not a number"),
    ("ragged.csv", "label,t0,t1,t2\na,1,,3\nb,1,2,3\n", ValueError, "line 2: ragged row"),
    ("lab.csv", "label,t0\na,1\n,2\n", ValueError, "line 3: the label is missing"),
    ("split.csv", "label,split,t0\na,dev,1\nb,train,2\n", ValueError, "'split'.*'train' or 'test'"),
    ("gap.csv", "id,label,c\n1,a,1\n1,a,\n", ValueError, "empty value"),
    ("twolab.csv", "id,label,c\n1,a,1\n1,b,2\n", ValueError, "several labels"),
    ("data.txt", "1,2\n", ValueError, "expected a .csv or .npz"),
])
def test_bad_files_give_one_clear_error(tmp_path, name, content, error, match):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(error, match=match):
        cd.load_file(p)


def test_bad_npz_files(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, X_train=np.zeros((3, 4)), X_test=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no labels array y_train"):
        cd.load_file(p)
    np.savez(p, A=np.zeros(3))
    with pytest.raises(ValueError, match="expected X_train, y_train"):
        cd.load_file(p)
    X = np.zeros((3, 4))
    X[0, 1] = np.nan
    np.savez(p, X=X, y=np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"X\[0\] has NaN inside"):
        cd.load_file(p)
    np.savez(p, X=np.array(["a", "b"]), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="dtype <U1, expected numbers"):
        cd.load_file(p)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        cd.load_file(tmp_path / "junk.npz")


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="neither a known dataset"):
        cd.load("no_such_dataset")
