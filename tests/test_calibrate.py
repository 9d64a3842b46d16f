"""Calibration lowers NLL/ECE without moving the argmax, survives JSON, and the threshold does what it promises on
hand-checked examples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idengine.evaluate import calibrate, metrics
from idengine.evaluate.calibrate import Calibrator

TRUE_SCALE = 5.0


def _overconfident(n: int = 2000, n_classes: int = 10, seed: int = 0):
    """Labels drawn FROM softmax(z), so z is calibrated by construction; the logits returned are 5 z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, n_classes))
    z[np.arange(n), rng.integers(0, n_classes, n)] += 3.0
    cumulative = metrics.softmax(z).cumsum(axis=1)
    y = (cumulative > rng.random((n, 1))).argmax(axis=1)
    return z * TRUE_SCALE, y


@pytest.fixture(scope="module")
def fit_and_test():
    return _overconfident(seed=0), _overconfident(seed=1)


def test_temperature_recovers_scale_and_lowers_log_loss(fit_and_test):
    (logits, y), (test_logits, test_y) = fit_and_test
    cal = calibrate.fit_calibrator(logits, y, "temperature")
    assert cal.temperature == pytest.approx(TRUE_SCALE, rel=0.08)
    report = calibrate.calibration_report(test_logits, test_y, cal)
    assert report["after"]["log_loss"] < 0.5 * report["before"]["log_loss"]
    assert report["after"]["ece"] < report["before"]["ece"]
    np.testing.assert_array_equal(cal.apply(test_logits).argmax(axis=1), test_logits.argmax(axis=1))


def test_temperature_near_one_on_calibrated_logits(fit_and_test):
    (logits, y), _ = fit_and_test
    assert calibrate.fit_temperature(logits / TRUE_SCALE, y) == pytest.approx(1.0, rel=0.08)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_shared_maps_lower_ece_keep_argmax_and_sum_to_one(fit_and_test, method):
    (logits, y), (test_logits, test_y) = fit_and_test
    cal = calibrate.fit_calibrator(logits, y, method)
    for z, labels in ((logits, y), (test_logits, test_y)):
        before, after = metrics.softmax(z), cal.apply(z)
        np.testing.assert_allclose(after.sum(axis=1), 1.0, rtol=1e-12)
        assert after.min() > 0
        np.testing.assert_array_equal(after.argmax(axis=1), z.argmax(axis=1))
        ece_before = metrics.expected_calibration_error(labels, before)
        assert metrics.expected_calibration_error(labels, after) < 0.3 * ece_before
        assert metrics.log_loss(labels, after) < metrics.log_loss(labels, before)


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic", "none"])
def test_json_round_trip_gives_identical_probabilities(fit_and_test, method):
    (logits, y), (test_logits, _) = fit_and_test
    cal = calibrate.fit_calibrator(logits, y, method)
    restored = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert restored == cal
    np.testing.assert_array_equal(restored.apply(test_logits), cal.apply(test_logits))


def test_bad_calibrator_records_raise():
    with pytest.raises(ValueError, match="method"):
        Calibrator.from_dict({"temperature": 2.0})
    with pytest.raises(ValueError, match="coef"):
        Calibrator.from_dict({"method": "platt", "params": {"intercept": 0.0}})
    with pytest.raises(ValueError, match="temperature"):
        Calibrator("temperature", temperature=-1.0)
    with pytest.raises(ValueError, match="one of"):
        calibrate.fit_calibrator(np.zeros((2, 3)), np.array([0, 1]), "beta")


def test_reliability_diagram_writes_png(fit_and_test, tmp_path):
    from idengine.report.plots import reliability_comparison_figure, save_png

    (logits, y), _ = fit_and_test
    before, after = metrics.softmax(logits), calibrate.fit_calibrator(logits, y).apply(logits)
    fig = reliability_comparison_figure(metrics.reliability_bins(y, before), metrics.reliability_bins(y, after),
                                        metrics.expected_calibration_error(y, before),
                                        metrics.expected_calibration_error(y, after), y.size)
    path = save_png(fig, tmp_path / "plots" / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def _rows(confidences):
    """3-class rows whose argmax is class 0 with the given confidence."""
    c = np.asarray(confidences, dtype=float)[:, None]
    return np.hstack([c, (1 - c) / 2, (1 - c) / 2])


def test_threshold_hand_example_is_lowest_not_first_dip():
    """Precision by threshold: 0.9 -> 1, 0.8 -> 1/2, 0.7 -> 2/3, 0.6 -> 3/4, 0.5 -> 3/5. Target 0.75: t = 0.6."""
    probs = _rows([0.9, 0.8, 0.7, 0.6, 0.5])
    y = np.array([0, 1, 0, 0, 2])
    choice = calibrate.choose_threshold(probs, y, 0.75)
    assert (choice.threshold, choice.achieved_precision, choice.coverage) == (0.6, 0.75, 0.8)
    assert choice.reachable and choice.target == 0.75
    assert calibrate.choose_threshold(probs, y, 1.0).threshold == 0.9


def test_threshold_counts_ties_together():
    probs = _rows([0.9, 0.7, 0.7])
    choice = calibrate.choose_threshold(probs, np.array([0, 0, 1]), 0.8)
    assert choice.threshold == 0.9 and choice.coverage == pytest.approx(1 / 3)


def test_threshold_meets_target_and_is_lowest_on_its_data(fit_and_test):
    (logits, y), _ = fit_and_test
    probs = calibrate.fit_calibrator(logits, y).apply(logits)
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == y
    for target in (0.8, 0.9, 0.97):
        choice = calibrate.choose_threshold(probs, y, target)
        called = conf >= choice.threshold
        assert choice.reachable and right[called].mean() >= target
        assert choice.achieved_precision == pytest.approx(right[called].mean())
        assert choice.coverage == pytest.approx(called.mean())
        lower = np.unique(conf[conf < choice.threshold])
        assert all(right[conf >= t].mean() < target for t in lower)


def test_unreachable_threshold_calls_nothing():
    probs = _rows([0.9, 0.8])
    choice = calibrate.choose_threshold(probs, np.array([1, 2]), 0.5)
    assert not choice.reachable and choice.threshold > 1.0 and choice.coverage == 0.0
    assert json.loads(json.dumps(choice.to_dict()))["reachable"] is False
