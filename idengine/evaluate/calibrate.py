"""Step 9b, calibrate: probabilities you can act on, fitted on out-of-fold validation logits (never the test split).

1. `fit_calibrator` -> `Calibrator`: temperature scaling (default), or a shared one-vs-rest Platt / isotonic map.
2. `calibration_report`: log loss, Brier and ECE before and after (the diagram is `report/plots.py`'s).
3. `choose_threshold`: the lowest confidence whose calls reach a target precision (`evaluate/calls.py` makes them).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from idengine.config import CALIBRATION_METHODS as METHODS
from idengine.evaluate import metrics

log = logging.getLogger(__name__)

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

    Choose it on out-of-fold calibrated probabilities; on new data the precision holds only as far as they
    resemble them (`choose_threshold_for` does the work).

    Raises:
        ValueError: target outside (0, 1] or bad shapes.
    """
    y, p = metrics.validate_probs(y_true, probs)
    if y.size == 0:
        raise ValueError("choose_threshold needs at least one record")
    return choose_threshold_for(p.max(axis=1), p.argmax(axis=1) == y, target_precision,
                                "species level by the classifier alone (its own abstention threshold)")


def choose_threshold_for(confidence: np.ndarray, correct: np.ndarray, target_precision: float,
                         what: str = "this level") -> ThresholdChoice:
    """The LOWEST t whose calls {confidence >= t} reach the target precision, for any kind of call.

    Precision is computed at every distinct confidence (ties enter together), because it is not monotone in t:
    picking the first t from the top where it dips below the target would call too little.

    Args:
        confidence: (n,) the probability of the call each record would get; correct: (n,) whether it is right.
        target_precision: in (0, 1].
        what: what is being called, for the warning when no threshold reaches the target.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], not {target_precision}")
    conf, right = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if conf.size == 0:
        return ThresholdChoice(NEVER_CALL, float("nan"), 0.0, float(target_precision), False)
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    hits = np.cumsum(right[order])
    block_end = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
    precision = hits[block_end] / (block_end + 1.0)
    ok = np.flatnonzero(precision >= target_precision)
    if ok.size == 0:
        log.warning("no threshold reaches precision %.3f (best %.3f over %d out-of-fold queries): nothing will be "
                    "called at %s", target_precision, precision.max(), conf.size, what)
        return ThresholdChoice(NEVER_CALL, float(precision.max()), 0.0, float(target_precision), False)
    end = block_end[ok[-1]]
    return ThresholdChoice(float(conf_sorted[end]), float(precision[ok[-1]]), float((end + 1) / conf.size),
                           float(target_precision), True)
