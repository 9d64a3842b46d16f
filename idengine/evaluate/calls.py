"""Step 9c, calls: from calibrated probabilities to a call per record (species, a higher rank, or unassigned), and
what those calls are worth: the share called at each rank, how many are right (`calls_summary`), and
over-classification of species that are not in the reference (`open_set_report`). Calls are DataFrames with `call`,
`call_rank` and `confidence`, whoever made them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from idengine import layout as C
from idengine.data.labels import LabelSpace

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"


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
        ranks: ranks to try, deepest first; default: the columns of C.RANKS found in rank_table, genus upwards.

    Returns:
        DataFrame with `call`, `call_rank` and `confidence` (the called taxon's probability), one row per record.
    """
    p = np.asarray(probs, dtype=np.float64)
    n_labels = p.shape[1]
    if len(species_names) != n_labels:
        raise ValueError(f"{len(species_names)} species names for {n_labels} probability columns")
    ranks = [r for r in reversed(C.RANKS) if r in rank_table.columns] if ranks is None else list(ranks)
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
    return pd.DataFrame({"call": call, "call_rank": rank, "confidence": confidence})


def calls_for(probs: np.ndarray, labels: LabelSpace, threshold: float, rank_fallback: bool) -> pd.DataFrame:
    """assign_calls with the label space's ranks, deepest first (none when rank fallback is off)."""
    ranks = list(reversed(labels.ranks)) if rank_fallback else []
    return assign_calls(probs, labels.species, labels.taxonomy_table()[list(labels.ranks)], threshold, ranks=ranks)


def calls_summary(calls: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Fraction of records called at each rank, and of those the fraction naming the true taxon at that rank.

    Args:
        calls: assign_calls output.
        truth: the true species and ranks of the same records (row-aligned columns `species`, genus, ...).
    """
    rank = calls["call_rank"].to_numpy()
    call = calls["call"].to_numpy()
    out: dict[str, Any] = {"n": int(len(calls)), "assigned": {}, "correct_at_rank": {}}
    right = np.zeros(len(calls), dtype=bool)
    for name in pd.unique(rank):
        at = rank == name
        out["assigned"][str(name)] = float(at.mean())
        if name != UNASSIGNED:
            column = C.SPECIES if name == "species" else name
            hit = call[at] == truth[column].to_numpy()[at]
            right[np.flatnonzero(at)[hit]] = True
            out["correct_at_rank"][str(name)] = float(hit.mean())
    out["correct_call_rate"] = float(right.mean()) if len(calls) else float("nan")
    out["wrong_call_rate"] = float(((rank != UNASSIGNED) & ~right).mean()) if len(calls) else float("nan")
    return out


def open_set_report(unknown_calls: pd.DataFrame, unknown_truth: pd.DataFrame, known_calls: pd.DataFrame,
                    known_truth: pd.DataFrame, reference_genera: set[str] | None = None) -> dict[str, Any]:
    """How the calls behave on species ABSENT from the reference, beside known-species records.

    Every species-level call for an absent species is wrong: over-classification is their share of species calls.
    The rank fallback should send them to genus, family... or unassigned.

    Args:
        unknown_calls, unknown_truth: calls (`call`, `call_rank`) of queries whose species is not in the reference,
            and their true species and ranks (rows aligned).
        known_calls, known_truth: the same for known-species records (e.g. the test split).
        reference_genera: the genera of the reference, to report how often an absent species' genus is known.

    Returns:
        {"unknown": {"n", "over_classification_rate", "calls", ...}, "known": {"n", "coverage", "accuracy_of_calls",
        "top1_acc"}}.
    """
    species_called = unknown_calls["call_rank"].to_numpy() == "species"
    n = len(unknown_calls)
    unknown: dict[str, Any] = {"n": n, "over_classification_rate": float(species_called.mean()) if n else None,
                               "calls": calls_summary(unknown_calls, unknown_truth)}
    if reference_genera is not None and "genus" in unknown_truth.columns and n:
        known_genus = unknown_truth["genus"].isin(reference_genera).to_numpy()
        right = (unknown_calls["call_rank"].to_numpy() == "genus") & \
            (unknown_calls["call"].to_numpy() == unknown_truth["genus"].to_numpy())
        unknown["genus_in_reference"] = float(known_genus.mean())
        unknown["right_genus_call_when_genus_in_reference"] = float(right[known_genus].mean()) \
            if known_genus.any() else float("nan")
    called = known_calls["call_rank"].to_numpy() == "species"
    right = known_calls["call"].to_numpy() == known_truth[C.SPECIES].to_numpy()
    top1 = known_calls["top1_species"].to_numpy() == known_truth[C.SPECIES].to_numpy() \
        if "top1_species" in known_calls else right
    known = {"n": int(len(known_calls)), "coverage": float(called.mean()) if len(called) else float("nan"),
             "accuracy_of_calls": float(right[called].mean()) if called.any() else None,
             "top1_acc": float(np.mean(top1)) if len(top1) else float("nan")}
    return {"unknown": unknown, "known": known}
