"""Step 12, calibrate: probabilities you can act on, fitted on out-of-fold validation logits (never the test split).

1. `fit_calibrator` -> `Calibrator`: temperature scaling (default), or a shared one-vs-rest Platt / isotonic map.
2. `calibration_report` / `reliability_diagram`: log loss, Brier and ECE before and after.
3. `choose_threshold`: the lowest confidence whose species calls reach a target precision.
4. `assign_calls`: species call above the threshold, else the deepest rank whose summed probability passes it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from idengine import metrics
from idengine.columns import RANKS

log = logging.getLogger(__name__)

METHODS = ("temperature", "platt", "isotonic", "none")
TEMPERATURE_BOUNDS = (0.01, 100.0)
"""Search range of T; an optimum at either end is logged, it means the logits are degenerate."""
TOP_M = 20
"""Classes per record whose (score, is-true) pairs fit the shared Platt/isotonic map."""
PROB_FLOOR = 1e-300
"""Smallest per-class value kept before renormalising: no probability is exactly 0, and the floor is far below
any value that could tie with (and so replace) a row's top species."""
TIE_BREAK = 1e-9
"""Slope added to the isotonic step function so it is strictly increasing and never reorders species."""
NEVER_CALL = math.nextafter(1.0, 2.0)
"""Threshold returned when no threshold reaches the target: above every probability, so nothing is called."""
UNASSIGNED = "unassigned"


def _check_logits(logits: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"expected logits (n, C) and y_true (n,) with n > 0; got {z.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y_true holds labels outside 0..{z.shape[1] - 1}: the logits and label map disagree")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or inf: the model diverged; calibrate on a finished run")
    return z, y


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    One parameter cannot over-fit a few thousand records, and dividing by T never changes the argmax, so the
    species ranking (and top-k accuracy) stays exactly as trained. Searched on log T, bounded.
    """
    z, y = _check_logits(logits, y_true)
    # Shift each row so its max is 0 once: max(z / T) = max(z) / T, so every evaluation is one exp, no overflow.
    shifted = z - z.max(axis=1, keepdims=True)
    true_shifted = shifted[np.arange(y.size), y]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return float(np.mean(np.log(np.exp(shifted / t).sum(axis=1)) - true_shifted / t))

    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    log.info("temperature fit: %d evaluations, NLL %.4f", result.nfev, result.fun)
    t = math.exp(result.x)
    if min(abs(result.x - lo), abs(result.x - hi)) < 1e-3:
        log.warning("temperature %.4g sits at the search bound %s: check the logits", t, TEMPERATURE_BOUNDS)
    return t


def _top_m_pairs(scores: np.ndarray, y: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(score, is-true-class) pairs of each record's m best-scored classes, flattened."""
    m = min(m, scores.shape[1])
    top = np.argpartition(-scores, m - 1, axis=1)[:, :m]
    return np.take_along_axis(scores, top, axis=1).ravel(), (top == y[:, None]).ravel().astype(np.float64)


def _renormalise(values: np.ndarray) -> np.ndarray:
    values = np.maximum(values, PROB_FLOOR)
    return values / values.sum(axis=1, keepdims=True)


@dataclass
class Calibrator:
    """A fitted calibration map, logits -> probabilities, stored as plain JSON (no pickle).

    `temperature`: probs = softmax(logits / T). `platt` / `isotonic`: ONE map shared by all classes, fitted
    one-vs-rest on the (score, is-true-class) pairs of each record's TOP_M best classes, applied to every class,
    then rows renormalised. Why shared rather than one map per class: out-of-fold data hold ~5 records per
    species, too few for a per-class fit; 1,000+ separate fits take minutes; and per-class maps reorder species
    between rows, changing the argmax. Both shared maps are strictly increasing, so the call never changes.
    Why the top M: all n*C pairs are mostly near-zero negatives (35 M at 25k x 1.4k) that the threshold and
    the rank fallback never look at. Platt's score is the log-softmax, so for small p it acts like a temperature
    (sigmoid(a log p + b) ~ e^b p^a); isotonic's score is the softmax probability (interpolated with np.interp).
    """

    method: str
    temperature: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, not {self.method!r}")
        needed = {"temperature": (), "none": (), "platt": ("coef", "intercept"),
                  "isotonic": ("x_thresholds", "y_thresholds")}[self.method]
        missing = [k for k in needed if k not in self.params]
        if missing or (self.method == "temperature" and not (self.temperature or 0) > 0):
            raise ValueError(f"{self.method} calibrator lacks {missing or ['temperature > 0']}: refit it")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """(n, C) logits -> (n, C) calibrated probabilities, rows summing to 1, argmax unchanged."""
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "temperature":
            return metrics.softmax(z / self.temperature)
        if self.method == "platt":
            q = expit(self.params["coef"] * log_softmax(z, axis=1) + self.params["intercept"])
            return _renormalise(q)
        if self.method == "isotonic":
            p = metrics.softmax(z)
            q = np.interp(p, self.params["x_thresholds"], self.params["y_thresholds"]) + TIE_BREAK * p
            return _renormalise(q)
        return metrics.softmax(z)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for json.dump; floats survive the round trip exactly."""
        return {"method": self.method, "temperature": self.temperature, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """Inverse of to_dict; raises ValueError when the method or its parameters are missing."""
        if "method" not in data:
            raise ValueError("calibration record has no 'method': it was not written by Calibrator.to_dict")
        return cls(data["method"], data.get("temperature"), dict(data.get("params") or {}))


def fit_calibrator(logits: np.ndarray, y_true: np.ndarray, method: str = "temperature") -> Calibrator:
    """Fit a calibration map on out-of-fold validation logits.

    Args:
        logits: (n, C) validation logits over the whole label space.
        y_true: (n,) true labels.
        method: `temperature`, `platt`, `isotonic` or `none` (see Calibrator for the design).

    Returns:
        The fitted, JSON-serialisable Calibrator.

    Raises:
        ValueError: bad shapes or labels, unknown method, or a Platt fit with no signal.
    """
    z, y = _check_logits(logits, y_true)
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, not {method!r}")
    if method == "temperature":
        return Calibrator("temperature", fit_temperature(z, y))
    if method == "none":
        return Calibrator("none")
    if method == "platt":
        x, target = _top_m_pairs(log_softmax(z, axis=1), y, TOP_M)
        model = LogisticRegression(C=1e6, max_iter=1000).fit(x[:, None], target)
        coef, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
        if coef <= 0:
            raise ValueError(f"Platt fit gave a non-increasing map (slope {coef:.3g}): the logits carry no signal")
        return Calibrator("platt", params={"coef": coef, "intercept": intercept, "top_m": TOP_M})
    x, target = _top_m_pairs(metrics.softmax(z), y, TOP_M)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, target)
    params = {"x_thresholds": iso.X_thresholds_.tolist(), "y_thresholds": iso.y_thresholds_.tolist(), "top_m": TOP_M}
    return Calibrator("isotonic", params=params)


def _scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        "log_loss": metrics.log_loss(y, probs),
        "brier": metrics.brier_score(y, probs),
        "ece": metrics.expected_calibration_error(y, probs),
        "top1_acc": metrics.top1_accuracy(y, probs),
    }


def calibration_report(logits: np.ndarray, y_true: np.ndarray, calibrator: Calibrator) -> dict[str, Any]:
    """Log loss, Brier, ECE (and top-1, which calibration must not change) before and after calibration.

    Returns:
        {"method", "temperature", "n", "before": {...}, "after": {...}}.
    """
    z, y = _check_logits(logits, y_true)
    return {
        "method": calibrator.method,
        "temperature": calibrator.temperature,
        "n": int(y.size),
        "before": _scores(metrics.softmax(z), y),
        "after": _scores(calibrator.apply(z), y),
    }


def reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray, y_true: np.ndarray,
                        path: str | Path) -> Path:
    """Write a PNG: top-label confidence vs accuracy per ECE bin, before and after, with the diagonal."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in a library

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, probs, marker in (("before", probs_before, "o"), ("after", probs_after, "s")):
        bins = metrics.reliability_bins(y_true, probs)
        used = bins["count"] > 0
        ece = metrics.expected_calibration_error(y_true, probs)
        ax.plot(bins["confidence"][used], bins["accuracy"][used], marker=marker, label=f"{name} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-label confidence", ylabel="accuracy",
           title=f"Reliability ({metrics.ECE_BINS} bins, n={len(y_true)})")
    ax.legend(loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    """Call a species when its probability is >= this."""
    achieved_precision: float
    """Precision of those calls on the data the threshold was chosen on (if unreachable: the best any reached)."""
    coverage: float
    """Fraction of records called at the threshold (0 if unreachable)."""
    target: float
    """The precision asked for."""
    reachable: bool
    """False: no threshold reaches the target, so the threshold is above 1 and nothing is called."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threshold(probs: np.ndarray, y_true: np.ndarray, target_precision: float) -> ThresholdChoice:
    """The LOWEST confidence t whose species calls {max prob >= t} have precision >= target_precision.

    Precision is computed at every distinct confidence (ties enter together), because it is not monotone in t:
    picking the first t from the top where it dips below the target would call too little. Choose it on
    out-of-fold calibrated probabilities; on new data the precision holds only as far as they resemble them.

    Raises:
        ValueError: target outside (0, 1] or bad shapes.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], not {target_precision}")
    y, p = metrics.validate_probs(y_true, probs)
    if y.size == 0:
        raise ValueError("choose_threshold needs at least one record")
    conf = p.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    correct = np.cumsum(p.argmax(axis=1)[order] == y[order])
    block_end = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
    precision = correct[block_end] / (block_end + 1.0)
    ok = np.flatnonzero(precision >= target_precision)
    if ok.size == 0:
        log.warning("no threshold reaches precision %.3f (best %.3f): nothing will be called at species level",
                    target_precision, precision.max())
        return ThresholdChoice(NEVER_CALL, float(precision.max()), 0.0, float(target_precision), False)
    end = block_end[ok[-1]]
    return ThresholdChoice(float(conf_sorted[end]), float(precision[ok[-1]]), float((end + 1) / y.size),
                           float(target_precision), True)


def _rank_index(rank_table: pd.DataFrame, rank: str, n_labels: int) -> tuple[np.ndarray, sparse.csr_array]:
    """Taxon names at one rank and the (labels x taxa) 0/1 matrix; missing or empty taxa belong to none."""
    values = rank_table[rank]
    values = values.where(values.notna() & (values.astype(str) != ""))
    codes, names = pd.factorize(values)
    labels = np.flatnonzero(codes >= 0)
    matrix = sparse.csr_array((np.ones(labels.size), (labels, codes[labels])), shape=(n_labels, len(names)))
    return np.asarray(names, dtype=object), matrix


def assign_calls(probs: np.ndarray, species_names: Sequence[str], rank_table: pd.DataFrame, threshold: float,
                 ranks: Sequence[str] | None = None) -> pd.DataFrame:
    """Species call if its probability passes the threshold, else the deepest rank whose taxon sum passes it.

    At each rank, from the deepest up, probabilities are summed over the labels sharing a taxon (a sparse
    matrix product, so millions of rows stay fast); the first rank whose best taxon reaches the threshold gives
    the call. Otherwise the record is `unassigned` with its top species probability as confidence. A rank at which
    every label shares one taxon is skipped: its sum is always 1, so it carries no evidence about the query.

    Args:
        probs: (n, C) calibrated probabilities.
        species_names: the C species names, in label order.
        rank_table: one row per label (index 0..C-1), one column per rank; missing taxa are NaN/None/"".
        threshold: the species threshold, applied at every rank.
        ranks: ranks to try, deepest first; default: the columns of RANKS found in rank_table, genus upwards.

    Returns:
        DataFrame with `call`, `rank`, `confidence`, `top_species`, `top_species_prob`, one row per record.
    """
    p = np.asarray(probs, dtype=np.float64)
    n_labels = p.shape[1]
    if len(species_names) != n_labels:
        raise ValueError(f"{len(species_names)} species names for {n_labels} probability columns")
    ranks = [r for r in reversed(RANKS) if r in rank_table.columns] if ranks is None else list(ranks)
    missing = [r for r in ranks if r not in rank_table.columns]
    if missing:
        raise ValueError(f"rank_table has no column(s) {missing}; it has {list(rank_table.columns)}")
    absent = pd.Index(range(n_labels)).difference(rank_table.index)
    if len(absent):
        raise ValueError(f"rank_table lacks labels {list(absent[:5])}...: index it by label 0..{n_labels - 1}")
    table = rank_table.reindex(range(n_labels))
    top = p.argmax(axis=1)
    conf = p[np.arange(p.shape[0]), top]
    top_names = np.asarray(species_names, dtype=object)[top]
    call, rank, confidence = top_names.copy(), np.full(p.shape[0], "species", dtype=object), conf.copy()
    pending = conf < threshold
    for rank_name in ranks:
        idx = np.flatnonzero(pending)
        names, matrix = _rank_index(table, rank_name, n_labels)
        # A rank where every label shares one taxon (e.g. class in a fish-only reference) always sums to 1: a call
        # there says what the reference holds, not what the model saw, and would leave nothing unassigned.
        if idx.size == 0 or names.size == 0 or (names.size == 1 and matrix.sum() == n_labels):
            continue
        sums = p[idx] @ matrix
        best = sums.argmax(axis=1)
        # Clip: summed float probabilities can exceed 1 by rounding and pass an unreachable threshold (1 + eps).
        best_sum = np.minimum(sums[np.arange(idx.size), best], 1.0)
        hit = best_sum >= threshold
        call[idx[hit]], rank[idx[hit]], confidence[idx[hit]] = names[best[hit]], rank_name, best_sum[hit]
        pending[idx[hit]] = False
    call[pending], rank[pending] = UNASSIGNED, UNASSIGNED
    return pd.DataFrame({"call": call, "rank": rank, "confidence": confidence,
                         "top_species": top_names, "top_species_prob": conf})


def open_set_report(probs_unknown: np.ndarray, threshold: float, rank_fallback_calls: pd.DataFrame,
                    probs_known: np.ndarray | None = None, y_known: np.ndarray | None = None,
                    unknown_taxa: pd.DataFrame | None = None) -> dict[str, Any]:
    """How the threshold behaves on species ABSENT from the reference, and on known species.

    Every species-level call for an absent species is wrong: the over-classification rate is their fraction
    with max probability >= threshold. The rank fallback should send them to genus, family... or unassigned.

    Args:
        probs_unknown: (n_u, C) calibrated probabilities of queries from species outside the label space.
        threshold: the species threshold.
        rank_fallback_calls: `assign_calls` output for probs_unknown at this threshold.
        probs_known: optional (n_k, C) calibrated probabilities of known-species queries (e.g. out-of-fold).
        y_known: their labels (the known part is reported only when both are given).
        unknown_taxa: optional true taxa of the unknown queries (rows aligned, one column per rank): adds the
            fraction of calls at each rank that name the right taxon.

    Returns:
        {"threshold", "unknown": {"n", "over_classification_rate", "assigned": {rank: fraction}, ...},
         "known": {"n", "coverage", "accuracy_of_calls", "top1_acc"} (when known data are given)}.

    Raises:
        ValueError: the calls do not match probs_unknown at this threshold (different rows or threshold).
    """
    p = np.asarray(probs_unknown, dtype=np.float64)
    n = p.shape[0]
    if len(rank_fallback_calls) != n:
        raise ValueError(f"{len(rank_fallback_calls)} calls for {n} unknown queries")
    ranks = rank_fallback_calls["rank"].to_numpy()
    species_called = p.max(axis=1) >= threshold if n else np.zeros(0, dtype=bool)
    if not np.array_equal(species_called, ranks == "species"):
        raise ValueError("rank_fallback_calls disagree with probs_unknown at this threshold: recompute them")
    assigned = {"species": 0.0}
    for name in pd.unique(ranks):
        assigned[str(name)] = float(np.mean(ranks == name))
    assigned.setdefault(UNASSIGNED, 0.0)
    unknown: dict[str, Any] = {"n": n, "over_classification_rate": float(species_called.mean()) if n else None,
                               "assigned": assigned}
    if unknown_taxa is not None:
        calls = rank_fallback_calls["call"].to_numpy()
        unknown["correct_at_rank"] = {
            rank: float(np.mean(calls[ranks == rank] == unknown_taxa[rank].to_numpy()[ranks == rank]))
            for rank in assigned if rank in unknown_taxa.columns and np.any(ranks == rank)
        }
    report: dict[str, Any] = {"threshold": float(threshold), "unknown": unknown}
    if probs_known is not None and y_known is not None:
        report["known"] = _known_report(probs_known, y_known, threshold)
    return report


def _known_report(probs: np.ndarray, y_true: np.ndarray, threshold: float) -> dict[str, Any]:
    """Coverage and accuracy of species calls at the threshold for species in the reference (None: no calls)."""
    y, p = metrics.validate_probs(y_true, probs)
    called = p.max(axis=1) >= threshold
    right = p.argmax(axis=1) == y
    return {
        "n": int(y.size),
        "coverage": float(called.mean()),
        "accuracy_of_calls": float(right[called].mean()) if called.any() else None,
        "top1_acc": float(right.mean()),
    }
