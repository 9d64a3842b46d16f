"""Step 3, split: the label space, a held-out test split and K stratified, grouped cross-validation folds.

Folds are computed once here (or read from the user's fold file) and stored as the `fold` column of
records.parquet: `"0"` ... `"K-1"`, or `"test"`. Every later step only reads them.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from idengine import columns as C
from idengine.config import DataConfig
from idengine.data.load import InputError, describe_ids, read_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSpace:
    """The species the classifier predicts, label i <-> species, with their taxonomy ranks.

    Labels are the species sorted alphabetically, so the same kept species give the same labels.
    """

    species: tuple[str, ...]
    """Species name of each label."""
    ranks: tuple[str, ...] = ()
    """Rank columns known for the species, from the top down (a subset of columns.RANKS)."""
    taxonomy: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    """rank -> value of that rank for each label (None where unknown)."""
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "species", tuple(self.species))
        object.__setattr__(self, "ranks", tuple(self.ranks))
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.species)})
        if len(self._index) != len(self.species):
            raise ValueError("LabelSpace: duplicate species names")
        for rank in self.ranks:
            if len(self.taxonomy.get(rank, ())) != len(self.species):
                raise ValueError(f"LabelSpace: rank {rank!r} needs one value per species")

    @classmethod
    def from_records(cls, records: pd.DataFrame, ranks: tuple[str, ...] | list[str] = ()) -> LabelSpace:
        """Build the label space of the species in records; each rank takes its most frequent non-empty value.

        Args:
            records: table with `species` and the rank columns.
            ranks: rank columns to attach (those found in labels.csv).

        Returns:
            The LabelSpace (labels in alphabetical species order).
        """
        species = sorted(records[C.SPECIES].unique())
        taxonomy = {}
        for rank in ranks:
            known = records[[C.SPECIES, rank]].dropna()
            # most frequent value; ties go to the alphabetically first, so the choice is deterministic
            top = (
                known.groupby([C.SPECIES, rank]).size().rename("n").reset_index()
                .sort_values(["n", rank], ascending=[False, True]).drop_duplicates(C.SPECIES)
                .set_index(C.SPECIES)[rank]
            )  # fmt: skip
            taxonomy[rank] = tuple(top.get(s) for s in species)
        return cls(tuple(species), tuple(ranks), taxonomy)

    @property
    def num_classes(self) -> int:
        """Number of labels."""
        return len(self.species)

    def label_of(self, species: str) -> int:
        """The label of a species; KeyError for a species outside the label space."""
        return self._index[species]

    def species_of(self, label: int) -> str:
        """The species of a label."""
        return self.species[label]

    def taxonomy_table(self) -> pd.DataFrame:
        """DataFrame indexed by label (name `label`) with `species` and one column per rank."""
        table = pd.DataFrame({C.SPECIES: list(self.species), **{r: list(self.taxonomy[r]) for r in self.ranks}})
        table.index.name = C.LABEL
        return table

    def rank_names(self, rank: str) -> list[str]:
        """The distinct known values of a rank, sorted; position i is the id `rank_index` gives them."""
        self._check_rank(rank)
        return sorted({v for v in self.taxonomy[rank] if v is not None})

    def rank_index(self, rank: str) -> np.ndarray:
        """Map each label to an integer id of its value at `rank` (e.g. its genus), for rank fallback.

        Args:
            rank: one of `ranks`, or `species` (the identity).

        Returns:
            int64 array of length num_classes; -1 where the rank is unknown for that species, so a summed
            probability over a rank never pools species of unknown genus/family together.
        """
        if rank == C.SPECIES:
            return np.arange(self.num_classes, dtype=np.int64)
        ids = {name: i for i, name in enumerate(self.rank_names(rank))}
        return np.array([ids.get(v, -1) if v is not None else -1 for v in self.taxonomy[rank]], dtype=np.int64)

    def _check_rank(self, rank: str) -> None:
        if rank not in self.ranks:
            raise KeyError(f"rank {rank!r} is not in this label space (ranks: {list(self.ranks)})")

    def to_dict(self) -> dict[str, Any]:
        """The label_map.json content."""
        labels = [
            {C.LABEL: i, C.SPECIES: s, **{r: self.taxonomy[r][i] for r in self.ranks}}
            for i, s in enumerate(self.species)
        ]
        return {"ranks": list(self.ranks), "labels": labels}

    def to_json(self, path: str | Path) -> None:
        """Write label_map.json."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> LabelSpace:
        """Read a label_map.json written by `to_json`; labels must be 0..n-1."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = sorted(raw["labels"], key=lambda e: e["label"])
        if [e["label"] for e in entries] != list(range(len(entries))):
            raise ValueError(f"{path}: labels must be 0..n-1 without gaps")
        ranks = tuple(raw.get("ranks", ()))
        taxonomy = {r: tuple(e.get(r) for e in entries) for r in ranks}
        return cls(tuple(e[C.SPECIES] for e in entries), ranks, taxonomy)


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
