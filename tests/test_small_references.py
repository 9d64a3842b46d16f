"""Small and narrow references prepare (issue #14, part 1): the splits adapt to what the data allows, and say so.

Every reference here is made of REAL 12S rows (examples/12s-fish-mini + tests/data), ids, sequences and label rows
copied unchanged into tmp_path; only the choice of rows differs. Each test checks the invariants of the folds
(grouped; every species in the training part of every fold; stratified) and that the report shows each decision.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from idengine import layout as C
from idengine.config_io import load_config
from idengine.data.clean import normalise_sequence
from idengine.data.fasta import read_fasta
from idengine.data.prepared import read_prepared
from idengine.data.splits import MIN_TRAINING_GROUPS
from idengine.errors import InputError
from idengine.recipes.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
SOURCES = (
    (REPO / "examples/12s-fish-mini/sequences.fasta.gz", REPO / "examples/12s-fish-mini/labels.csv"),
    (REPO / "tests/data/12s_sample.fasta.gz", REPO / "tests/data/12s_sample_labels.csv"),
)


@pytest.fixture(scope="module")
def real_rows() -> pd.DataFrame:
    """Every real record of the repo with its label row, its raw sequence and its cleaned sequence (`clean`);
    sequences shared by several species (label conflicts) are left out, so distinct sequences are per species."""
    frames = []
    for fasta, labels in SOURCES:
        table = pd.read_csv(labels, dtype=str, keep_default_na=False)
        frames.append(read_fasta(fasta)[0].merge(table, on=C.ID))
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(C.ID)
    rows["clean"] = [normalise_sequence(s)[0] for s in rows[C.SEQUENCE]]
    return rows[rows.groupby("clean")[C.SPECIES].transform("nunique") == 1].reset_index(drop=True)


def choose(rows: pd.DataFrame, n_species: int, distinct: int, records: int | None = None) -> pd.DataFrame:
    """n_species species with at least `distinct` distinct sequences, each with exactly `distinct` of them: one
    record per sequence (records=None: every real record of those sequences, duplicates included), or the first
    `records` records of `records` distinct sequences when records is given."""
    per = rows.groupby(C.SPECIES)["clean"].nunique()
    species = sorted(per[per >= max(distinct, records or 0)].index)[:n_species]
    assert len(species) == n_species, f"the repo holds only {len(species)} such species"
    out = []
    for name in species:
        mine = rows[rows[C.SPECIES] == name]
        keep = list(dict.fromkeys(mine["clean"]))[: records or distinct]
        chosen = mine[mine["clean"].isin(keep)]
        out.append(chosen.drop_duplicates("clean") if records else chosen)
    return pd.concat(out, ignore_index=True)


def write_reference(rows: pd.DataFrame, directory: Path) -> list[str]:
    """sequences.fasta + labels.csv of the chosen rows; returns the data.* overrides that point at them."""
    directory.mkdir(parents=True, exist_ok=True)
    fasta = directory / "sequences.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in zip(rows[C.ID], rows[C.SEQUENCE])))
    labels = directory / "labels.csv"
    rows.drop(columns=[C.SEQUENCE, "clean"]).to_csv(labels, index=False)
    return [f"data.sequences={fasta}", f"data.labels={labels}"]


def prepare(tmp_path: Path, rows: pd.DataFrame, *overrides: str) -> tuple[pd.DataFrame, dict, str]:
    config = load_config(None, [*write_reference(rows, tmp_path / "in"), *overrides])
    out = prepare_dataset(config, tmp_path / "prepared")
    records, _ = read_prepared(out)
    return records, json.loads((out / C.REPORT_JSON).read_text()), (out / C.REPORT_MD).read_text()


def check_folds(records: pd.DataFrame, report: dict, n_folds: int) -> None:
    """The invariants every prepared set keeps, however small: grouped, every species trained on in every fold,
    stratified as far as its sequences allow, and a report that matches the table."""
    assert (records.groupby(C.GROUP)[C.FOLD].nunique() == 1).all()
    assert (records.groupby(C.SEQUENCE)[C.FOLD].nunique() == 1).all()
    cv = records[records[C.FOLD] != C.TEST_FOLD]
    assert set(cv[C.FOLD]) == {str(k) for k in range(n_folds)} and report["split"]["n_folds"] == n_folds
    assert report["species_missing_from_training"] == {str(k): 0 for k in range(n_folds)}
    per_fold = pd.crosstab(cv[C.SPECIES], cv[C.FOLD])
    groups = cv.groupby(C.SPECIES)[C.GROUP].nunique()
    # stratified: a species is in min(its groups, K) folds, and no fold holds two of its groups before all have one
    assert ((per_fold > 0).sum(axis=1) == groups.clip(upper=n_folds)).all()
    assert report["folds"] == {k: int(v) for k, v in records[C.FOLD].value_counts().items()} | (
        {} if C.TEST_FOLD in set(records[C.FOLD]) else {C.TEST_FOLD: 0})
    assert report["species_in_test"] == records.loc[records[C.FOLD] == C.TEST_FOLD, C.SPECIES].nunique()


def test_bundled_example_keeps_its_folds_and_needs_no_warning(prepared_example):
    records, _ = read_prepared(prepared_example)
    report = json.loads((prepared_example / C.REPORT_JSON).read_text())
    check_folds(records, report, 5)
    assert report["warnings"] == [] and report["split"]["species_kept_out_of_test"] == []
    # the folds of the bundled example as documented in its PROVENANCE.md (and as before issue #14)
    assert report["folds"] == {"0": 59, "1": 59, "2": 58, "3": 58, "4": 58, "test": 33}
    assert "## Warnings" not in (prepared_example / C.REPORT_MD).read_text()


def test_forty_species_of_six_records(tmp_path, real_rows):
    """The case of issue #14: every species smaller than the 10 test splits (scikit-learn refused: n_splits=10
    cannot be greater than the number of members in each class)."""
    rows = choose(real_rows, 40, 6, records=6)
    assert len(rows) == 240 and (rows.groupby(C.SPECIES).size() == 6).all()
    records, report, md = prepare(tmp_path, rows)
    check_folds(records, report, 5)
    test = records[records[C.FOLD] == C.TEST_FOLD]
    assert 0.05 <= len(test) / len(records) <= 0.15 and test.groupby(C.SPECIES).size().max() == 1
    assert report["warnings"] == [] and report["species_in_every_fold"] == 40  # 5 or 6 sequences left each
    assert "test = split 1 of 10" in report["fold_source"] and f"{len(test)} records of" in md


def test_valid_variants_of_a_small_reference_give_the_same_folds(tmp_path, real_rows):
    """The variants of issue #14's corpus that are valid (gzip, BOM, CRLF, lower-case RNA, gaps, wrapped lines) all
    prepared with the error before; each gives exactly the plain file's folds."""
    rows = choose(real_rows, 40, 6, records=6)
    plain, _, _ = prepare(tmp_path / "plain", rows)
    lines = []
    for i, (rid, seq) in enumerate(zip(rows[C.ID], rows[C.SEQUENCE])):
        seq = seq.lower().replace("t", "u") if i % 3 == 0 else ("--" + seq[:30] + "." + seq[30:] if i % 3 == 1 else seq)
        lines += [f">{rid} a real 12S record", *(seq[j:j + 60] for j in range(0, len(seq), 60))]
    fasta = tmp_path / "variants.fa"
    fasta.write_bytes(gzip.compress(("\ufeff" + "\r\n".join(lines) + "\r\n").encode()))
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"\xef\xbb\xbf" + rows.drop(columns=[C.SEQUENCE, "clean"]).to_csv(
        index=False, lineterminator="\r\n").encode())
    config = load_config(None, [f"data.sequences={fasta}", f"data.labels={labels}"])
    variants, _ = read_prepared(prepare_dataset(config, tmp_path / "variants"))
    assert variants[[C.ID, C.SEQUENCE, C.FOLD]].equals(plain[[C.ID, C.SEQUENCE, C.FOLD]])


def test_two_species(tmp_path, real_rows):
    rows = choose(real_rows, 2, 8)
    records, report, _ = prepare(tmp_path, rows)
    check_folds(records, report, 5)
    assert records[C.SPECIES].nunique() == 2 and report["species_in_test"] >= 1
    assert report["warnings"] == []


def test_every_species_at_the_minimum_of_distinct_sequences(tmp_path, real_rows):
    """Each species has exactly data.min_seqs_per_species (5) distinct sequences; real duplicates ride along."""
    rows = choose(real_rows, 12, 5)
    assert (rows.groupby(C.SPECIES)["clean"].nunique() == 5).all() and len(rows) > 60
    records, report, _ = prepare(tmp_path, rows)
    assert report["species_after"] == 12 and report["set_aside_rare_species"] == 0
    # a species that gave a test share keeps 4 sequences for 5 folds: trained on in every fold, validated in 4
    check_folds(records, report, 5)
    assert report["species_in_test"] > 0 and report["warnings"] == []


def test_three_sequences_per_species_shrinks_the_folds_and_says_so(tmp_path, real_rows, caplog):
    rows = choose(real_rows, 10, 3)
    records, report, md = prepare(tmp_path, rows, "data.min_seqs_per_species=3")
    check_folds(records, report, 3)
    assert report["split"] == {"test_fraction": 0.1, "test_splits": 10, "species_kept_out_of_test": [],
                               "n_folds_requested": 5, "n_folds": 3}
    (warning,) = report["warnings"]
    assert "data.n_folds=5" in warning and "data.n_folds=3" in warning
    assert warning in caplog.text and "## Warnings (1)" in md and warning in md
    # no species gave more than one sequence, and each kept two for the folds
    test = records[records[C.FOLD] == C.TEST_FOLD]
    assert test.groupby(C.SPECIES)[C.GROUP].nunique().max() == 1


def test_two_sequences_per_species_keep_them_out_of_the_test_split(tmp_path, real_rows):
    rows = choose(real_rows, 8, 2)
    records, report, md = prepare(tmp_path, rows, "data.min_seqs_per_species=2")
    check_folds(records, report, MIN_TRAINING_GROUPS)
    assert C.TEST_FOLD not in set(records[C.FOLD]) and report["species_in_test"] == 0
    assert report["split"]["species_kept_out_of_test"] == sorted(set(rows[C.SPECIES]))
    kept_out, no_test, fewer_folds = report["warnings"]
    assert "stay out of the test split" in kept_out and "data.test_fraction=0" in no_test
    assert "data.n_folds=2" in fewer_folds and "Test split: 0 records" in md


def test_a_mix_keeps_small_species_out_of_the_test_split_only(tmp_path, real_rows):
    """Species with 2 sequences stay in training; species with 8 give their test share as before."""
    small, large = choose(real_rows, 14, 2), choose(real_rows, 30, 8, records=8)
    rows = pd.concat([small, large[~large[C.SPECIES].isin(small[C.SPECIES])]], ignore_index=True)
    records, report, _ = prepare(tmp_path, rows, "data.min_seqs_per_species=2")
    check_folds(records, report, 5)
    small_species = set(small[C.SPECIES])
    test = records[records[C.FOLD] == C.TEST_FOLD]
    assert not small_species & set(test[C.SPECIES]) and len(test) > 0
    assert report["split"]["species_kept_out_of_test"] == sorted(small_species)
    (warning,) = report["warnings"]
    assert "14 species stay out of the test split" in warning


def test_single_sequence_species_cannot_be_cross_validated(tmp_path, real_rows):
    rows = choose(real_rows, 6, 1)
    config = load_config(None, [*write_reference(rows, tmp_path / "in"), "data.min_seqs_per_species=1"])
    with pytest.raises(InputError) as err:
        prepare_dataset(config, tmp_path / "prepared")
    assert "data.min_seqs_per_species=2" in str(err.value) and not (tmp_path / "prepared").exists()


def test_too_few_species_names_the_value_that_keeps_two(tmp_path, real_rows):
    big = choose(real_rows, 1, 8)
    rows = pd.concat([big, choose(real_rows[~real_rows[C.SPECIES].isin(big[C.SPECIES])], 2, 3)], ignore_index=True)
    config = load_config(None, write_reference(rows, tmp_path / "in"))
    with pytest.raises(InputError) as err:
        prepare_dataset(config, tmp_path / "prepared")
    message = str(err.value)
    assert str(tmp_path / "in" / "labels.csv") in message and "data.min_seqs_per_species=3" in message
    records, report, _ = prepare(tmp_path / "again", rows, "data.min_seqs_per_species=3")
    assert records[C.SPECIES].nunique() == report["species_after"] >= 2
