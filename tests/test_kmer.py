"""k-mer models: exact k-mer indexing, the RDP formula by hand, probabilities over every class, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import SGDClassifier

from fixtures_tiny import records_12s  # noqa: F401 (fixture)
from idengine.config import KMER_KINDS
from idengine.models import kmer as B


def test_kmer_matrix_indexes_exactly_and_skips_n():
    x = B.kmer_matrix(["ACGTNAC", "AAAA", "A", ""], k=2).toarray()
    assert x.shape == (4, 16)
    # base-4 codes A=0 C=1 G=2 T=3: AC=1, CG=6, GT=11; GN, NA are skipped; AC twice counts once
    assert np.flatnonzero(x[0]).tolist() == [1, 6, 11]
    assert x[0, 1] == 1.0
    assert np.flatnonzero(x[1]).tolist() == [0] and x[1, 0] == 1.0
    assert x[2].sum() == 0 and x[3].sum() == 0
    x3 = B.kmer_matrix(["TTTG"], k=3).toarray()
    assert np.flatnonzero(x3[0]).tolist() == [62, 63]  # TTT = 63, TTG = 3*16 + 3*4 + 2 = 62


def test_kmer_matrix_rejects_uncleaned_sequences():
    with pytest.raises(ValueError, match="sequence 1 holds 'a'"):
        B.kmer_matrix(["ACGT", "acgt"], k=2)


def test_naive_bayes_matches_the_rdp_formula_by_hand():
    # class 0: AAC {AA, AC}, AAG {AA, AG}; class 1: CCA {CC, CA}. N = 3, k = 2.
    nb = B.fit_kmer_model("kmer-nb", ["AAC", "AAG", "CCA"], np.array([0, 0, 1]), num_classes=2, k=2)
    # P_w = (n(w) + 0.5) / (N + 1): P_AA = 2.5/4, P_AC = 1.5/4; P(w|c) = (n(w,c) + P_w) / (N_c + 1)
    ll_0 = math.log((2 + 0.625) / 3) + math.log((1 + 0.375) / 3)
    ll_1 = math.log((0 + 0.625) / 2) + math.log((0 + 0.375) / 2)
    # AANC: N breaks AN and NC, leaving {AA}; TT was never seen: P_TT = 0.5/4
    ll_n = [math.log((2 + 0.625) / 3), math.log(0.625 / 2)]
    ll_tt = [math.log(0.125 / 3), math.log(0.125 / 2)]
    got = nb.model.log_likelihood(B.kmer_matrix(["AAC", "AANC", "TT"], k=2))
    np.testing.assert_allclose(got, [[ll_0, ll_1], ll_n, ll_tt], rtol=1e-12)
    # logits: NB_WORD_SCALE x per-word log-likelihood, normalised over the classes
    logits = nb.logits(["AAC"])[0].astype(np.float64)
    z = B.NB_WORD_SCALE * np.array([ll_0, ll_1]) / 2
    np.testing.assert_allclose(logits, z - np.logaddexp(*z), rtol=1e-6)


@pytest.mark.parametrize("kind", KMER_KINDS)
def test_probabilities_cover_every_class_and_sum_to_one(kind):
    seqs = ["ACGTACGGTA", "ACGTACGGTT", "TTGACCATGA", "TTGACCATGC", "GGGCCCAAAT", "GGGCCCAAAA"]
    labels = np.array([0, 0, 2, 2, 4, 4])  # classes 1, 3, 5 and 6 have no training sequence
    model = B.fit_kmer_model(kind, seqs, labels, num_classes=7, k=3)
    logits = model.logits(seqs + ["NNNN", "ACGTAAGGTA"])
    assert logits.shape == (8, 7) and logits.dtype == np.float32 and np.isfinite(logits).all()
    absent = np.array([1, 3, 5, 6])
    present = np.array([0, 2, 4])
    assert (logits[:, absent].max(axis=1) < logits[:, present].min(axis=1)).all()
    probs = model.predict_proba(seqs + ["NNNN", "ACGTAAGGTA"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (probs[:, absent] < 1e-11).all()
    assert (probs[:6].argmax(axis=1) == labels).all()
    if kind == "kmer-nb":  # no valid k-mer: no evidence, and the class prior is uniform
        np.testing.assert_allclose(probs[6, present], 1 / 3, atol=1e-6)


def test_linear_scores_equal_the_sklearn_pipeline():
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGT"), 40)) for _ in range(30)]
    labels = np.arange(30) % 3
    model = B.fit_kmer_model("kmer-linear", seqs, labels, num_classes=3, k=4, seed=3).model
    x = B.kmer_matrix(seqs, 4)[:, model.columns]
    tfidf = TfidfTransformer().fit(x)
    sgd = SGDClassifier(loss="log_loss", alpha=B.SGD_ALPHA, max_iter=B.SGD_MAX_EPOCHS, tol=1e-3, random_state=3)
    sgd.fit(tfidf.transform(x), labels)
    np.testing.assert_allclose(model.scores(B.kmer_matrix(seqs, 4)), sgd.decision_function(tfidf.transform(x)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KMER_KINDS)
def test_save_load_gives_identical_logits(kind, tmp_path):
    seqs = ["ACGTACGGTA", "ACGTACGGTT", "TTGACCATGA", "TTGACCATGC"]
    model = B.fit_kmer_model(kind, seqs, np.array([0, 0, 1, 1]), num_classes=3, k=3)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["kmer_model.json", "kmer_model.safetensors"]
    loaded = B.load_kmer_model(tmp_path / "m")
    assert (loaded.kind, loaded.k, loaded.num_classes) == (kind, 3, 3)
    np.testing.assert_array_equal(loaded.logits(seqs), model.logits(seqs))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="model.kind must be one of"):
        B.fit_kmer_model("kmer-svm", ["ACGT"], np.array([0]), num_classes=1)
    with pytest.raises(ValueError, match="labels must be integers in 0..1"):
        B.fit_kmer_model("kmer-nb", ["ACGT", "ACGA"], np.array([0, 2]), num_classes=2)
    with pytest.raises(ValueError, match="at least two species"):
        B.fit_kmer_model("kmer-linear", ["ACGT", "ACGA"], np.array([1, 1]), num_classes=2)


@pytest.fixture(scope="module")
def small_12s(records_12s):
    """The bundled example's 32 core species (8-15 real 12S records each, up to 3 congeners per genus); every third
    record of a species held out as fold 0: close relatives, so the task is not trivially easy."""
    sizes = records_12s["species"].value_counts()
    rows = records_12s[records_12s["species"].isin(sizes.index[sizes >= 8])].reset_index(drop=True)
    rows["fold"] = (rows.groupby("species").cumcount() % 3 == 0).astype(int).map({1: 0, 0: 1})
    rows["label"] = rows["species"].map({s: i for i, s in enumerate(sorted(rows["species"].unique()))})
    return rows


@pytest.mark.parametrize("kind", KMER_KINDS)
def test_both_kmer_models_learn_real_12s(kind, small_12s):
    train, val = small_12s[small_12s["fold"] != 0], small_12s[small_12s["fold"] == 0]
    n = small_12s["label"].nunique()
    assert len(val) >= 60 and val["label"].nunique() == n >= 30
    model = B.fit_kmer_model(kind, train["sequence"].to_numpy(), train["label"].to_numpy(), num_classes=n)
    probs = model.predict_proba(val["sequence"].to_numpy())
    top1 = float((probs.argmax(axis=1) == val["label"].to_numpy()).mean())
    assert top1 > 0.6, f"{kind} top-1 {top1:.2f} on {n} species (chance {1 / n:.2f})"
