"""Step 9c, calls: from calibrated probabilities to a call per record (species, a higher rank, or unassigned), and
what those calls are worth: the share called at each rank, how many are right (`calls_summary`), and
over-classification of species that are not in the reference (`open_set_report`). Calls are DataFrames with `call`,
`call_rank` and `call_prob`, whoever made them.
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
NOVEL = "novel"
"""The call of a query whose species is (probably) not in the reference, at no resolved rank."""


def rank_index(rank_table: pd.DataFrame, rank: str, n_labels: int) -> tuple[np.ndarray, sparse.csr_array]:
    """Taxon names at one rank and the (labels x taxa) 0/1 matrix; missing or empty taxa belong to none."""
    values = rank_table[rank]
    values = values.where(values.notna() & (values.astype(str) != ""))
    codes, names = pd.factorize(values)
    labels = np.flatnonzero(codes >= 0)
    matrix = sparse.csr_array((np.ones(labels.size), (labels, codes[labels])), shape=(n_labels, len(names)))
    return np.asarray(names, dtype=object), matrix


def _dense_or_sparse(probs) -> sparse.csr_array | np.ndarray:
    return sparse.csr_array(probs, dtype=np.float64) if sparse.issparse(probs) else np.asarray(probs, np.float64)


def _best_column(p, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the best of the given columns and its probability (ties: the lower column)."""
    if sparse.issparse(p):
        sub = sparse.csr_array(p[:, columns])
        best = np.asarray(sub.argmax(axis=1)).ravel()
        return columns[best], np.asarray(sub[np.arange(sub.shape[0]), best]).ravel()
    best = p[:, columns].argmax(axis=1)
    return columns[best], p[np.arange(p.shape[0]), columns[best]]


def assign_calls(probs, species_names: Sequence[str | None], rank_table: pd.DataFrame,
                 threshold: float | dict[str, float], ranks: Sequence[str] | None = None) -> pd.DataFrame:
    """Species call if its probability passes the species threshold, else the deepest rank whose summed
    probability passes that rank's threshold, else (when thresholds has `novel`) "novel", else unassigned.

    At each rank, from the deepest up, probabilities are summed over the columns sharing a taxon (a sparse
    matrix product, so millions of rows stay fast). A rank at which every column shares one taxon is skipped: its
    sum is always 1, so it carries no evidence about the query. Columns may also stand for "a species not in the
    reference" (species name None): they count toward the ranks their rank_table row names (a novel species of
    genus g toward g) and toward `novel`, never toward a species call.

    Args:
        probs: (n, C) calibrated probabilities, dense or scipy sparse (the engine's option space).
        species_names: the C column names; None for a novel column.
        rank_table: one row per column (index 0..C-1), one column per rank; missing taxa are NaN/None/"".
        threshold: one threshold for every rank (a classifier), or {rank: threshold} with `species`, each rank of
            `ranks` and optionally `novel` (the engine: each rank's own threshold for the same precision).
        ranks: ranks to try, deepest first; default: the columns of C.RANKS found in rank_table, genus upwards.

    Returns:
        DataFrame with `call`, `call_rank` and `call_prob` (the called taxon's probability), one row per record.
    """
    p = _dense_or_sparse(probs)
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
    limits = threshold if isinstance(threshold, dict) else {"species": threshold, **{r: threshold for r in ranks}}
    names = np.asarray(species_names, dtype=object)
    is_species = np.array([n is not None for n in names], dtype=bool)
    top, conf = _best_column(p, np.flatnonzero(is_species))
    call, rank, confidence = names[top].copy(), np.full(p.shape[0], "species", dtype=object), conf.copy()
    pending = conf < limits["species"]
    table = rank_table.reindex(range(n_labels))
    for rank_name in ranks:
        _call_rank(p, table, rank_name, limits[rank_name], pending, (call, rank, confidence))
    if "novel" in limits and (~is_species).any():
        novel = np.asarray(p[:, np.flatnonzero(~is_species)].sum(axis=1)).ravel()
        hit = pending & (np.minimum(novel, 1.0) >= limits["novel"])
        call[hit], rank[hit], confidence[hit] = NOVEL, NOVEL, np.minimum(novel[hit], 1.0)
        pending &= ~hit
    call[pending], rank[pending] = UNASSIGNED, UNASSIGNED
    return pd.DataFrame({"call": call, "call_rank": rank, "call_prob": confidence})


def _call_rank(p, table: pd.DataFrame, rank_name: str, limit: float, pending: np.ndarray, out: tuple) -> None:
    """Call the pending rows whose best taxon at `rank_name` reaches `limit` (in place)."""
    idx = np.flatnonzero(pending)
    names, matrix = rank_index(table, rank_name, table.shape[0])
    # A rank at which the whole reference is one taxon (e.g. class in a fish-only reference) says what the reference
    # holds, not what the model saw: its sum is 1 (or 1 - "novel genus"), and calling it would leave nothing
    # unassigned.
    if idx.size == 0 or names.size <= 1:
        return
    sums = p[idx] @ matrix
    sums = sums.toarray() if sparse.issparse(sums) else np.asarray(sums)
    best = sums.argmax(axis=1)
    # Clip: summed float probabilities can exceed 1 by rounding and pass an unreachable threshold (1 + eps).
    best_sum = np.minimum(sums[np.arange(idx.size), best], 1.0)
    hit = best_sum >= limit
    call, rank, confidence = out
    call[idx[hit]], rank[idx[hit]], confidence[idx[hit]] = names[best[hit]], rank_name, best_sum[hit]
    pending[idx[hit]] = False


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
