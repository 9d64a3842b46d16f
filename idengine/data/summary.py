"""Step 4, account: what prepare read, kept, set aside and dropped, and the class balance, as one JSON-ready dict.

The counts add up: records_read == kept + set_aside_rare_species + sum(dropped.values()); `build_report` refuses to
return a report that does not. `report/markdown.py` and `report/plots.py` turn it into the page and the PNG.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from idengine import layout as C
from idengine.data.clean import REASON_ORDER

logger = logging.getLogger(__name__)

BUCKETS = (("1", 1, 1), ("2-4", 2, 4), ("5-19", 5, 19), ("20+", 20, None))
STEPS = (
    "load: read FASTA + labels (+ vectors, clusters), join by id; duplicate_id, no_label/no_vector/no_cluster",
    "normalise: upper-case, U->T, strip gaps and whitespace, IUPAC codes -> N",
    "drop: empty_sequence, invalid_characters, empty_species, too_short, too_long, too_many_n",
    "label conflicts: identical sequences under several species (policy keep/drop/majority)",
    "group: identical sequences, unioned with clusters",
    "species filter: species with fewer distinct groups than min_seqs_per_species set aside (unknown.parquet)",
    "split: held-out test split + K stratified grouped folds (or the user's fold file); a species too small for a "
    "test share stays in training, and K shrinks when no species has K distinct sequences (see warnings)",
)


def size_buckets(species: pd.Series) -> dict[str, int]:
    """Number of species with 1, 2-4, 5-19 and 20+ records."""
    sizes = species.value_counts()
    return {
        name: int(((sizes >= lo) & (sizes <= (hi if hi is not None else np.inf))).sum()) for name, lo, hi in BUCKETS
    }


def length_summary(sequences: pd.Series) -> dict[str, int]:
    """min, p5, median, p95, max of the sequence lengths in bp (zeros for no sequences)."""
    lengths = sequences.str.len().to_numpy()
    if not len(lengths):
        return {"min": 0, "p5": 0, "median": 0, "p95": 0, "max": 0}
    q = np.percentile(lengths, [0, 5, 50, 95, 100])
    return {k: int(round(v)) for k, v in zip(("min", "p5", "median", "p95", "max"), q)}


def _species_entries(
    loaded: pd.DataFrame, records: pd.DataFrame, unknown: pd.DataFrame, clean_counts: dict[str, Any]
) -> dict[str, Any]:
    """Species counts and size buckets before (as loaded) and after (kept), and the imbalance of the kept ones."""
    sizes = records[C.SPECIES].value_counts()
    return {
        "species_before": int(loaded[C.SPECIES].dropna().nunique()),
        "species_after_cleaning": int(clean_counts["species_after_cleaning"]),
        "species_after": int(records[C.SPECIES].nunique()),
        "species_set_aside": int(unknown[C.SPECIES].nunique()),
        "buckets_before": size_buckets(loaded[C.SPECIES].dropna()),
        "buckets_after": size_buckets(records[C.SPECIES]),
        "imbalance_ratio": float(sizes.max() / sizes.min()) if len(sizes) else 0.0,
        "records_per_species_after": {
            "min": int(sizes.min()) if len(sizes) else 0,
            "median": float(sizes.median()) if len(sizes) else 0.0,
            "max": int(sizes.max()) if len(sizes) else 0,
        },
    }


def build_report(
    load_counts: dict[str, Any],
    clean_counts: dict[str, Any],
    loaded: pd.DataFrame,
    records: pd.DataFrame,
    unknown: pd.DataFrame,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the flat prepare report.

    Args:
        load_counts: counts from `load_barcodes`.
        clean_counts: counts from `clean_barcodes`.
        loaded: the joined table before cleaning (for the "before" species and size buckets).
        records: the kept records with folds.
        unknown: the set-aside rare-species records.
        extra: entries added as they are (folds, fold_source, split, warnings, species_missing_from_training,
            settings ...).

    Returns:
        The report dict (JSON-serialisable).

    Raises:
        RuntimeError: the counts do not add up (a bug, never a user error).
    """
    dropped_counts = {**load_counts["dropped"], **clean_counts["dropped"]}
    dropped = {reason: int(dropped_counts.get(reason, 0)) for reason in REASON_ORDER}
    dropped.update({k: int(v) for k, v in dropped_counts.items() if k not in dropped})
    report: dict[str, Any] = {
        "records_read": int(load_counts["records_read"]),
        "kept": int(len(records)),
        "set_aside_rare_species": int(len(unknown)),
        "dropped_total": int(sum(dropped.values())),
        "dropped": dropped,
        "label_rows_read": int(load_counts["label_rows_read"]),
        "unmatched_rows": load_counts["unmatched_rows"],
        **_species_entries(loaded, records, unknown, clean_counts),
        "length_bp": length_summary(records[C.SEQUENCE]),
        "length_bp_set_aside": length_summary(unknown[C.SEQUENCE]),
        "label_conflicts": clean_counts["label_conflicts"],
        "distinct_sequences": int(clean_counts["distinct_sequences"]),
        "records_in_shared_sequences": int(clean_counts["records_in_shared_sequences"]),
        "groups_kept": int(records[C.GROUP].nunique()),
        "normalised": {**clean_counts["normalised"], **load_counts["normalised"]},
        "ranks": list(load_counts["ranks"]),
        "steps": list(STEPS),
        **extra,
    }
    accounted = report["kept"] + report["set_aside_rare_species"] + report["dropped_total"]
    if accounted != report["records_read"]:
        raise RuntimeError(f"bug: prepare counts do not add up: {accounted} accounted, {report['records_read']} read")
    return report
