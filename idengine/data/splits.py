"""Step 3b, split: a held-out test split and K stratified, grouped cross-validation folds, and how a fold is read.

Folds are computed once here (or read from the user's fold file) and stored as the `fold` column of
records.parquet: `"0"` ... `"K-1"`, or `"test"`. Every later step only reads them, through `fold_rows` (the training
and validation rows of a fold) and `train_eval_sample` (the training rows scored for the train-vs-validation gap), so
every model kind is trained and judged on the same rows.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from idengine import layout as C
from idengine.config import DataConfig
from idengine.data.load import read_table
from idengine.errors import InputError, describe_ids

logger = logging.getLogger(__name__)


def _grouped_split(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Validation indices of each StratifiedGroupKFold split (shuffle=True, random_state=seed)."""
    if len(np.unique(groups)) < n_splits:
        raise InputError(
            f"only {len(np.unique(groups))} groups of identical sequences/clusters for {n_splits} splits; "
            "lower data.n_folds or data.test_fraction, or add data"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # species smaller than n_splits are expected (10 test splits, species with 5 sequences)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [test for _, test in splitter.split(np.zeros(len(y)), y, groups)]


def make_folds(records: pd.DataFrame, cfg: DataConfig) -> pd.Series:
    """Assign the held-out test split and K cross-validation folds, stratified by species and grouped.

    The test split is the first of round(1 / test_fraction) StratifiedGroupKFold splits (10 for the default
    0.1, so the test share is 1/round(1/test_fraction), not exactly test_fraction); test_fraction=0 gives no test
    split. The other records get `n_folds` StratifiedGroupKFold folds. Both use shuffle=True and
    random_state=cfg.seed, so the same seed gives the same folds. A group (identical sequence, or cluster) is
    never cut: it sits wholly in one fold or in the test split.

    Args:
        records: kept records with `label` and `group`.
        cfg: data settings (test_fraction, n_folds, seed).

    Returns:
        The fold of each record as a string ("0".."K-1" or "test"), aligned with records.

    Raises:
        InputError: fewer groups than splits.
    """
    y = records[C.LABEL].to_numpy()
    groups = records[C.GROUP].to_numpy()
    fold = np.full(len(records), "", dtype=object)
    rest = np.arange(len(records))
    if cfg.test_fraction > 0:
        test = _grouped_split(y, groups, max(2, round(1 / cfg.test_fraction)), cfg.seed)[0]
        fold[test] = C.TEST_FOLD
        rest = np.setdiff1d(rest, test)
    for k, val in enumerate(_grouped_split(y[rest], groups[rest], cfg.n_folds, cfg.seed)):
        fold[rest[val]] = str(k)
    return pd.Series(fold, index=records.index, name=C.FOLD)


def read_folds_file(path: str | Path, records: pd.DataFrame, n_folds: int) -> tuple[pd.Series, int]:
    """Read a user's fold assignment (`id,fold`) for the kept records and validate it.

    Args:
        path: CSV with `id` and `fold` (0..K-1 or `test`); ids of records that cleaning removed are ignored.
        records: kept records with `id` and `group`.
        n_folds: DataConfig.n_folds; the file must use exactly folds 0..n_folds-1.

    Returns:
        The fold of each record (aligned with records), and the number of file rows not among the kept records.

    Raises:
        InputError: no id/fold column, duplicate ids, a kept id without a fold, a fold value that is not
            0..n_folds-1 or `test`, or a group split across folds (naming the group and its ids).
    """
    table, _ = read_table(path, (C.ID, C.FOLD), "folds")
    dup = table[C.ID].duplicated(keep=False)
    if dup.any():
        raise InputError(f"{path}: duplicate ids for {describe_ids(table.loc[dup, C.ID])}; give each id one fold")
    allowed = {str(k) for k in range(n_folds)} | {C.TEST_FOLD}
    folds = table[C.FOLD].str.lower().where(table[C.FOLD].str.lower() == C.TEST_FOLD, table[C.FOLD])
    folds = folds.map(lambda v: str(int(float(v))) if _is_int(v) else v)
    bad = ~folds.isin(allowed)
    if bad.any():
        first = bad.to_numpy().nonzero()[0][0]
        raise InputError(
            f"{path}: fold {table[C.FOLD].iloc[first]!r} for id {table[C.ID].iloc[first]!r} is not one of "
            f"0..{n_folds - 1} or 'test' ({int(bad.sum())} such rows); fix the file or set data.n_folds"
        )
    assigned = records[C.ID].map(dict(zip(table[C.ID], folds)))
    missing = assigned.isna()
    if missing.any():
        raise InputError(
            f"{path}: no fold for {describe_ids(records.loc[missing, C.ID])} of the kept records; "
            "the fold file must cover every kept id"
        )
    absent = sorted(allowed - set(assigned) - {C.TEST_FOLD})
    if absent:
        raise InputError(f"{path}: no kept record is in fold(s) {absent}; every fold 0..{n_folds - 1} needs records")
    check_groups_within_folds(records.assign(**{C.FOLD: assigned}), source=str(path))
    return assigned.rename(C.FOLD), int((~table[C.ID].isin(records[C.ID])).sum())


def _is_int(value: str) -> bool:
    try:
        return float(value) == int(float(value))
    except ValueError:
        return False


def check_groups_within_folds(records: pd.DataFrame, source: str = "fold assignment") -> None:
    """Raise InputError when a group (identical sequence / cluster) has records in more than one fold.

    Args:
        records: table with `id`, `group` and `fold`.
        source: where the folds came from, for the message.
    """
    per_group = records.groupby(C.GROUP)[C.FOLD].nunique()
    split = per_group[per_group > 1]
    if len(split):
        group = split.index[0]
        rows = records[records[C.GROUP] == group]
        pairs = ", ".join(f"{i}->{f}" for i, f in zip(rows[C.ID][:8], rows[C.FOLD][:8]))
        raise InputError(
            f"{source}: {len(split)} group(s) of identical sequences/clusters are split across folds, e.g. "
            f"{group} ({pairs}); identical sequences leak between train and validation: put each group in one fold"
        )


def species_missing_from_training(records: pd.DataFrame) -> dict[str, int]:
    """For each CV fold, how many kept species have no record in that fold's training part (the other folds)."""
    cv = records[records[C.FOLD] != C.TEST_FOLD]
    all_species = set(records[C.SPECIES])
    return {
        str(k): len(all_species - set(cv.loc[cv[C.FOLD] != k, C.SPECIES]))
        for k in sorted(cv[C.FOLD].unique(), key=int)
    }


def cv_folds(folds: np.ndarray | pd.Series) -> list[str]:
    """The validation folds of a prepared table's fold column, in order ("0", "1", ...).

    Raises:
        ValueError: fewer than two folds.
    """
    names = sorted({str(f) for f in pd.unique(np.asarray(folds)) if f != C.TEST_FOLD}, key=int)
    if len(names) < 2:
        raise ValueError(f"need at least 2 cross-validation folds, found {names}; run `idengine prepare` again")
    return names


def fold_rows(folds: np.ndarray | pd.Series, fold: str) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of a fold's training part (every other fold, never the test split) and of its evaluation part.

    `fold` is a cv fold ("0" ... "K-1"), or `test` for the final model: trained on every non-test row, evaluated on
    the held-out test split.
    """
    folds = np.asarray(folds).astype(str)
    train = np.flatnonzero(folds != C.TEST_FOLD) if fold == C.TEST_FOLD else \
        np.flatnonzero((folds != fold) & (folds != C.TEST_FOLD))
    return train, np.flatnonzero(folds == fold)


def train_eval_sample(n_train: int, size: int, seed: int) -> np.ndarray:
    """Positions (sorted, within the training part) of the training rows scored for the train-vs-validation gap.

    One draw for every model kind, so their gaps compare: `size` rows without replacement, seeded.
    """
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=min(size, n_train), replace=False))
