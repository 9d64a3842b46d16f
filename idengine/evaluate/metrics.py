"""Step 9a, metrics: classification and calibration scores, numpy arrays in, plain numbers out.

Every function takes `y_true` (n,) int labels and `probs` (n, C) probabilities over the WHOLE label space, so a
fold whose validation split lacks some species is scored against the same C classes as every other fold.
The key names of `classification_metrics` are a public contract (the README lists them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score

log = logging.getLogger(__name__)

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15)."""
_AP_CHUNK_ELEMENTS = 4_000_000
"""Columns of probs scored at once by the vectorised average precision (bounds memory to ~100 MB)."""


def validate_probs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast to int64 / float64 and check shapes, label range and that rows are probabilities."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"expected y_true (n,) and probs (n, C); got {y.shape} and {p.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer labels, not {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true holds labels outside 0..{p.shape[1] - 1}: the label space and probs disagree")
    if p.size and not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must sum to 1: pass softmax(logits), not logits")
    return y, p


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax that never overflows: subtracting the row maximum leaves the result unchanged.

    Args:
        logits: (n, C) scores.

    Returns:
        (n, C) float64 probabilities, rows summing to 1.
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of records whose true species is among the k most probable.

    Top-k shows whether the right species is "close": a reviewer shown k candidates would find it.
    The rank of the true class is the number of classes scored higher, plus tied classes of lower index, so ties
    break the same way as `argmax` and `top_k_accuracy(k=1)` equals the top-1 accuracy of the argmax call.
    (scikit-learn's `top_k_accuracy_score` breaks ties the other way; without ties the two agree.)
    """
    y, p = validate_probs(y_true, probs)
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    if y.size == 0:
        return float("nan")
    true_p = p[np.arange(y.size), y][:, None]
    lower_index = np.arange(p.shape[1])[None, :] < y[:, None]
    rank = (p > true_p).sum(axis=1) + ((p == true_p) & lower_index).sum(axis=1)
    return float(np.mean(rank < k))


def top1_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Fraction of records whose most probable species is the true one: the headline number of a species call."""
    y, p = validate_probs(y_true, probs)
    return float(np.mean(p.argmax(axis=1) == y)) if y.size else float("nan")


def macro_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    """F1 of the argmax call, averaged with equal weight over classes: rare species count as much as common ones.

    Classes are those present in y_true or predicted (scikit-learn's default): a species predicted but absent
    from y_true scores F1 = 0, which penalises its false positives; a species neither present nor predicted
    is left out instead of adding a meaningless 0 for every unused class of the label space.
    """
    y, p = validate_probs(y_true, probs)
    return float(f1_score(y, p.argmax(axis=1), average="macro", zero_division=0))


def weighted_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    """F1 of the argmax call averaged with weights = support in y_true: the per-record view of F1."""
    y, p = validate_probs(y_true, probs)
    return float(f1_score(y, p.argmax(axis=1), average="weighted", zero_division=0))


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true species (natural log), over the full label set.

    Log loss is the strictest calibration score: one confident mistake costs up to -log(eps) ~ 36 nats.
    Probabilities are clipped to [eps, 1 - eps] with float64 eps, exactly as scikit-learn's `log_loss(...,
    labels=range(C))` does; only the true class enters, so classes absent from y_true change nothing.
    """
    y, p = validate_probs(y_true, probs)
    eps = np.finfo(np.float64).eps
    true_p = np.clip(p[np.arange(y.size), y], eps, 1 - eps)
    return float(-np.mean(np.log(true_p))) if y.size else float("nan")


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multiclass Brier score: mean over records of sum over classes of (p - onehot)^2, in [0, 2].

    Unlike log loss it is bounded, so a few confident mistakes cannot dominate it. Computed as
    sum(p^2) - 2 p_true + 1 so that no (n, C) one-hot matrix is built.
    """
    y, p = validate_probs(y_true, probs)
    if y.size == 0:
        return float("nan")
    return float(np.mean((p * p).sum(axis=1) - 2.0 * p[np.arange(y.size), y] + 1.0))


def _average_precision_columns(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Average precision of each column of scores (n, m) against boolean positive (n, m), ties as scikit-learn.

    AP = sum over positives of the precision at the END of the block of tied scores they belong to, divided by
    the number of positives: the step-wise area under the precision-recall curve at distinct thresholds.
    """
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    pos = np.take_along_axis(positive, order, axis=0)
    tps = np.cumsum(pos, axis=0)
    rows = np.arange(n)[:, None]
    is_end = np.ones_like(pos)
    is_end[:-1] = s[1:] != s[:-1]
    # Index of the last row of each tie block: a reversed running minimum of the block-end indices.
    end = np.where(is_end, rows, n)[::-1]
    end = np.minimum.accumulate(end, axis=0)[::-1]
    precision_at_end = np.take_along_axis(tps, end, axis=0) / (end + 1.0)
    return (precision_at_end * pos).sum(axis=0) / pos.sum(axis=0)


def per_class_average_precision(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest average precision of every class that has at least one positive in y_true.

    Classes without a positive have no defined AP (recall is 0/0), so they are left out rather than scored 0 or 1.
    Vectorised over classes (chunks of columns) because a Python loop of scikit-learn calls is too slow for
    1,000+ classes; the result equals `sklearn.metrics.average_precision_score` per class, ties included.

    Returns:
        (classes, ap): the present class ids in increasing order and their average precision.
    """
    y, p = validate_probs(y_true, probs)
    classes = np.unique(y)
    ap = np.empty(classes.size, dtype=np.float64)
    step = max(1, _AP_CHUNK_ELEMENTS // max(1, y.size))
    for start in range(0, classes.size, step):
        chunk = classes[start : start + step]
        ap[start : start + step] = _average_precision_columns(p[:, chunk], y[:, None] == chunk[None, :])
    return classes, ap


def pr_auc_macro(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest average precision over classes present in y_true: the tuning objective.

    PR-AUC ranks records by each species' probability, so it rewards good scores even when the argmax is wrong,
    and with equal class weights it is not dominated by the few species with hundreds of records.
    """
    _, ap = per_class_average_precision(y_true, probs)
    return float(ap.mean()) if ap.size else float("nan")


def pr_auc_weighted(y_true: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest average precision averaged with weights = support of each class in y_true."""
    classes, ap = per_class_average_precision(y_true, probs)
    if ap.size == 0:
        return float("nan")
    support = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=classes.max() + 1)[classes]
    return float(np.average(ap, weights=support))


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Top-label confidence histogram: per equal-width bin, record count, mean confidence and accuracy.

    Bins are right-closed, (i/B, (i+1)/B], as in Guo et al. 2017; the top-label confidence is always > 0.
    Empty bins have count 0 and NaN confidence/accuracy.

    Returns:
        {"edges": (B+1,), "count": (B,), "confidence": (B,), "accuracy": (B,)}.
    """
    y, p = validate_probs(y_true, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over bins of (records in bin / n) * |accuracy - mean confidence|.

    It asks the question the abstention threshold depends on: "when the model says 90 %, is it right 90 % of
    the time?". Only the top label's probability is binned, 15 equal-width bins (Guo et al. 2017), right-closed.
    Equal-width bins make the number depend on the binning, so compare ECEs only at the same n_bins.
    """
    bins = reliability_bins(y_true, probs, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    used = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(bins["count"][used] / n * gaps))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, top_k: int = 5) -> dict[str, float]:
    """Every metric under its stable key: top1_acc, top{k}_acc, f1_macro, f1_weighted, log_loss, brier,
    pr_auc_macro, pr_auc_weighted, ece, n.

    Args:
        y_true: (n,) int labels in 0..C-1.
        probs: (n, C) probabilities over the whole label space.
        top_k: k of the top-k accuracy (key `top{k}_acc`).

    Returns:
        Metric name -> float (`n` as a float too, so the dict averages over folds like the rest).

    Raises:
        ValueError: shapes disagree, labels fall outside the label space, or rows do not sum to 1.
    """
    y, p = validate_probs(y_true, probs)
    return {
        "top1_acc": top1_accuracy(y, p),
        f"top{top_k}_acc": top_k_accuracy(y, p, top_k),
        "f1_macro": macro_f1(y, p),
        "f1_weighted": weighted_f1(y, p),
        "log_loss": log_loss(y, p),
        "brier": brier_score(y, p),
        "pr_auc_macro": pr_auc_macro(y, p),
        "pr_auc_weighted": pr_auc_weighted(y, p),
        "ece": expected_calibration_error(y, p),
        "n": float(y.size),
    }


def summarise_folds(per_fold: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) of each metric over folds; sd is 0.0 for a single fold.

    The sd is across folds, i.e. how much the score moves with the split: compare two models by whether their
    difference is larger than this. Non-numeric entries (e.g. a fold name) are skipped; a metric missing from
    some folds is summarised over the folds that have it.
    """
    names: dict[str, None] = {}
    for fold in per_fold:
        for key, value in fold.items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                names.setdefault(key, None)
    summary: dict[str, dict[str, float]] = {}
    for key in names:
        values = np.array([float(fold[key]) for fold in per_fold if key in fold], dtype=np.float64)
        sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
        summary[key] = {"mean": float(np.mean(values)), "sd": sd}
    return summary


def score_logits(logits: np.ndarray, y_true: np.ndarray, top_k: int = 5) -> dict[str, float]:
    """`classification_metrics` of softmax(logits): what a training run scores every epoch, on any worker."""
    return classification_metrics(y_true, softmax(logits), top_k=top_k)
