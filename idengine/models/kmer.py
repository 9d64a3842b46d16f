"""Step 7c, k-mer models: classifiers on k-mer profiles, on the same prepared data, folds and metrics as the transformer.

`model.kind = "kmer-nb"` or `"kmer-linear"` (k = `model.kmer`, default 8) makes `idengine cv` run one of these
instead of the transformer. Both return logits over the whole label space, so every metric and calibration apply.
They are saved as safetensors + JSON (no pickle), so `idengine train` exports them like any other model.

- Features: presence/absence of every k-mer, indexed exactly (column = the k-mer read as a base-4 number, 4^k
  columns), computed with numpy; k-mers that contain N are skipped. On 12,529 12s-fish records (645 bp mean) this
  takes about 2 s, against 3.6 s for scikit-learn's `CountVectorizer(analyzer="char")`, which would also need an N
  filter and a vocabulary to save; `np.unique` was avoided because numpy 2.4's hash-based version is 15x slower
  than a sort here.
- `kmer-nb`: the RDP classifier's naive Bayes (Wang et al. 2007): P(w|c) = (n(w,c) + P_w) / (N_c + 1) with
  P_w = (n(w) + 0.5) / (N + 1), query log-likelihood = sum of log P(w|c) over its distinct words, uniform class
  prior. scikit-learn's MultinomialNB/BernoulliNB smooth differently, so the formula is a sparse matrix product.
  logits = `NB_WORD_SCALE` x log-likelihood / number of words, i.e. a per-word temperature of 1/4: the raw sum
  of hundreds of logs is wildly over-confident (fold-0 log loss 4.07), the plain per-word mean under-confident
  (4.04), and x4 the best of both (0.84; temperature scaling on fold 0 reaches 0.85 from per-word logits, 1.24
  from raw ones, so per-word logits also calibrate better). No bootstraps: calibrate.py does the confidence.
- `kmer-linear`: TF-IDF of the k-mer presence profile + `SGDClassifier(loss="log_loss")` (one-vs-rest, alpha
  3e-6); logits = the decision scores, whose softmax is a multinomial link (PEERS.md's under-confidence came from
  normalising one-vs-rest probabilities). A true multinomial fit did not fit the budget or did worse: lbfgs took
  22 s and 18 GB per iteration; saga, 8 epochs (9 min loaded): top-1 0.871, log loss 0.87; TruncatedSVD(512) +
  lbfgs: top-1 0.850. SGD alpha 1e-5 / 3e-5 / 1e-6: top-1 0.875 / 0.848 / 0.890, log loss 1.14 / 2.13 / 0.78.

12s-fish, fold 0 of protocol-folds.csv as validation (10,023 train, 2,506 val, 1,397 classes), k=8, a 2-core machine
loaded by other jobs (CPU seconds are the steadier figure), bench/kmer_baselines_check.py:

| baseline | fit s (CPU s) | predict seq/CPU-s | top-1 | top-5 | macro F1 | macro PR-AUC | log loss | ECE | peak RSS |
|---|---|---|---|---|---|---|---|---|---|
| kmer-nb | 4.6 (1.6) | 1,452 | 0.838 | 0.943 | 0.791 | 0.905 | 0.845 | 0.046 | 0.7 GB |
| kmer-linear | 406 (232) | 1,305 | 0.886 | 0.965 | 0.839 | 0.919 | 0.776 | 0.096 | 1.0 GB |

PEERS.md (5-fold means): RDP NB 0.840 top-1, 0.856 PR-AUC, 3.50 log loss; SGD logistic 0.878, 0.901, 1.52.
kmer-nb on folds 1 and 2: top-1 0.835 / 0.837, PR-AUC 0.893 / 0.901, log loss 0.89 / 0.84.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.special import log_softmax
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import normalize

from idengine import layout as L
from idengine.config import KMER_KINDS

log = logging.getLogger(__name__)

MAX_K = 12
"""4^12 = 16.8 M columns; beyond that the sparse keys and the linear weights stop being cheap."""
NB_WORD_SCALE = 4.0
"""kmer-nb logits = this x mean log P(w|c) per query word (the best fold-0 log loss on 12s-fish, k=8)."""
ABSENT_LOG_GAP = float(np.log(1e-12))
"""Classes absent from training sit this far below each row's lowest present log-probability: finite, and
below every present class under any temperature."""
SGD_ALPHA = 3e-6
"""L2 strength of the linear baseline (see the module docstring for the measurements)."""
SGD_MAX_EPOCHS = 20
BATCH_SEQS = 2048
"""Sequences featurised and scored at once, which bounds memory for large query sets."""

_BASE_CODE = np.full(256, 4, dtype=np.int64)
for _i, _b in enumerate(b"ACGT"):
    _BASE_CODE[_b] = _i
_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[list(b"ACGTN")] = True


def kmer_matrix(sequences: Sequence[str], k: int) -> sp.csr_matrix:
    """Presence/absence of every k-mer in each sequence; k-mers containing N are skipped.

    Args:
        sequences: cleaned upper-case ACGTN strings (data/clean.py's output).
        k: k-mer length, 1..MAX_K.

    Returns:
        (n, 4^k) float32 CSR of 0/1; column j is the k-mer whose bases, read as A=0 C=1 G=2 T=3, spell j in base 4.

    Raises:
        ValueError: k out of range, or a sequence holds a character other than ACGTN.
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, not {k}")
    seqs = [str(s) for s in sequences]
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    raw = np.frombuffer("".join(seqs).encode("ascii", errors="replace"), dtype=np.uint8)
    bad = np.flatnonzero(~_ALLOWED[raw])
    if bad.size:
        row = int(np.searchsorted(np.cumsum(lens), bad[0], side="right"))
        raise ValueError(f"sequence {row} holds {chr(raw[bad[0]])!r}: k-mer baselines expect cleaned upper-case "
                         "ACGTN sequences (run them through idengine.data.clean first)")
    codes = _BASE_CODE[raw]
    n_windows = max(raw.size - k + 1, 0)
    index = np.zeros(n_windows, dtype=np.int64)
    for j in range(k):  # rolling base-4 code of every window over the concatenation
        index <<= 2
        index |= codes[j:j + n_windows] & 3
    n_before = np.concatenate([[0], np.cumsum(codes == 4)])
    row = np.repeat(np.arange(len(seqs), dtype=np.int64), lens)[:n_windows]
    seq_end = np.repeat(np.cumsum(lens), lens)[:n_windows]
    keep = (np.arange(n_windows) + k <= seq_end) & (n_before[k:k + n_windows] == n_before[:n_windows])
    key = np.sort((row[keep] << (2 * k)) | index[keep])
    key = key[np.concatenate([[True], key[1:] != key[:-1]])] if key.size else key
    rows, cols = key >> (2 * k), key & ((1 << (2 * k)) - 1)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(seqs)))])
    return sp.csr_matrix((np.ones(cols.size, np.float32), cols.astype(np.int32), indptr), shape=(len(seqs), 4 ** k))


def log_probs_all_classes(scores: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Log-softmax over the classes seen in training; unseen classes sit ABSENT_LOG_GAP below the row minimum."""
    out = np.empty(scores.shape, dtype=np.float64)
    logp = log_softmax(scores[:, present].astype(np.float64), axis=1)
    out[:, present] = logp
    out[:, ~present] = logp.min(axis=1, keepdims=True) + ABSENT_LOG_GAP
    return out


@dataclass
class KmerNaiveBayes:
    """RDP-style naive Bayes; log P(w|c) = log P_w + log(1 + n(w,c)/P_w) - log(N_c + 1), the middle term sparse."""

    word_log_prior: np.ndarray
    """(4^k,) log P_w, P_w = (n(w) + 0.5) / (N + 1)."""
    word_log_boost: sp.csr_matrix
    """(C, 4^k) log(1 + n(w,c) / P_w): nonzero only where class c's training sequences hold word w."""
    class_log_norm: np.ndarray
    """(C,) log(N_c + 1)."""
    present: np.ndarray
    """(C,) bool: the class had training sequences."""

    @classmethod
    def fit(cls, x: sp.csr_matrix, y: np.ndarray, num_classes: int) -> KmerNaiveBayes:
        """Count n(w,c), n(w), N_c, N from binary k-mer rows `x` and labels `y`."""
        n = x.shape[0]
        one_hot = sp.csr_matrix((np.ones(n, np.float64), (y, np.arange(n))), shape=(num_classes, n))
        word_class = (one_hot @ x.astype(np.float64)).tocsr()  # n(w,c)
        word_prior = (np.asarray(x.sum(axis=0), dtype=np.float64).ravel() + 0.5) / (n + 1)
        boost = word_class.copy()
        boost.data = np.log1p(boost.data / word_prior[boost.indices])
        class_n = np.bincount(y, minlength=num_classes)
        return cls(np.log(word_prior), boost, np.log(class_n + 1.0), class_n > 0)

    def log_likelihood(self, x: sp.csr_matrix) -> np.ndarray:
        """(n, C) sum over each query's distinct words of log P(w|c) (RDP's formula, every class)."""
        n_words = np.asarray(x.sum(axis=1), dtype=np.float64)
        shared = (x @ self.word_log_boost.T).toarray()
        return shared + x.astype(np.float64) @ self.word_log_prior[:, None] - n_words * self.class_log_norm[None, :]

    def scores(self, x: sp.csr_matrix) -> np.ndarray:
        """(n, C) NB_WORD_SCALE x log-likelihood per query word (a query without valid k-mers scores 0)."""
        n_words = np.maximum(np.asarray(x.sum(axis=1), dtype=np.float64), 1.0)
        return NB_WORD_SCALE * self.log_likelihood(x) / n_words

    def to_arrays(self) -> dict[str, np.ndarray]:
        b = self.word_log_boost
        return {"word_log_prior": self.word_log_prior, "boost_data": b.data, "boost_indices": b.indices,
                "boost_indptr": b.indptr, "class_log_norm": self.class_log_norm, "present": self.present}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> KmerNaiveBayes:
        shape = (a["class_log_norm"].size, a["word_log_prior"].size)
        boost = sp.csr_matrix((a["boost_data"], a["boost_indices"], a["boost_indptr"]), shape=shape)
        return cls(a["word_log_prior"], boost, a["class_log_norm"], a["present"].astype(bool))


@dataclass
class KmerLinear:
    """TF-IDF of k-mer presence + one-vs-rest logistic SGD, kept as plain arrays so predict needs no sklearn object."""

    columns: np.ndarray
    """(F,) k-mer columns seen in training (weights of unseen k-mers stay exactly 0, so they are dropped)."""
    idf: np.ndarray
    """(F,) TfidfTransformer's smoothed idf."""
    coef: np.ndarray
    """(C_present, F) float32 weights."""
    intercept: np.ndarray
    """(C_present,) biases."""
    classes: np.ndarray
    """(C_present,) label of each row of coef."""
    present: np.ndarray
    """(C,) bool."""

    @classmethod
    def fit(cls, x: sp.csr_matrix, y: np.ndarray, num_classes: int, seed: int = 0, n_jobs: int | None = -1
            ) -> KmerLinear:
        """Fit TF-IDF on the training rows, then SGDClassifier(loss="log_loss") with SGD_ALPHA."""
        classes = np.unique(y)
        if classes.size < 2:
            raise ValueError("kmer-linear needs at least two species in the training data")
        columns = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0).astype(np.int32)
        tfidf = TfidfTransformer(norm="l2", use_idf=True, smooth_idf=True)
        features = tfidf.fit_transform(x[:, columns])
        model = SGDClassifier(loss="log_loss", alpha=SGD_ALPHA, max_iter=SGD_MAX_EPOCHS, tol=1e-3,
                              random_state=seed, n_jobs=n_jobs)
        model.fit(features, y)
        coef, intercept = model.coef_, model.intercept_
        if classes.size == 2:  # binary: p(classes[1]) = sigmoid(d) = softmax([0, d])
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        present = np.zeros(num_classes, dtype=bool)
        present[classes] = True
        return cls(columns, tfidf.idf_.astype(np.float64), coef.astype(np.float32),
                   intercept.astype(np.float64), classes, present)

    def scores(self, x: sp.csr_matrix) -> np.ndarray:
        """(n, C) decision scores; columns of classes absent from training are 0 (masked by the caller)."""
        features = normalize(x[:, self.columns] @ sp.diags(self.idf))  # TfidfTransformer.transform, l2 rows
        out = np.zeros((x.shape[0], self.present.size), dtype=np.float64)
        out[:, self.classes] = features.astype(np.float32) @ self.coef.T + self.intercept  # float32: coef is large
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"columns": self.columns, "idf": self.idf, "coef": self.coef, "intercept": self.intercept,
                "classes": self.classes, "present": self.present}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> KmerLinear:
        return cls(a["columns"], a["idf"], a["coef"], a["intercept"], a["classes"], a["present"].astype(bool))


_MODELS = {"kmer-nb": KmerNaiveBayes, "kmer-linear": KmerLinear}


@dataclass
class KmerModel:
    """A fitted k-mer model: sequences in, logits over the whole label space out."""

    kind: str
    k: int
    num_classes: int
    model: KmerNaiveBayes | KmerLinear

    def logits(self, sequences: Sequence[str] | np.ndarray) -> np.ndarray:
        """Log-probabilities over all num_classes classes (softmax of them = predict_proba).

        Args:
            sequences: cleaned upper-case ACGTN strings.

        Returns:
            (n, num_classes) float32; classes absent from training get a finite logit below every other class.
        """
        seqs = list(sequences)
        out = np.empty((len(seqs), self.num_classes), dtype=np.float32)
        for start in range(0, len(seqs), BATCH_SEQS):
            x = kmer_matrix(seqs[start:start + BATCH_SEQS], self.k)
            out[start:start + x.shape[0]] = log_probs_all_classes(self.model.scores(x), self.model.present)
        return out

    def predict_proba(self, sequences: Sequence[str] | np.ndarray) -> np.ndarray:
        """(n, num_classes) float64 probabilities, rows summing to 1."""
        z = self.logits(sequences).astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def save(self, directory: str | Path) -> Path:
        """Write kmer_model.json (kind, k, num_classes) + kmer_model.safetensors (its arrays; no pickle)."""
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {name: np.ascontiguousarray(a) for name, a in self.model.to_arrays().items()}
        arrays = {name: a.astype(np.uint8) if a.dtype == bool else a for name, a in arrays.items()}
        save_file(arrays, str(out / L.KMER_ARRAYS))
        meta = {"kind": self.kind, "k": self.k, "num_classes": self.num_classes}
        (out / L.KMER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out


def load_kmer_model(directory: str | Path) -> KmerModel:
    """Read a k-mer model written by `KmerModel.save`.

    Raises:
        FileNotFoundError: the directory lacks kmer_model.json or kmer_model.safetensors.
        ValueError: the saved kind is unknown.
    """
    from safetensors.numpy import load_file

    src = Path(directory)
    for name in (L.KMER_META, L.KMER_ARRAYS):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} not found: not a directory written by KmerModel.save")
    meta = json.loads((src / L.KMER_META).read_text(encoding="utf-8"))
    if meta.get("kind") not in _MODELS:
        raise ValueError(f"{src / L.KMER_META}: unknown k-mer model {meta.get('kind')!r}; known: {KMER_KINDS}")
    arrays = load_file(str(src / L.KMER_ARRAYS))
    return KmerModel(meta["kind"], int(meta["k"]), int(meta["num_classes"]),
                     _MODELS[meta["kind"]].from_arrays(arrays))


def fit_kmer_model(kind: str, sequences: Sequence[str] | np.ndarray, labels: np.ndarray, num_classes: int,
                 k: int = 8, seed: int = 0, *, n_jobs: int | None = -1) -> KmerModel:
    """Fit a k-mer model on one fold's training records.

    Args:
        kind: `kmer-nb` (RDP-style naive Bayes) or `kmer-linear` (TF-IDF + logistic SGD).
        sequences: cleaned upper-case ACGTN strings.
        labels: (n,) int labels in 0..num_classes-1.
        num_classes: size of the whole label space (logits cover every class, trained on or not).
        k: k-mer length (`model.kmer`).
        seed: shuffling seed of the SGD (naive Bayes is deterministic).
        n_jobs: threads of kmer-linear's one-vs-rest fits (-1: all cores; 1 inside a one-CPU task).

    Returns:
        The fitted KmerModel.

    Raises:
        ValueError: unknown kind, lengths or label range disagree, or a sequence is not cleaned ACGTN.
    """
    if kind not in _MODELS:
        raise ValueError(f"unknown k-mer model {kind!r}; model.kind must be one of {KMER_KINDS}")
    y = np.asarray(labels)
    seqs = list(sequences)
    if y.ndim != 1 or y.size != len(seqs):
        raise ValueError(f"got {len(seqs)} sequences but labels of shape {y.shape}")
    if y.size == 0:
        raise ValueError("no training sequences")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be integers in 0..{num_classes - 1}")
    x = kmer_matrix(seqs, k)
    empty = int((np.diff(x.indptr) == 0).sum())
    if empty:
        log.warning("%d of %d training sequences have no %d-mer without N; they add nothing", empty, len(seqs), k)
    y = y.astype(np.int64)
    if kind == "kmer-nb":
        model: KmerNaiveBayes | KmerLinear = KmerNaiveBayes.fit(x, y, num_classes)
    else:
        model = KmerLinear.fit(x, y, num_classes, seed=seed, n_jobs=n_jobs)
    log.info("%s (k=%d) fitted on %d sequences, %d of %d classes", kind, k, len(seqs), int(model.present.sum()),
             num_classes)
    return KmerModel(kind, k, num_classes, model)
