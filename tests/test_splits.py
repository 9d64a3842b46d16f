"""Step 3, split: LabelSpace, and folds that are grouped, stratified, seeded and validated when user-supplied."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idengine import layout as C
from idengine.config import DataConfig
from idengine.data.clean import clean_barcodes
from idengine.data.load import load_barcodes
from idengine.errors import InputError
from idengine.data.labels import LabelSpace
from idengine.data.splits import make_folds, read_folds_file, species_missing_from_training, stratified_group_folds

DATA = Path(__file__).parent / "data"
CFG = DataConfig(sequences=str(DATA / "12s_sample.fasta.gz"), labels=str(DATA / "12s_sample_labels.csv"))


def kept_records(cfg: DataConfig = CFG, clusters: pd.DataFrame | None = None) -> tuple[pd.DataFrame, LabelSpace]:
    loaded, counts = load_barcodes(cfg)
    if clusters is not None:
        loaded = loaded.merge(clusters, on=C.ID)
    kept, _, _, _ = clean_barcodes(loaded, cfg)
    labels = LabelSpace.from_records(kept, counts["ranks"])
    return kept.assign(**{C.LABEL: kept[C.SPECIES].map(labels.label_of)}), labels


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    kept, _ = kept_records()
    folds, decided = make_folds(kept, CFG)
    assert decided == {"test_splits": 10, "species_kept_out_of_test": [], "n_folds": 5, "warnings": []}
    return kept.assign(**{C.FOLD: folds.to_numpy()})


def test_label_space_round_trip_and_ranks(tmp_path):
    kept, labels = kept_records()
    assert labels.num_classes == 20 and list(labels.species) == sorted(kept[C.SPECIES].unique())
    assert labels.ranks == C.RANKS
    path = tmp_path / "label_map.json"
    labels.to_json(path)
    again = LabelSpace.from_json(path)
    assert again == labels and again.label_of("Thryssa setirostris") == labels.species.index("Thryssa setirostris")
    table = labels.taxonomy_table()
    assert table.index.name == C.LABEL and list(table.columns) == [C.SPECIES, *C.RANKS]
    genus = labels.rank_index("genus")
    names = labels.rank_names("genus")
    for label, species in enumerate(labels.species):
        assert names[genus[label]] == species.split()[0]  # binomials: the genus is the first word
    assert len(set(genus)) == len(names) == 8 and (labels.rank_index(C.SPECIES) == np.arange(20)).all()
    with pytest.raises(KeyError):
        labels.rank_index("tribe")


def test_label_space_takes_the_most_frequent_rank_and_marks_unknown():
    kept, _ = kept_records()
    first = kept[C.SPECIES].iloc[0]
    rows = kept.index[kept[C.SPECIES] == first]
    kept.loc[rows[:1], "family"] = "Wrongidae"  # one stray row does not win
    kept.loc[rows, "order"] = None
    labels = LabelSpace.from_records(kept, C.RANKS)
    label = labels.label_of(first)
    assert labels.taxonomy["family"][label] != "Wrongidae" and labels.taxonomy["order"][label] is None
    assert labels.rank_index("order")[label] == -1 and "Wrongidae" not in labels.rank_names("family")


def test_no_group_crosses_folds_or_test(records):
    assert (records.groupby(C.GROUP)[C.FOLD].nunique() == 1).all()
    assert (records.groupby(C.SEQUENCE)[C.FOLD].nunique() == 1).all()
    assert set(records[C.FOLD]) == {"0", "1", "2", "3", "4", C.TEST_FOLD}


def test_folds_are_stratified(records):
    cv = records[records[C.FOLD] != C.TEST_FOLD]
    per_fold = pd.crosstab(cv[C.SPECIES], cv[C.FOLD])
    # every kept species is in every validation fold, so in every training part too
    assert (per_fold > 0).all().all() and species_missing_from_training(records) == {str(k): 0 for k in range(5)}
    assert (per_fold.max(axis=1) - per_fold.min(axis=1)).max() <= 1
    test = records[C.FOLD] == C.TEST_FOLD
    assert 0.05 <= test.mean() <= 0.15
    assert records[test].groupby(C.SPECIES).size().max() == 1  # a 10% test split takes at most one per species


def test_same_seed_same_folds_other_seed_other_folds(records):
    kept = records.drop(columns=C.FOLD)
    again = make_folds(kept, CFG)[0].to_numpy()
    assert (again == records[C.FOLD].to_numpy()).all()
    other = make_folds(kept, dataclasses.replace(CFG, seed=1))[0].to_numpy()
    assert (other != records[C.FOLD].to_numpy()).mean() > 0.5


def test_no_test_split_when_fraction_is_zero(records):
    folds, decided = make_folds(records.drop(columns=C.FOLD), dataclasses.replace(CFG, test_fraction=0.0, n_folds=3))
    assert set(folds) == {"0", "1", "2"} and decided["test_splits"] == 0


def test_clusters_never_cross_folds():
    loaded, _ = load_barcodes(CFG)
    # clusters of two consecutive records: links records of different species and sequences
    clusters = pd.DataFrame({C.ID: loaded[C.ID], C.CLUSTER: [f"c{i // 2}" for i in range(len(loaded))]})
    kept, _ = kept_records(clusters=clusters)
    assert kept[C.GROUP].nunique() < kept[C.SEQUENCE].nunique()
    kept[C.FOLD] = make_folds(kept, CFG)[0].to_numpy()
    assert (kept.groupby(C.CLUSTER)[C.FOLD].nunique() == 1).all()
    assert (kept.groupby(C.SEQUENCE)[C.FOLD].nunique() == 1).all()


def test_fewer_folds_when_no_species_fills_them(records):
    one = records[records[C.SPECIES] == records[C.SPECIES].iloc[0]].drop(columns=C.FOLD)
    most = one[C.GROUP].nunique()
    folds, decided = make_folds(one, dataclasses.replace(CFG, n_folds=10, test_fraction=0.0))
    assert set(folds) == {str(k) for k in range(most)} and decided["n_folds"] == most < 10
    (warning,) = decided["warnings"]
    assert "data.n_folds=10" in warning and f"data.n_folds={most}" in warning


def test_single_sequence_species_are_an_input_error(records):
    singles = records.drop_duplicates(C.SPECIES).drop(columns=C.FOLD)
    with pytest.raises(InputError, match="data.min_seqs_per_species=2"):
        make_folds(singles, dataclasses.replace(CFG, min_seqs_per_species=1))


@pytest.mark.filterwarnings("ignore:The least populated class")
@pytest.mark.parametrize("n_splits, seed", [(10, 0), (5, 0), (5, 3), (3, 1), (2, 7)])
def test_same_splits_as_scikit_learn_where_it_accepts_the_data(records, n_splits, seed):
    """`stratified_group_folds` is StratifiedGroupKFold(shuffle=True)'s assignment, without its refusals."""
    pytest.importorskip("sklearn", minversion="1.9")  # older ones shuffle the groups inconsistently (#32540)
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = records[C.LABEL].to_numpy(), records[C.GROUP].to_numpy()
    expected = np.full(len(y), -1)
    splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        expected[test] = k
    assert (stratified_group_folds(y, groups, n_splits, seed) == expected).all()


def test_splits_of_classes_smaller_than_the_splits(records):
    """Where scikit-learn refuses (every class below n_splits), each class still spreads over as many splits as
    it has groups, and each split takes at most one group of a class."""
    small = records.groupby(C.SPECIES).head(4)
    split = stratified_group_folds(small[C.LABEL].to_numpy(), small[C.GROUP].to_numpy(), 10, 0)
    table = small.assign(split=split)
    assert (table.groupby(C.GROUP)["split"].nunique() == 1).all()
    per_class = table.groupby(C.SPECIES).agg(groups=(C.GROUP, "nunique"), splits=("split", "nunique"))
    assert (per_class["groups"] == per_class["splits"]).all()


def test_user_fold_file_is_used(records, tmp_path):
    path = tmp_path / "folds.csv"
    user = records[[C.ID, C.FOLD]].assign(fold=lambda d: d[C.FOLD].str.upper())  # `TEST` accepted too
    extra = pd.DataFrame({C.ID: ["NOT_KEPT"], C.FOLD: ["2"]})
    pd.concat([user, extra]).to_csv(path, index=False)
    folds, ignored = read_folds_file(path, records, 5)
    assert (folds.to_numpy() == records[C.FOLD].to_numpy()).all() and ignored == 1


def test_user_fold_file_missing_id(records, tmp_path):
    path = tmp_path / "folds.csv"
    records[[C.ID, C.FOLD]].iloc[1:].to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_folds_file(path, records, 5)
    assert str(path) in str(err.value) and repr(records[C.ID].iloc[0]) in str(err.value)


def test_user_fold_file_bad_value(records, tmp_path):
    path = tmp_path / "folds.csv"
    bad = records[[C.ID, C.FOLD]].copy()
    bad.iloc[3, 1] = "7"
    bad.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_folds_file(path, records, 5)
    assert str(path) in str(err.value) and repr(records[C.ID].iloc[3]) in str(err.value) and "'7'" in str(err.value)


def test_user_fold_file_splitting_a_group(records, tmp_path):
    shared = records[records.duplicated(C.SEQUENCE, keep=False)]
    group = shared[C.GROUP].iloc[0]
    members = shared[shared[C.GROUP] == group]
    folds = records[[C.ID, C.FOLD]].copy()
    fold = members[C.FOLD].iloc[0]
    folds.loc[members.index[1], C.FOLD] = "test" if fold != "test" else "0"
    path = tmp_path / "folds.csv"
    folds.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_folds_file(path, records, 5)
    message = str(err.value)
    assert str(path) in message and group in message and all(i in message for i in members[C.ID])
