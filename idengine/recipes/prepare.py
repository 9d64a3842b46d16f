"""Recipe `idengine prepare`: load -> clean -> label space -> folds -> accounting, written as a prepared directory.

1. load: the FASTA and the CSVs, joined by id (`data/load.py`, `data/fasta.py`);
2. clean: normalise, drop, resolve conflicts, group, set rare species aside (`data/clean.py`);
3. label space and folds (`data/labels.py`, `data/splits.py`), computed once here and only read afterwards;
4. the accounting report (`data/summary.py`), its Markdown and the class-size plot (`report/`);
5. everything is written in a staging directory that replaces the output only when complete (`storage.building`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from idengine import layout as C
from idengine.config import Config
from idengine.config_io import save_config
from idengine.data.clean import clean_barcodes
from idengine.data.labels import LabelSpace
from idengine.data.load import load_barcodes
from idengine.data.prepared import check_replaceable, output_columns, write_prepared
from idengine.data.splits import check_groups_within_folds, make_folds, read_folds_file, species_missing_from_training
from idengine.data.summary import build_report
from idengine.errors import InputError
from idengine.report.markdown import prepare_markdown
from idengine.report.plots import class_balance_figure, save_png
from idengine.storage import building, write_text

logger = logging.getLogger(__name__)


def _assign_folds(records: pd.DataFrame, config: Config) -> tuple[pd.Series, dict[str, Any]]:
    """The fold column, computed or read from data.folds_file, with what the report says about how it was made."""
    cfg = config.data
    if cfg.folds_file:
        folds, ignored = read_folds_file(cfg.folds_file, records, cfg.n_folds)
        return folds, {"fold_source": f"file {cfg.folds_file}", "folds_file_rows_not_kept": ignored,
                       "split": {"n_folds_requested": cfg.n_folds, "n_folds": cfg.n_folds}, "warnings": []}
    folds, decided = make_folds(records, cfg)
    n_test = decided["test_splits"]
    test = f"test = split 1 of {n_test} (data.test_fraction={cfg.test_fraction}), " if n_test else "no test split, "
    source = f"computed: stratified grouped splits, {test}{decided['n_folds']} folds, seed {cfg.seed}"
    split = {
        "test_fraction": cfg.test_fraction,
        "test_splits": n_test,
        "species_kept_out_of_test": decided["species_kept_out_of_test"],
        "n_folds_requested": cfg.n_folds,
        "n_folds": decided["n_folds"],
    }
    return folds, {"fold_source": source, "split": split, "warnings": decided["warnings"]}


def _split_counts(records: pd.DataFrame) -> dict[str, Any]:
    """Records per fold, and species with records in the test split / in every validation fold."""
    sizes = records[C.FOLD].value_counts()
    order = sorted((f for f in sizes.index if f != C.TEST_FOLD), key=int) + [C.TEST_FOLD]
    cv = records[records[C.FOLD] != C.TEST_FOLD]
    n_cv_folds = cv[C.FOLD].nunique()
    return {
        "folds": {f: int(sizes.get(f, 0)) for f in order},
        "species_in_test": int(records.loc[records[C.FOLD] == C.TEST_FOLD, C.SPECIES].nunique()),
        "species_in_every_fold": int((cv.groupby(C.SPECIES)[C.FOLD].nunique() == n_cv_folds).sum()),
        "species_missing_from_training": species_missing_from_training(records),
    }


def _check_species(records: pd.DataFrame, config: Config, counts: dict[str, Any]) -> None:
    """InputError when fewer than 2 species are left, naming the data.min_seqs_per_species that keeps 2."""
    n_species = records[C.SPECIES].nunique()
    if n_species >= 2:
        return
    cfg = config.data
    distinct = counts["distinct_per_species"].sort_values(ascending=False)
    if len(distinct) >= 2:
        value = int(distinct.iloc[1])
        fix = (f"Set data.min_seqs_per_species={value} (keeps {int((distinct >= value).sum())} species) or add "
               "data")
    else:
        fix = "Add records of other species"
    raise InputError(
        f"{cfg.labels}: only {n_species} species left after cleaning and the species filter "
        f"({counts['species_after_cleaning']} after cleaning; data.min_seqs_per_species="
        f"{cfg.min_seqs_per_species} distinct sequences); a classifier needs at least 2. {fix}"
    )


def build_prepared(config: Config) -> dict[str, Any]:
    """Run load, clean, label space, folds and report in memory (nothing is written).

    Args:
        config: the full config; only `config.data` is used.

    Returns:
        {"records", "unknown", "dropped" (DataFrames), "labels" (LabelSpace), "report" (dict), "loaded" (DataFrame)}.
        The report's "split" and "warnings" say how the splits adapted to the data (see `data.splits.make_folds`).

    Raises:
        InputError: rejected input, fewer than 2 species left, or no species that cross-validation can train on.
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
    extra = {
        **fold_info,
        **_split_counts(kept),
        "settings": {k: v for k, v in vars(cfg).items()},
        "elapsed_s": 0.0,
    }
    dropped = pd.concat([load_counts["dropped_rows"], cleaned_out], ignore_index=True)
    report = build_report(load_counts, clean_counts, loaded, kept, unknown, extra)
    report["elapsed_s"] = round(time.perf_counter() - start, 2)
    return {
        "records": kept[output_columns(kept, ranks, True)],
        "unknown": unknown[output_columns(unknown, ranks, False)],
        "dropped": dropped,
        "labels": labels,
        "report": report,
        "loaded": loaded,
    }


def prepare_dataset(config: Config, out_dir: str | Path) -> Path:
    """Prepare the data once: cleaned records with folds, rare species, dropped ids, label map, report, config.

    Everything is written to a staging sibling directory, which replaces out_dir (atomically, by rename) only
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
    check_replaceable(out_dir)
    built = build_prepared(config)
    r = built["report"]
    with building(out_dir) as tmp:
        write_prepared(tmp, built)
        save_config(config, tmp / C.CONFIG_FILE)
        write_text(tmp / C.REPORT_MD, prepare_markdown(r))
        sizes = built["records"][C.SPECIES].value_counts().to_numpy()
        save_png(class_balance_figure(sizes, r["buckets_before"], r["buckets_after"]), tmp / C.CLASS_SIZES_PNG)
    logger.info(
        "prepared %s: %d records read, %d kept (%d species), %d set aside, %d dropped",
        out_dir, r["records_read"], r["kept"], r["species_after"], r["set_aside_rare_species"], r["dropped_total"],
    )
    return out_dir
