"""Step 4, report: what prepare read, kept, set aside and dropped, as JSON, Markdown and a class-size PNG.

The counts add up: records_read == kept + set_aside_rare_species + sum(dropped.values()).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idengine import columns as C
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
    "split: held-out test split + K stratified grouped folds (or the user's fold file)",
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
        extra: entries added as they are (folds, fold_source, species_missing_from_training, settings ...).

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


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the accounting first, then species, lengths, conflicts and folds."""
    r = report
    lines = [
        "# Prepare report",
        "",
        f"{r['records_read']} records read = {r['kept']} kept + {r['set_aside_rare_species']} set aside "
        f"(rare species, unknown.parquet) + {r['dropped_total']} dropped (dropped.csv).",
        "",
        "## Dropped, by reason (in step order)",
        "",
        *_table([(k, v) for k, v in r["dropped"].items()], ("reason", "records")),
        "",
        "## Species",
        "",
        f"Species before: {r['species_before']}; after cleaning: {r['species_after_cleaning']}; "
        f"kept: {r['species_after']}; set aside: {r['species_set_aside']}. "
        f"Imbalance (max/min records per kept species): {r['imbalance_ratio']:.1f}.",
        "",
        *_table(
            [(b, r["buckets_before"][b], r["buckets_after"][b]) for b in r["buckets_before"]],
            ("records per species", "species before", "species kept"),
        ),
        "",
        "## Sequences",
        "",
        *_table([(k, v) for k, v in r["length_bp"].items()], ("kept length (bp)", "value")),
        "",
        f"Label conflicts (identical sequences under several species): {r['label_conflicts']['sequences']} sequences, "
        f"{r['label_conflicts']['records']} records; policy `{r['label_conflicts']['policy']}` dropped "
        f"{r['label_conflicts']['dropped']}. Records sharing their sequence with another: "
        f"{r['records_in_shared_sequences']}; kept groups: {r['groups_kept']}.",
        "",
        *_table([(k, v) for k, v in r["normalised"].items()], ("normalisation", "records (files for gzip/bom/crlf)")),
        "",
        "## Folds",
        "",
        f"Source: {r.get('fold_source', '')}",
        "",
        *_table([(k, v) for k, v in r.get("folds", {}).items()], ("fold", "records")),
        "",
        "Species absent from the training part of a fold: "
        + ", ".join(f"fold {k}: {v}" for k, v in r.get("species_missing_from_training", {}).items()),
        "",
        "## Steps",
        "",
        *[f"{i}. {step}" for i, step in enumerate(r["steps"], start=1)],
        "",
    ]
    return "\n".join(lines)


def plot_class_sizes(loaded: pd.DataFrame, records: pd.DataFrame, path: str | Path) -> None:
    """PNG: species per records-per-species bucket (before and kept), and the kept species' sizes in rank order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = size_buckets(loaded[C.SPECIES].dropna())
    after = size_buckets(records[C.SPECIES])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(before))
    left.bar(x - 0.2, list(before.values()), width=0.4, label="before")
    left.bar(x + 0.2, list(after.values()), width=0.4, label="kept")
    left.set_xticks(x, list(before))
    left.set_xlabel("records per species")
    left.set_ylabel("species")
    left.legend()
    sizes = records[C.SPECIES].value_counts().to_numpy()
    right.plot(np.arange(1, len(sizes) + 1), sizes, marker="." if len(sizes) < 100 else None)
    right.set_yscale("log")
    right.set_xlabel("kept species, largest first")
    right.set_ylabel("records")
    fig.suptitle(f"Class sizes: {len(sizes)} species kept, {int(sizes.sum()) if len(sizes) else 0} records")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], loaded: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> None:
    """Write prepare_report.json, prepare_report.md and class_sizes.png into out_dir."""
    out_dir = Path(out_dir)
    (out_dir / C.REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / C.REPORT_MD).write_text(report_markdown(report), encoding="utf-8")
    plot_class_sizes(loaded, records, out_dir / C.CLASS_SIZES_PNG)
