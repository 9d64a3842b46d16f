"""Step 5, prepare: load -> clean -> label space -> folds -> report, written atomically as a prepared directory.

The directory (see ARCHITECTURE.md) is built in a temporary sibling and renamed into place only when complete,
so no output directory ever looks complete when it is not. `read_prepared` is how every later step reads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from idengine import columns as C
from idengine.config import Config, save_config
from idengine.data.clean import clean_barcodes
from idengine.data.load import InputError, load_barcodes
from idengine.data.report import build_report, write_report
from idengine.data.splits import (
    LabelSpace,
    check_groups_within_folds,
    make_folds,
    read_folds_file,
    species_missing_from_training,
)

logger = logging.getLogger(__name__)

COMPLETE_MARKERS = (C.RECORDS_FILE, C.REPORT_JSON)
"""A directory holding these was written by prepare; only such a directory (or an empty one) is replaced."""


def _output_columns(table: pd.DataFrame, ranks: list[str], with_label: bool) -> list[str]:
    head = [C.ID, C.SEQUENCE, C.SPECIES, *ranks]
    head += [C.LABEL, C.GROUP, C.FOLD] if with_label else [C.GROUP]
    if C.CLUSTER in table.columns:
        head.append(C.CLUSTER)
    return head + sorted(c for c in table.columns if c.startswith(C.VECTOR_PREFIX))


def _write_parquet(table: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Write with an explicit schema, so an all-empty rank column is still a string column."""
    types = {C.LABEL: pa.int64()}
    fields = [
        pa.field(c, types.get(c, pa.float64() if c.startswith(C.VECTOR_PREFIX) else pa.string())) for c in columns
    ]
    frame = table[columns].astype({c: object for c in columns if c != C.LABEL and not c.startswith(C.VECTOR_PREFIX)})
    pq.write_table(pa.Table.from_pandas(frame, schema=pa.schema(fields), preserve_index=False), path)


def _assign_folds(records: pd.DataFrame, config: Config) -> tuple[pd.Series, dict[str, Any]]:
    """The fold column, computed or read from data.folds_file, with what the report says about its source."""
    cfg = config.data
    if cfg.folds_file:
        folds, ignored = read_folds_file(cfg.folds_file, records, cfg.n_folds)
        return folds, {"fold_source": f"file {cfg.folds_file}", "folds_file_rows_not_kept": ignored}
    folds = make_folds(records, cfg)
    test = f"test = 1 of round(1/{cfg.test_fraction}) splits, " if cfg.test_fraction > 0 else "no test split, "
    return folds, {"fold_source": f"computed: StratifiedGroupKFold, {test}{cfg.n_folds} folds, seed {cfg.seed}"}


def _check_species(records: pd.DataFrame, config: Config, counts: dict[str, Any]) -> None:
    n_species = records[C.SPECIES].nunique()
    if n_species < 2:
        raise InputError(
            f"{config.data.labels}: only {n_species} species left after cleaning and the species filter "
            f"({counts['species_after_cleaning']} after cleaning; data.min_seqs_per_species="
            f"{config.data.min_seqs_per_species} distinct sequences); a classifier needs at least 2. "
            "Add data or lower data.min_seqs_per_species"
        )


def build_prepared(config: Config) -> dict[str, Any]:
    """Run load, clean, label space, folds and report in memory (nothing is written).

    Args:
        config: the full config; only `config.data` is used.

    Returns:
        {"records", "unknown", "dropped" (DataFrames), "labels" (LabelSpace), "report" (dict), "loaded" (DataFrame)}.

    Raises:
        InputError: rejected input, or fewer than 2 species left.
    """
    start = time.perf_counter()
    cfg = config.data
    loaded, load_counts = load_barcodes(cfg)
    kept, unknown, cleaned_out, clean_counts = clean_barcodes(loaded, cfg)
    _check_species(kept, config, clean_counts)
    ranks = list(load_counts["ranks"])
    labels = LabelSpace.from_records(kept, ranks)
    kept[C.LABEL] = kept[C.SPECIES].map(labels.label_of).astype("int64")
    folds, fold_info = _assign_folds(kept, config)
    kept[C.FOLD] = folds.to_numpy()
    check_groups_within_folds(kept, source="computed folds")
    fold_sizes = kept[C.FOLD].value_counts()
    order = sorted((f for f in fold_sizes.index if f != C.TEST_FOLD), key=int) + [C.TEST_FOLD]
    extra = {
        **fold_info,
        "folds": {f: int(fold_sizes.get(f, 0)) for f in order},
        "species_missing_from_training": species_missing_from_training(kept),
        "settings": {k: v for k, v in vars(cfg).items()},
        "elapsed_s": 0.0,
    }
    dropped = pd.concat([load_counts["dropped_rows"], cleaned_out], ignore_index=True)
    report = build_report(load_counts, clean_counts, loaded, kept, unknown, extra)
    report["elapsed_s"] = round(time.perf_counter() - start, 2)
    return {
        "records": kept[_output_columns(kept, ranks, True)],
        "unknown": unknown[_output_columns(unknown, ranks, False)],
        "dropped": dropped,
        "labels": labels,
        "report": report,
        "loaded": loaded,
    }


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory; choose another output directory")
    if any(out_dir.iterdir()) and not all((out_dir / m).exists() for m in COMPLETE_MARKERS):
        raise InputError(
            f"{out_dir}: exists, is not empty and is not a prepared directory; refusing to replace it. "
            "Choose another output directory or remove it"
        )


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory into place; an existing one is moved aside first and removed after."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(config: Config, out_dir: str | Path) -> Path:
    """Prepare the data once: cleaned records with folds, rare species, dropped ids, label map, report, config.

    Everything is written to a temporary sibling directory, which replaces out_dir (atomically, by rename) only
    when complete. An existing out_dir is replaced only if it is empty or a previous prepared directory.

    Args:
        config: the full config (`config.data` drives the work; all of it is saved as config.yaml).
        out_dir: the prepared directory to create or replace.

    Returns:
        The prepared directory.

    Raises:
        InputError: rejected input (see `load`, `clean`, `splits`) or an out_dir that must not be replaced.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    built = build_prepared(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_parquet(built["records"], list(built["records"].columns), tmp / C.RECORDS_FILE)
        _write_parquet(built["unknown"], list(built["unknown"].columns), tmp / C.UNKNOWN_FILE)
        built["dropped"].to_csv(tmp / C.DROPPED_FILE, index=False)
        built["labels"].to_json(tmp / C.LABEL_MAP_FILE)
        save_config(config, tmp / C.CONFIG_FILE)
        write_report(built["report"], built["loaded"], built["records"], tmp)
        _swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    r = built["report"]
    logger.info(
        "prepared %s: %d records read, %d kept (%d species), %d set aside, %d dropped",
        out_dir, r["records_read"], r["kept"], r["species_after"], r["set_aside_rare_species"], r["dropped_total"],
    )
    return out_dir


def read_prepared(prepared_dir: str | Path) -> tuple[pd.DataFrame, LabelSpace]:
    """Read a prepared directory: the kept records (with `label` and `fold`) and the label space.

    Args:
        prepared_dir: a directory written by `prepare_dataset`.

    Returns:
        records (fold as str, label as int64) and the LabelSpace.

    Raises:
        FileNotFoundError: not a (complete) prepared directory.
        ValueError: records and label map disagree.
    """
    prepared_dir = Path(prepared_dir)
    missing = [m for m in (*COMPLETE_MARKERS, C.LABEL_MAP_FILE) if not (prepared_dir / m).exists()]
    if missing:
        raise FileNotFoundError(f"{prepared_dir}: not a prepared directory (missing {missing}); run `idengine prepare`")
    records = pd.read_parquet(prepared_dir / C.RECORDS_FILE)
    labels = LabelSpace.from_json(prepared_dir / C.LABEL_MAP_FILE)
    records[C.FOLD] = records[C.FOLD].astype(str)
    records[C.LABEL] = records[C.LABEL].astype("int64")
    expected = records[C.SPECIES].map(labels.label_of)
    if not (expected == records[C.LABEL]).all():
        raise ValueError(f"{prepared_dir}: records.parquet labels disagree with label_map.json; run prepare again")
    return records, labels


def read_unknown(prepared_dir: str | Path) -> pd.DataFrame:
    """The set-aside records of rare species (open-set queries) of a prepared directory."""
    return pd.read_parquet(Path(prepared_dir) / C.UNKNOWN_FILE)
