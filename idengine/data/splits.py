"""Step 3b, split: a held-out test split and K stratified, grouped cross-validation folds, and how a fold is read.

Folds are computed once here (or read from the user's fold file) and stored as the `fold` column of
records.parquet: `"0"` ... `"K-1"`, or `"test"`. Every later step only reads them, through `fold_rows` (the training
and validation rows of a fold) and `train_eval_sample` (the training rows scored for the train-vs-validation gap), so
every model kind is trained and judged on the same rows. The split adapts to what a small reference allows, and says
so (`make_folds`): species too small for a test share stay in training, and the folds shrink to what the data fills.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idengine import layout as C
from idengine.config import DataConfig
from idengine.data.load import read_table
from idengine.errors import SHOW_FIRST, InputError, describe_ids

logger = logging.getLogger(__name__)

MIN_TRAINING_GROUPS = 2
"""Distinct sequences (groups) a species keeps outside the test split. With two, stratification puts them in two
folds, so the training part of every fold holds the species; a species that would keep fewer gives no test share."""
_CELLS_PER_BLOCK = 1 << 22
"""Cells of the dense group x class table built at a time (memory stays ~32 MB for any reference)."""


def stratified_group_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """The split (0 .. n_splits-1) of every row: scikit-learn's StratifiedGroupKFold(shuffle=True, random_state=seed).

    The same greedy algorithm (groups in order of decreasing spread of their class counts, equal ones in a seeded
    shuffled order; each goes to the split that keeps every class's share of the splits most even, a tie to the
    smallest split) with the same floating-point operations, so data that scikit-learn 1.9 accepts gets the same
    splits. Computed here because scikit-learn refuses a split where every class is smaller than n_splits, which is
    the normal case of a 10-way test split on a reference of 6-8 records per species (a class then simply misses
    some splits), and because its result depends on its version (before its 2025 fix, scikit-learn/scikit-learn#32540,
    shuffle=True shuffled the groups' class counts without the groups); here it depends on the seed alone.

    Args:
        y: class of each row.
        groups: group of each row; a group never straddles two splits.
        n_splits: number of splits (some stay empty when there are fewer groups).
        seed: seed of the shuffle of equal groups.

    Returns:
        int array aligned with y.
    """
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    _, g_inv = np.unique(groups, return_inverse=True)
    n_groups, n_classes = int(g_inv.max()) + 1, len(y_cnt)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    position = np.empty_like(perm)
    position[perm] = np.arange(n_groups)
    rows = position[g_inv.ravel()]  # each record's group, numbered in shuffled order
    cells, counts = np.unique(rows * n_classes + y_inv.ravel(), return_counts=True)
    cell_row, cell_class = cells // n_classes, cells % n_classes
    starts = np.searchsorted(cell_row, np.arange(n_groups + 1))
    order = np.argsort(-_row_spread(cell_row, cell_class, counts, n_groups, n_classes), kind="stable")
    fold_counts = np.zeros((n_splits, n_classes))
    spread = np.zeros(n_classes)  # std over the splits of each class's share, kept current
    sizes = np.zeros(n_splits)
    split_of_row = np.empty(n_groups, dtype=np.int64)
    for row in order:
        cls, cnt = cell_class[starts[row]:starts[row + 1]], counts[starts[row]:starts[row + 1]]
        best, best_spread = _best_split(fold_counts, spread, sizes, y_cnt, cls, cnt)
        fold_counts[best, cls] += cnt
        spread[cls] = best_spread
        sizes[best] += cnt.sum()
        split_of_row[row] = best
    return split_of_row[rows]


def _row_spread(cell_row: np.ndarray, cell_class: np.ndarray, counts: np.ndarray, n_rows: int,
                n_classes: int) -> np.ndarray:
    """np.std of each group's dense class-count row, computed a block of rows at a time (bit-identical per row)."""
    step = max(1, _CELLS_PER_BLOCK // n_classes)
    out = np.empty(n_rows)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        block = np.zeros((hi - lo, n_classes))
        inside = (cell_row >= lo) & (cell_row < hi)
        block[cell_row[inside] - lo, cell_class[inside]] = counts[inside]
        out[lo:hi] = np.std(block, axis=1)
    return out


def _best_split(fold_counts: np.ndarray, spread: np.ndarray, sizes: np.ndarray, y_cnt: np.ndarray,
                cls: np.ndarray, cnt: np.ndarray) -> tuple[int, np.ndarray]:
    """The split a group (classes cls, counts cnt) goes to, and its classes' new spread there.

    Every candidate split at once; the arrays are laid out so that numpy sums in the order scikit-learn's loop does
    (folds one after the other; classes pairwise), which keeps near-ties resolved the same way.
    """
    k, m = fold_counts.shape[0], len(cls)
    share = fold_counts[:, cls] / y_cnt[cls]
    trial = np.repeat(share[:, None, :], k, axis=1)  # [fold, candidate, class]
    trial[np.arange(k), np.arange(k)] = (fold_counts[:, cls] + cnt) / y_cnt[cls]
    candidate_spread = np.std(trial.reshape(k, k * m), axis=0).reshape(k, m)
    every_class = np.repeat(spread[None, :], k, axis=0)
    every_class[:, cls] = candidate_spread
    evals = np.mean(every_class, axis=1)
    best, best_eval, best_size = 0, np.inf, np.inf
    for i in range(k):
        close = abs(evals[i] - best_eval) <= 1e-8 + 1e-5 * abs(best_eval)  # np.isclose's default tolerance
        if evals[i] < best_eval or (close and sizes[i] < best_size):
            best, best_eval, best_size = i, evals[i], sizes[i]
    return best, candidate_spread[best]


def _short_of(records: pd.DataFrame, test: np.ndarray, need: int) -> list[str]:
    """The species with fewer than `need` groups outside the test rows, sorted."""
    outside = records[~test].groupby(C.SPECIES)[C.GROUP].nunique()
    every = outside.reindex(pd.unique(records[C.SPECIES]), fill_value=0)
    return sorted(every[every < need].index)


def _groups_of(records: pd.DataFrame, species: list[str]) -> np.ndarray:
    """Rows whose group holds a record of any of these species (a group moves whole)."""
    return records[C.GROUP].isin(records.loc[records[C.SPECIES].isin(species), C.GROUP]).to_numpy()


def _names(species: list[str]) -> str:
    more = f" and {len(species) - SHOW_FIRST} more" if len(species) > SHOW_FIRST else ""
    return ", ".join(repr(s) for s in species[:SHOW_FIRST]) + more


def _test_split(records: pd.DataFrame, cfg: DataConfig, notes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The test rows: split 1 of round(1/test_fraction) of the species that can give a test share and still keep
    MIN_TRAINING_GROUPS groups for the folds (first those with too few groups; then, for a large test_fraction,
    those the draw would leave short)."""
    test = np.zeros(len(records), dtype=bool)
    if cfg.test_fraction == 0:
        return test, {"test_splits": 0, "species_kept_out_of_test": []}
    n_splits = max(2, round(1 / cfg.test_fraction))
    small = _short_of(records, test, MIN_TRAINING_GROUPS + 1)
    able = ~_groups_of(records, small)
    if able.any():
        labels, groups = records[C.LABEL].to_numpy()[able], records[C.GROUP].to_numpy()[able]
        test[able] = stratified_group_folds(labels, groups, n_splits, cfg.seed) == 0
    in_test = set(records.loc[test, C.SPECIES])
    drawn_short = [s for s in _short_of(records, test, MIN_TRAINING_GROUPS) if s in in_test]
    test &= ~_groups_of(records, drawn_short)
    kept_out = sorted({*small, *drawn_short})
    if kept_out:
        notes.append(
            f"{len(kept_out)} species stay out of the test split (data.test_fraction={cfg.test_fraction}): a test "
            f"share would leave them fewer than {MIN_TRAINING_GROUPS} distinct sequences for the folds, so they are "
            f"cross-validated and trained on, not tested: {_names(kept_out)}"
        )
    if not test.any():
        notes.append(
            f"no test split: data.test_fraction={cfg.test_fraction}, but no species can give a test share and keep "
            f"{MIN_TRAINING_GROUPS} distinct sequences for the folds. `idengine cv` works; `idengine train` needs a "
            "test split: add sequences, or set data.test_fraction=0 to say that you only cross-validate"
        )
    return test, {"test_splits": n_splits, "species_kept_out_of_test": kept_out}


def _fold_count(cv: pd.DataFrame, cfg: DataConfig, notes: list[str]) -> int:
    """data.n_folds, or fewer when no species has as many distinct sequences (groups) outside the test split.

    Raises:
        InputError: no species has two groups outside the test split, so no fold can train on what it validates.
    """
    most = int(cv.groupby(C.SPECIES)[C.GROUP].nunique().max()) if len(cv) else 0
    where = " outside the test split" if cfg.test_fraction > 0 else ""
    if most < MIN_TRAINING_GROUPS:
        raise InputError(
            f"no species has {MIN_TRAINING_GROUPS} distinct sequences{where} (data.min_seqs_per_species="
            f"{cfg.min_seqs_per_species}): cross-validation trains each fold on species it validates elsewhere. "
            f"Set data.min_seqs_per_species={MIN_TRAINING_GROUPS} (or more) to set single-sequence species aside as "
            "open-set queries, and add sequences"
        )
    if most >= cfg.n_folds:
        return cfg.n_folds
    notes.append(
        f"{most} folds instead of data.n_folds={cfg.n_folds}: no species has more than {most} distinct sequences"
        f"{where}, so {cfg.n_folds} folds could not spread any species over all of them. Set data.n_folds={most} "
        "to choose this yourself, or add sequences"
    )
    return most


def make_folds(records: pd.DataFrame, cfg: DataConfig) -> tuple[pd.Series, dict[str, Any]]:
    """Assign the held-out test split and K cross-validation folds, stratified by species and grouped.

    The test split is the first of round(1 / test_fraction) stratified grouped splits (10 for the default 0.1, so
    the test share is 1/round(1/test_fraction), not exactly test_fraction); test_fraction=0 gives no test split.
    A species whose test share would leave it fewer than MIN_TRAINING_GROUPS groups gives none (it stays in
    training; listed in "species_kept_out_of_test"). The other records get n_folds stratified grouped folds, or as
    many as the largest species has groups when that is fewer (with a warning). Both splits are seeded with cfg.seed
    (`stratified_group_folds`), so the same seed gives the same folds. A group (identical sequence, or cluster) is
    never cut.

    Args:
        records: kept records with `species`, `label` and `group`.
        cfg: data settings (test_fraction, n_folds, seed).

    Returns:
        The fold of each record as a string ("0".."K-1" or "test"), aligned with records, and what was decided, for
        the report: {"test_splits", "species_kept_out_of_test", "n_folds", "warnings"}; every warning is logged.

    Raises:
        InputError: no species has two groups outside the test split.
    """
    notes: list[str] = []
    test, decided = _test_split(records, cfg, notes)
    rest = np.flatnonzero(~test)
    cv = records.iloc[rest]
    n_folds = _fold_count(cv, cfg, notes)
    fold = np.full(len(records), C.TEST_FOLD, dtype=object)
    split = stratified_group_folds(cv[C.LABEL].to_numpy(), cv[C.GROUP].to_numpy(), n_folds, cfg.seed)
    fold[rest] = split.astype(str)
    for note in notes:
        logger.warning("%s", note)
    decided.update(n_folds=n_folds, warnings=notes)
    return pd.Series(fold, index=records.index, name=C.FOLD), decided


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
    absent = sorted(allowed - set(assigned) - {C.TEST_FOLD}, key=int)
    if absent:
        used = n_folds - len(absent)
        fix = f"number the folds 0..{used - 1} and set data.n_folds={used}" if used >= 2 else "use at least 2 folds"
        raise InputError(
            f"{path}: no kept record is in fold(s) {', '.join(absent)} (data.n_folds={n_folds}); every fold "
            f"0..{n_folds - 1} needs kept records (a fold's ids may all have been dropped or set aside as rare "
            f"species): {fix}, or move records into them"
        )
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
