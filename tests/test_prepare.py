"""Step 5, prepare: the prepared directory, its accounting, messy real input end to end, atomic replacement."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from idengine import layout as C
from idengine.config import Config, DataConfig
from idengine.config_io import load_config
from idengine.errors import InputError
from idengine.data.prepared import read_prepared, read_unknown
from idengine.recipes.prepare import prepare_dataset

DATA = Path(__file__).parent / "data"
SAMPLE_FASTA = DATA / "12s_sample.fasta.gz"
SAMPLE_LABELS = DATA / "12s_sample_labels.csv"
FILES = {
    C.RECORDS_FILE, C.UNKNOWN_FILE, C.LABEL_MAP_FILE, C.DROPPED_FILE,
    C.REPORT_JSON, C.REPORT_MD, C.CLASS_SIZES_PNG, C.CONFIG_FILE,
}  # fmt: skip


def config(**data) -> Config:
    return Config(data=DataConfig(sequences=str(SAMPLE_FASTA), labels=str(SAMPLE_LABELS), **data))


def sample_records() -> list[tuple[str, str]]:
    with gzip.open(SAMPLE_FASTA, "rt") as handle:
        return list(SimpleFastaParser(handle))


def check_accounting(out: Path) -> dict:
    report = json.loads((out / C.REPORT_JSON).read_text())
    records, unknown = pd.read_parquet(out / C.RECORDS_FILE), read_unknown(out)
    dropped = pd.read_csv(out / C.DROPPED_FILE, dtype=str, keep_default_na=False)
    record_rows = dropped[dropped["reason"].isin(report["dropped"])]
    assert report["records_read"] == report["kept"] + report["set_aside_rare_species"] + sum(report["dropped"].values())
    assert (report["kept"], report["set_aside_rare_species"]) == (len(records), len(unknown))
    assert len(record_rows) == report["dropped_total"] and record_rows.groupby("reason").size().to_dict() == {
        k: v for k, v in report["dropped"].items() if v
    }
    ids = [*records[C.ID], *unknown[C.ID], *record_rows[C.ID]]
    assert len(ids) == report["records_read"]
    assert report["folds"] == records[C.FOLD].value_counts().to_dict()
    return report


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_dataset(config(), tmp_path_factory.mktemp("prep") / "prepared")


def test_prepared_directory_files_and_schema(prepared):
    assert {p.name for p in prepared.iterdir()} == FILES
    schema = pq.read_schema(prepared / C.RECORDS_FILE)
    assert schema.names == [C.ID, C.SEQUENCE, C.SPECIES, *C.RANKS, C.LABEL, C.GROUP, C.FOLD]
    assert str(schema.field(C.LABEL).type) == "int64" and str(schema.field(C.FOLD).type) == "string"
    assert pq.read_schema(prepared / C.UNKNOWN_FILE).names == [C.ID, C.SEQUENCE, C.SPECIES, *C.RANKS, C.GROUP]
    records, labels = read_prepared(prepared)
    assert labels.num_classes == records[C.SPECIES].nunique() == 20
    assert (records[C.LABEL] == records[C.SPECIES].map(labels.label_of)).all()
    assert set(records[C.FOLD]) == {"0", "1", "2", "3", "4", "test"}
    assert records[C.SEQUENCE].str.fullmatch("[ACGTN]+").all()
    assert load_config(prepared / C.CONFIG_FILE) == config()
    assert (prepared / C.CLASS_SIZES_PNG).read_bytes()[:4] == b"\x89PNG"


def test_report_adds_up(prepared):
    report = check_accounting(prepared)
    assert report["records_read"] == 248 and report["dropped_total"] == 0
    assert report["species_before"] == 104 and report["species_after"] == 20
    assert report["buckets_before"] == {"1": 75, "2-4": 7, "5-19": 22, "20+": 0}
    assert sum(report["buckets_after"].values()) == 20 and report["buckets_after"]["1"] == 0
    assert report["label_conflicts"] == {"sequences": 12, "records": 27, "policy": "keep", "dropped": 0}
    assert report["imbalance_ratio"] == pytest.approx(10 / 6)
    assert report["normalised"]["iupac"] == 9 and report["normalised"]["gzip"] == 1
    lengths = report["length_bp"]
    assert lengths["min"] <= lengths["p5"] <= lengths["median"] <= lengths["p95"] <= lengths["max"]
    md = (prepared / C.REPORT_MD).read_text()
    assert "248 records read = 147 kept + 101 set aside" in md


def messy_inputs(tmp: Path) -> tuple[Path, Path, dict[str, str], list[tuple[str, str]]]:
    """The real sample as users send it: CRLF, BOM, wrapped lines, lower case, RNA, gaps, and broken records."""
    records = sample_records()
    out = []
    for i, (rid, seq) in enumerate(records):
        form = seq
        if i % 7 == 1:
            form = seq.lower()
        elif i % 7 == 2:
            form = seq.replace("T", "U")
        elif i % 7 == 3:
            form = "---" + seq[:25] + ".." + seq[25:] + "--"
        out.append((rid, form))
    broken = {records[0][0]: "empty_sequence", records[10][0]: "invalid_characters", records[20][0]: "too_short"}
    out[0] = (records[0][0], "")
    out[10] = (records[10][0], records[10][1][:40] + "EFIL" + records[10][1][40:])
    out[20] = (records[20][0], records[20][1][:30])
    lines = []
    for rid, seq in out:
        lines.append(f">{rid}")
        lines.extend(seq[j : j + 70] for j in range(0, len(seq), 70))
    fasta = tmp / "messy.fa"  # gzip without the .gz name
    fasta.write_bytes(gzip.compress(("\ufeff" + "\r\n".join(lines) + "\r\n").encode()))
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False)
    labels.loc[labels["id"] == records[30][0], "species"] = ""
    broken[records[30][0]] = "empty_species"
    label_path = tmp / "labels.csv"
    label_path.write_bytes(b"\xef\xbb\xbf" + labels.to_csv(index=False, lineterminator="\r\n").encode())
    return fasta, label_path, broken, records


def test_messy_real_input_end_to_end(tmp_path):
    fasta, labels, broken, records = messy_inputs(tmp_path)
    cfg = Config(data=DataConfig(sequences=str(fasta), labels=str(labels)))
    out = prepare_dataset(cfg, tmp_path / "out")
    report = check_accounting(out)
    assert report["records_read"] == 248 and report["dropped_total"] == 4
    dropped = pd.read_csv(out / C.DROPPED_FILE, dtype=str, keep_default_na=False)
    assert dict(zip(dropped[C.ID], dropped["reason"])) == broken
    norm = report["normalised"]
    # every 7th record from 1, 2, 3 (record 10 was replaced by a broken one)
    assert (norm["lowercase"], norm["rna_u"], norm["gaps"], norm["crlf_or_bom"]) == (36, 36, 34, 2)
    original = dict(records)
    kept = pd.concat([pd.read_parquet(out / C.RECORDS_FILE), read_unknown(out)])
    for rid, seq in zip(kept[C.ID], kept[C.SEQUENCE]):
        raw = original[rid]
        assert seq == "".join("N" if b in "RYSWKMBDHV" else b for b in raw)


def test_same_seed_same_directory_content(prepared, tmp_path):
    again = prepare_dataset(config(), tmp_path / "again")
    for name in (C.RECORDS_FILE, C.UNKNOWN_FILE):
        pd.testing.assert_frame_equal(pd.read_parquet(again / name), pd.read_parquet(prepared / name))
    assert (again / C.LABEL_MAP_FILE).read_text() == (prepared / C.LABEL_MAP_FILE).read_text()


def test_fold_file_round_trip(prepared, tmp_path):
    records, _ = read_prepared(prepared)
    folds = tmp_path / "folds.csv"
    records[[C.ID, C.FOLD]].to_csv(folds, index=False)
    out = prepare_dataset(config(folds_file=str(folds), seed=7), tmp_path / "from_file")
    again, _ = read_prepared(out)
    assert (again[C.FOLD] == records[C.FOLD]).all()
    assert json.loads((out / C.REPORT_JSON).read_text())["fold_source"] == f"file {folds}"


def test_label_conflict_policy_and_drop_options_counted(tmp_path):
    out = prepare_dataset(config(label_conflicts="majority"), tmp_path / "majority")
    report = check_accounting(out)
    assert report["dropped"]["label_conflict"] == 25 == report["label_conflicts"]["dropped"]
    records, _ = read_prepared(out)
    assert records.groupby(C.SEQUENCE)[C.SPECIES].nunique().max() == 1


def test_fewer_than_two_species_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        prepare_dataset(config(min_seqs_per_species=11), tmp_path / "out")
    assert str(SAMPLE_LABELS) in str(err.value) and "min_seqs_per_species" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_replaced_only_when_complete(prepared, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(config(), out)
    stamp = (out / C.REPORT_JSON).stat().st_mtime_ns
    with pytest.raises(InputError):  # a failing run leaves the previous directory as it was
        prepare_dataset(config(min_seqs_per_species=50), out)
    assert (out / C.REPORT_JSON).stat().st_mtime_ns == stamp
    time.sleep(0.01)
    prepare_dataset(config(seed=3), out)
    assert json.loads((out / C.REPORT_JSON).read_text())["settings"]["seed"] == 3
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old siblings left


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(InputError, match="refusing to replace"):
        prepare_dataset(config(), foreign)
    assert (foreign / "thesis.tex").read_text() == "keep me"


def test_read_prepared_refuses_an_incomplete_directory(tmp_path):
    (tmp_path / C.RECORDS_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a prepared directory"):
        read_prepared(tmp_path)


@pytest.mark.integration
@pytest.mark.full_data
def test_full_12s_fish_accounts_for_every_record(shared_12s, tmp_path):
    start = time.perf_counter()
    data = DataConfig(sequences=str(shared_12s / "sequences.fasta.gz"), labels=str(shared_12s / "labels.csv"))
    cfg = Config(data=data)
    out = prepare_dataset(cfg, tmp_path / "full")
    elapsed = time.perf_counter() - start
    report = check_accounting(out)
    assert report["records_read"] == 24_934 and report["species_before"] == 8_111
    assert report["buckets_before"] == {"1": 3264, "2-4": 3450, "5-19": 1343, "20+": 54}
    assert report["label_conflicts"]["sequences"] == 766 and report["label_conflicts"]["records"] == 1781
    records, labels = read_prepared(out)
    assert (records.groupby(C.GROUP)[C.FOLD].nunique() == 1).all()
    assert report["species_missing_from_training"] == {str(k): 0 for k in range(5)}
    assert elapsed < 120, f"prepare of the full set took {elapsed:.0f} s"


@pytest.mark.integration
@pytest.mark.full_data
def test_full_12s_fish_with_the_protocol_folds(shared_12s, tmp_path):
    protocol = pd.read_csv(shared_12s / "protocol-folds.csv", dtype=str)
    data = DataConfig(
        sequences=str(shared_12s / "sequences.fasta.gz"),
        labels=str(shared_12s / "labels.csv"),
        folds_file=str(shared_12s / "protocol-folds.csv"),
    )
    out = prepare_dataset(Config(data=data), tmp_path / "protocol")
    records, _ = read_prepared(out)
    expected = records[C.ID].map(dict(zip(protocol["id"], protocol["fold"])))
    assert (records[C.FOLD] == expected).all() and C.TEST_FOLD not in set(records[C.FOLD])
    assert dataclasses.asdict(data)["folds_file"] in json.loads((out / C.REPORT_JSON).read_text())["fold_source"]
