"""Calibration lowers NLL/ECE without moving the argmax, survives JSON, and the threshold and rank fallback
do what they promise on hand-checked examples."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from idengine import calibrate, metrics
from idengine.calibrate import Calibrator

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
    (logits, y), _ = fit_and_test
    after = calibrate.fit_calibrator(logits, y).apply(logits)
    path = calibrate.reliability_diagram(metrics.softmax(logits), after, y, tmp_path / "plots" / "rel.png")
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


SPECIES = ["A a", "A b", "B c", "C d", "X e", "X f"]
TAXA = pd.DataFrame({
    "genus": ["A", "A", "B", "C", None, ""],  # labels 4 and 5 have no genus: they must not form a taxon
    "family": ["F", "F", "F", "G", "G", "G"],
})


def test_rank_fallback_hand_example():
    probs = np.array([
        [0.85, 0.05, 0.05, 0.05, 0.0, 0.0],   # species A a
        [0.45, 0.45, 0.05, 0.05, 0.0, 0.0],   # genus A = 0.90
        [0.30, 0.20, 0.35, 0.10, 0.05, 0.0],  # genera at most 0.5; family F = 0.85
        [0.30, 0.10, 0.10, 0.30, 0.20, 0.0],  # nothing reaches 0.8
        [0.0, 0.0, 0.0, 0.10, 0.45, 0.45],    # missing genus must not sum to 0.9; family G = 1.0
    ])
    calls = calibrate.assign_calls(probs, SPECIES, TAXA, threshold=0.8)
    assert calls["call"].tolist() == ["A a", "A", "F", "unassigned", "G"]
    assert calls["rank"].tolist() == ["species", "genus", "family", "unassigned", "family"]
    np.testing.assert_allclose(calls["confidence"], [0.85, 0.90, 0.85, 0.30, 1.0])
    assert calls["top_species"].tolist() == ["A a", "A a", "B c", "A a", "X e"]
    only_genus = calibrate.assign_calls(probs, SPECIES, TAXA, threshold=0.8, ranks=["genus"])
    assert only_genus["rank"].tolist() == ["species", "genus", "unassigned", "unassigned", "unassigned"]


def _slow_assign(probs, threshold, ranks):
    """Row-by-row reference of the fallback rule."""
    out = []
    for row in probs:
        if row.max() >= threshold:
            out.append((SPECIES[row.argmax()], "species"))
            continue
        for rank in ranks:
            sums: dict[str, float] = {}
            for label, taxon in enumerate(TAXA[rank]):
                if taxon:
                    sums[taxon] = sums.get(taxon, 0.0) + row[label]
            best = max(sums, key=sums.get)
            if sums[best] >= threshold:
                out.append((best, rank))
                break
        else:
            out.append(("unassigned", "unassigned"))
    return out


def test_rank_fallback_matches_row_by_row_reference():
    rng = np.random.default_rng(4)
    probs = metrics.softmax(rng.normal(0, 2, (400, len(SPECIES))))
    calls = calibrate.assign_calls(probs, SPECIES, TAXA, threshold=0.6)
    assert list(zip(calls["call"], calls["rank"])) == _slow_assign(probs, 0.6, ["genus", "family"])
    assert set(calls["rank"]) == {"species", "genus", "family", "unassigned"}


def test_rank_fallback_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="species names"):
        calibrate.assign_calls(np.full((1, 6), 1 / 6), SPECIES[:5], TAXA, 0.8)
    with pytest.raises(ValueError, match="order"):
        calibrate.assign_calls(np.full((1, 6), 1 / 6), SPECIES, TAXA, 0.8, ranks=["order"])


def test_open_set_report_hand_counts():
    unknown = np.array([
        [0.85, 0.05, 0.05, 0.05, 0.0, 0.0],   # species call: over-classified
        [0.45, 0.45, 0.05, 0.05, 0.0, 0.0],   # genus A
        [0.30, 0.20, 0.35, 0.10, 0.05, 0.0],  # family F
        [0.30, 0.10, 0.10, 0.30, 0.20, 0.0],  # unassigned
    ])
    calls = calibrate.assign_calls(unknown, SPECIES, TAXA, threshold=0.8)
    known = np.array([[0.9, 0.1, 0, 0, 0, 0], [0.95, 0.05, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0]])
    truth = pd.DataFrame({"genus": ["A", "B", "B", "C"], "family": ["F", "F", "F", "G"]})
    report = calibrate.open_set_report(unknown, 0.8, calls, known, np.array([0, 1, 0]), unknown_taxa=truth)
    u = report["unknown"]
    assert u["n"] == 4 and u["over_classification_rate"] == 0.25
    assert u["assigned"] == {"species": 0.25, "genus": 0.25, "family": 0.25, "unassigned": 0.25}
    assert u["correct_at_rank"] == {"genus": 0.0, "family": 1.0}
    assert report["known"] == {"n": 3, "coverage": pytest.approx(2 / 3), "accuracy_of_calls": 0.5,
                               "top1_acc": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="threshold"):
        calibrate.open_set_report(unknown, 0.4, calls)


def test_rank_shared_by_every_label_is_never_called_and_unreachable_threshold_calls_nothing():
    import pandas as pd

    from idengine.calibrate import NEVER_CALL, assign_calls

    table = pd.DataFrame({"class": ["Fish"] * 3, "genus": ["A", "A", "B"]}, index=[0, 1, 2])
    probs = np.array([[0.4, 0.3, 0.3], [0.2, 0.2, 0.6]])
    calls = assign_calls(probs, ["A a", "A b", "B c"], table, threshold=0.8)
    # Genus A sums to 0.7 < 0.8; class Fish sums to 1 for every record but tells nothing: unassigned.
    assert list(calls["rank"]) == ["unassigned", "unassigned"]
    # Probabilities whose float sum exceeds 1 by rounding never pass an unreachable threshold.
    probs = np.array([[0.2577675591950033, 0.1451673785973518, 0.26803722216649567, 0.15240245939979846,
                       0.17662538064135083, 0.0]])
    assert (probs[:, :5].sum(axis=1) @ np.ones(1)) >= 1.0
    table2 = pd.DataFrame({"genus": ["A"] * 5 + ["B"]}, index=range(6))
    calls = assign_calls(probs, [f"s{i}" for i in range(6)], table2, NEVER_CALL)
    assert calls["rank"][0] == "unassigned"
