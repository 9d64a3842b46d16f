"""Step 2, clean: normalise bases, drop unusable records, resolve label conflicts, group, set rare species aside.

Order of the steps (each record is counted once, under the first reason that applies):
1. normalise: upper-case, U->T, gaps (`-`, `.`) and whitespace removed, IUPAC ambiguity codes -> N;
2. drop `empty_sequence` (a header with no sequence, or only gaps), `invalid_characters` (anything that is not a
   nucleotide, IUPAC code, gap or whitespace, e.g. a protein), `empty_species`, `too_short`, `too_long`, `too_many_n`.
   These records are DROPPED and listed by id in dropped.csv rather than stopping the run (a decision of the project:
   one bad record in 100,000 should not cost the user the run);
3. label conflicts (one cleaned sequence under several species): `keep`, `drop` all, or keep the `majority` species;
4. group: identical cleaned sequences, unioned with clusters.csv membership, form one group (they never straddle folds);
5. species with fewer than `min_seqs_per_species` distinct groups are set aside as open-set queries (`unknown`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from idengine import layout as C
from idengine.config import DataConfig

logger = logging.getLogger(__name__)

IUPAC_AMBIGUOUS = "RYSWKMBDHV"
"""IUPAC codes other than A, C, G, T/U and N; each becomes N (the NT tokenizer makes them <unk> otherwise)."""
GAPS = "-."
VALID = set("ACGTUN" + IUPAC_AMBIGUOUS)
_TO_DNA = str.maketrans({"U": "T", **{code: "N" for code in IUPAC_AMBIGUOUS}})
REASON_ORDER = (
    "duplicate_id", "no_label", "no_vector", "no_cluster",
    "empty_sequence", "invalid_characters", "empty_species", "too_short", "too_long", "too_many_n", "label_conflict",
)  # fmt: skip
"""Every drop reason, in the order the steps run (load's first, then this module's)."""


def normalise_sequence(raw: str) -> tuple[str, set[str], dict[str, bool]]:
    """Normalise one sequence to ACGTN.

    Args:
        raw: the sequence as read (wrapped lines already joined).

    Returns:
        The cleaned sequence, the set of invalid characters found (empty when valid), and flags saying which
        normalisations applied: lowercase, rna_u, gaps, whitespace, iupac.
    """
    stripped = "".join(raw.split())
    upper = stripped.upper()
    flags = {
        "lowercase": upper != stripped,
        "whitespace": len(stripped) != len(raw),
        "gaps": "-" in upper or "." in upper,
    }
    bases = upper.replace("-", "").replace(".", "")
    invalid = set(bases) - VALID
    flags["rna_u"] = "U" in bases
    flags["iupac"] = any(code in bases for code in IUPAC_AMBIGUOUS)
    return bases.translate(_TO_DNA), invalid, flags


def check_sequence(raw: str, cfg: DataConfig) -> tuple[str, str, str]:
    """Normalise one sequence and say whether a model can use it: the one rule for references and queries alike.

    Args:
        raw: the sequence as read.
        cfg: the thresholds (min_len_bp, max_len_bp, max_n_fraction); a query is held to those its model was
            trained with.

    Returns:
        (cleaned sequence, reason, detail); reason is "" for a usable sequence, else the first that applies of
        `empty_sequence`, `invalid_characters`, `too_short`, `too_long`, `too_many_n`.
    """
    seq, invalid, _flags = normalise_sequence(raw)
    if not seq and not invalid:
        return seq, "empty_sequence", "no bases after the header" if not raw.strip() else "only gaps/whitespace"
    if invalid:
        shown = "".join(sorted(invalid))[:20]
        return seq, "invalid_characters", f"not nucleotides/IUPAC/gaps: {shown!r} (first at position " \
                                          f"{_first_at(raw, invalid)}; a protein or a table given as sequences?)"
    if len(seq) < cfg.min_len_bp:
        return seq, "too_short", f"{len(seq)} bp < min_len_bp={cfg.min_len_bp}"
    if len(seq) > cfg.max_len_bp:
        return seq, "too_long", f"{len(seq)} bp > max_len_bp={cfg.max_len_bp}"
    n_fraction = seq.count("N") / len(seq)
    if n_fraction > cfg.max_n_fraction:
        return seq, "too_many_n", f"N fraction {n_fraction:.3f} > max_n_fraction={cfg.max_n_fraction}"
    return seq, "", ""


def _first_reason(raw: str, species: Any, cfg: DataConfig) -> tuple[str, tuple[str, str] | None]:
    """The cleaned sequence and the first drop reason of step 2 for one reference record (None: kept); an empty
    species comes after the two reasons that say the sequence is not one at all, as REASON_ORDER lists."""
    seq, reason, detail = check_sequence(raw, cfg)
    if reason in ("empty_sequence", "invalid_characters"):
        return seq, (reason, detail)
    if species is None or (isinstance(species, float) and np.isnan(species)) or not str(species).strip():
        return seq, ("empty_species", "species value is empty in labels.csv")
    return seq, ((reason, detail) if reason else None)


def _first_at(raw: str, invalid: set[str]) -> int:
    return next(i for i, ch in enumerate(raw.upper()) if ch in invalid) + 1


def drop_bad_records(table: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Steps 1-2: normalise every sequence and drop the records that cannot be used.

    Args:
        table: loaded records (id, sequence as read, species, ...).
        cfg: data settings (min_len_bp, max_len_bp, max_n_fraction).

    Returns:
        The kept records with cleaned sequences, the dropped ones (id, reason, detail), and the number of
        records each normalisation touched (lowercase, rna_u, gaps, whitespace, iupac).
    """
    normalised = {"lowercase": 0, "rna_u": 0, "gaps": 0, "whitespace": 0, "iupac": 0}
    cleaned, keep, dropped = [], [], []
    for rid, raw, species in zip(table[C.ID], table[C.SEQUENCE], table[C.SPECIES]):
        for key, applied in normalise_sequence(raw)[2].items():
            normalised[key] += int(applied)
        seq, reason = _first_reason(raw, species, cfg)
        keep.append(reason is None)
        cleaned.append(seq)
        if reason is not None:
            dropped.append((rid, *reason))
    out = table.assign(**{C.SEQUENCE: cleaned})[np.asarray(keep, dtype=bool)].reset_index(drop=True)
    return out, pd.DataFrame(dropped, columns=[C.ID, "reason", "detail"], dtype=object), normalised


def resolve_label_conflicts(table: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Step 3: find identical cleaned sequences labelled with different species and apply the policy.

    Args:
        table: cleaned records.
        policy: `keep` (report only), `drop` (every record of a conflicting sequence) or `majority` (keep the
            records of the species with most records of that sequence; on a tie there is no majority and all
            of them are dropped).

    Returns:
        Kept records, dropped records (reason `label_conflict`), and counts {sequences, records, policy, dropped}.
    """
    n_species = table.groupby(C.SEQUENCE)[C.SPECIES].transform("nunique")
    conflict = (n_species > 1).to_numpy()
    counts: dict[str, Any] = {
        "sequences": int(table.loc[conflict, C.SEQUENCE].nunique()),
        "records": int(conflict.sum()),
        "policy": policy,
        "dropped": 0,
    }
    if policy == "keep" or not conflict.any():
        return table, _no_rows(), counts
    sub = table[conflict]
    per_species = sub.groupby([C.SEQUENCE, C.SPECIES]).size().rename("n").reset_index()
    top = per_species.groupby(C.SEQUENCE)["n"].transform("max")
    winners = per_species[per_species["n"] == top]
    unique_winner = winners.groupby(C.SEQUENCE)[C.SPECIES].transform("size") == 1
    majority = dict(zip(winners.loc[unique_winner, C.SEQUENCE], winners.loc[unique_winner, C.SPECIES]))
    labelled = sub.groupby(C.SEQUENCE)[C.SPECIES].agg(lambda s: ", ".join(sorted(set(s))))
    if policy == "drop":
        lose = np.ones(len(sub), dtype=bool)
    else:
        lose = (sub[C.SEQUENCE].map(majority) != sub[C.SPECIES]).to_numpy()
    losers = sub[lose]
    details = [
        f"sequence labelled {labelled[seq]}; " + (f"majority is {majority[seq]}" if seq in majority else "no majority")
        for seq in losers[C.SEQUENCE]
    ]
    dropped = pd.DataFrame({C.ID: losers[C.ID], "reason": "label_conflict", "detail": details}, dtype=object)
    counts["dropped"] = int(len(dropped))
    keep = np.ones(len(table), dtype=bool)
    keep[np.flatnonzero(conflict)[lose]] = False
    return table[keep].reset_index(drop=True), dropped.reset_index(drop=True), counts


def assign_groups(table: pd.DataFrame) -> pd.Series:
    """Step 4: the group of each record: identical sequences, unioned with cluster membership (union-find).

    Records that share a sequence or a cluster (transitively) form one group, named `g000000`, `g000001`, ... in
    order of first appearance, so the names are deterministic for a given input.

    Args:
        table: cleaned records; a `cluster` column is used when present.

    Returns:
        A string Series aligned with table.
    """
    seq_codes, seq_uniques = pd.factorize(table[C.SEQUENCE])
    n_nodes = len(seq_uniques)
    if C.CLUSTER in table.columns:
        cluster_codes, cluster_uniques = pd.factorize(table[C.CLUSTER].astype(str))
        edges = coo_matrix(
            (np.ones(len(table)), (seq_codes, cluster_codes + n_nodes)), shape=(n_nodes + len(cluster_uniques),) * 2
        )
        _, component = connected_components(edges, directed=False)
        component = component[:n_nodes]
    else:
        component = np.arange(n_nodes)
    # renumber components by first appearance so names follow the input order
    per_record = component[seq_codes]
    renumbered, _ = pd.factorize(per_record)
    return pd.Series([f"g{g:06d}" for g in renumbered], index=table.index, dtype=object)


def filter_rare_species(table: pd.DataFrame, min_distinct: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Step 5: set aside species with fewer than min_distinct distinct groups.

    Distinct groups equal distinct cleaned sequences when no clusters.csv is given. Records would count the
    same sequence twice, yet grouped folds keep one sequence in one fold, so a species with 5 identical records
    could not appear in the training part of every fold. With clusters, a whole cluster is likewise one unit.

    Args:
        table: cleaned records with a `group` column.
        min_distinct: the minimum (DataConfig.min_seqs_per_species).

    Returns:
        Kept records, set-aside records (open-set queries), and the distinct groups per species (all species).
    """
    distinct = table.groupby(C.SPECIES)[C.GROUP].nunique()
    common = table[C.SPECIES].map(distinct) >= min_distinct
    return table[common].reset_index(drop=True), table[~common].reset_index(drop=True), distinct


def clean_barcodes(
    table: pd.DataFrame, cfg: DataConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run steps 1-5 on loaded records.

    Args:
        table: the output of `load_barcodes`.
        cfg: data settings.

    Returns:
        kept records (with `group`), set-aside rare-species records (with `group`), dropped records
        (id, reason, detail) and counts {normalised, dropped {reason: n}, label_conflicts, distinct_sequences,
        records_in_shared_sequences, species_after_cleaning, distinct_per_species (Series of distinct groups)}.
    """
    good, bad, normalised = drop_bad_records(table, cfg)
    resolved, conflicted, conflict_counts = resolve_label_conflicts(good, cfg.label_conflicts)
    resolved = resolved.assign(**{C.GROUP: assign_groups(resolved)})
    kept, rare, distinct = filter_rare_species(resolved, cfg.min_seqs_per_species)
    dropped = pd.concat([bad, conflicted], ignore_index=True)
    shared = resolved.duplicated(C.SEQUENCE, keep=False)
    counts = {
        "normalised": normalised,
        "dropped": {str(k): int(v) for k, v in dropped["reason"].value_counts().items()},
        "label_conflicts": conflict_counts,
        "distinct_sequences": int(resolved[C.SEQUENCE].nunique()),
        "records_in_shared_sequences": int(shared.sum()),
        "species_after_cleaning": int(resolved[C.SPECIES].nunique()),
        "distinct_per_species": distinct,
    }
    logger.info(
        "cleaned %d records: %d kept, %d set aside (rare species), %d dropped",
        len(table), len(kept), len(rare), len(dropped),
    )
    return kept, rare, dropped, counts


def _no_rows() -> pd.DataFrame:
    return pd.DataFrame({C.ID: [], "reason": [], "detail": []}, dtype=object)
