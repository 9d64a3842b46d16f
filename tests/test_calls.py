"""Calls: the rank fallback and the open-set report do what they promise on hand-checked examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from idengine.evaluate import metrics
from idengine.evaluate.calls import assign_calls, open_set_report


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
    calls = assign_calls(probs, SPECIES, TAXA, threshold=0.8)
    assert calls["call"].tolist() == ["A a", "A", "F", "unassigned", "G"]
    assert calls["call_rank"].tolist() == ["species", "genus", "family", "unassigned", "family"]
    np.testing.assert_allclose(calls["call_prob"], [0.85, 0.90, 0.85, 0.30, 1.0])
    only_genus = assign_calls(probs, SPECIES, TAXA, threshold=0.8, ranks=["genus"])
    assert only_genus["call_rank"].tolist() == ["species", "genus", "unassigned", "unassigned", "unassigned"]


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
    calls = assign_calls(probs, SPECIES, TAXA, threshold=0.6)
    assert list(zip(calls["call"], calls["call_rank"])) == _slow_assign(probs, 0.6, ["genus", "family"])
    assert set(calls["call_rank"]) == {"species", "genus", "family", "unassigned"}


def test_rank_fallback_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="species names"):
        assign_calls(np.full((1, 6), 1 / 6), SPECIES[:5], TAXA, 0.8)
    with pytest.raises(ValueError, match="order"):
        assign_calls(np.full((1, 6), 1 / 6), SPECIES, TAXA, 0.8, ranks=["order"])


def test_open_set_report_hand_counts():
    unknown = np.array([
        [0.85, 0.05, 0.05, 0.05, 0.0, 0.0],   # species call: over-classified
        [0.45, 0.45, 0.05, 0.05, 0.0, 0.0],   # genus A
        [0.30, 0.20, 0.35, 0.10, 0.05, 0.0],  # family F
        [0.30, 0.10, 0.10, 0.30, 0.20, 0.0],  # unassigned
    ])
    unknown_calls = assign_calls(unknown, SPECIES, TAXA, threshold=0.8)
    known = np.array([[0.9, 0.1, 0, 0, 0, 0], [0.95, 0.05, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0]])
    known_calls = assign_calls(known, SPECIES, TAXA, threshold=0.8)
    known_calls["top1_species"] = np.asarray(SPECIES, dtype=object)[known.argmax(axis=1)]
    truth = pd.DataFrame({"species": ["new a", "new b", "new c", "new d"], "genus": ["A", "B", "B", "C"],
                          "family": ["F", "F", "F", "G"]})
    known_truth = pd.DataFrame({"species": ["A a", "A b", "A a"]})
    report = open_set_report(unknown_calls, truth, known_calls, known_truth, reference_genera={"A", "B", "C"})
    u = report["unknown"]
    assert u["n"] == 4 and u["over_classification_rate"] == 0.25
    assert u["calls"]["assigned"] == {"species": 0.25, "genus": 0.25, "family": 0.25, "unassigned": 0.25}
    assert u["calls"]["correct_at_rank"] == {"species": 0.0, "genus": 0.0, "family": 1.0}
    assert u["genus_in_reference"] == 1.0 and u["right_genus_call_when_genus_in_reference"] == 0.0
    assert report["known"] == {"n": 3, "coverage": pytest.approx(2 / 3), "accuracy_of_calls": 0.5,
                               "top1_acc": pytest.approx(2 / 3)}


def test_rank_shared_by_every_label_is_never_called_and_unreachable_threshold_calls_nothing():
    from idengine.evaluate.calibrate import NEVER_CALL

    table = pd.DataFrame({"class": ["Fish"] * 3, "genus": ["A", "A", "B"]}, index=[0, 1, 2])
    probs = np.array([[0.4, 0.3, 0.3], [0.2, 0.2, 0.6]])
    calls = assign_calls(probs, ["A a", "A b", "B c"], table, threshold=0.8)
    # Genus A sums to 0.7 < 0.8; class Fish sums to 1 for every record but tells nothing: unassigned.
    assert list(calls["call_rank"]) == ["unassigned", "unassigned"]
    # Probabilities whose float sum exceeds 1 by rounding never pass an unreachable threshold.
    probs = np.array([[0.2577675591950033, 0.1451673785973518, 0.26803722216649567, 0.15240245939979846,
                       0.17662538064135083, 0.0]])
    assert (probs[:, :5].sum(axis=1) @ np.ones(1)) >= 1.0
    table2 = pd.DataFrame({"genus": ["A"] * 5 + ["B"]}, index=range(6))
    calls = assign_calls(probs, [f"s{i}" for i in range(6)], table2, NEVER_CALL)
    assert calls["call_rank"][0] == "unassigned"
