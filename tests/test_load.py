"""Step 1, load: real 12S rows in the layouts users send, and every rejection naming the file and the offender."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from idengine import layout as C
from idengine.config import DataConfig
from idengine.data.fasta import read_fasta
from idengine.data.load import load_barcodes, read_labels
from idengine.errors import InputError

DATA = Path(__file__).parent / "data"
SAMPLE_FASTA = DATA / "12s_sample.fasta.gz"
SAMPLE_LABELS = DATA / "12s_sample_labels.csv"


def sample_records() -> list[tuple[str, str]]:
    with gzip.open(SAMPLE_FASTA, "rt") as handle:
        return list(SimpleFastaParser(handle))


def fasta_text(records: list[tuple[str, str]], wrap: int | None = None, newline: str = "\n") -> str:
    lines = []
    for rid, seq in records:
        lines.append(f">{rid} some description")
        step = wrap or max(len(seq), 1)
        lines.extend(seq[i : i + step] for i in range(0, len(seq), step)) if seq else None
    return newline.join(lines) + newline


def write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def cfg_for(fasta: Path, labels: Path = SAMPLE_LABELS, **kw) -> DataConfig:
    return DataConfig(sequences=str(fasta), labels=str(labels), **kw)


def test_sample_loads_in_file_order_with_every_rank():
    table, counts = load_barcodes(cfg_for(SAMPLE_FASTA))
    records = sample_records()
    assert counts["records_read"] == len(records) == len(table) == 248
    assert table[C.ID].tolist() == [r for r, _ in records]
    assert table[C.SEQUENCE].tolist() == [s for _, s in records]
    assert list(table.columns) == [C.ID, C.SEQUENCE, C.SPECIES, *C.RANKS]
    assert counts["normalised"]["gzip"] == 1 and counts["dropped"] == {} and len(counts["dropped_rows"]) == 0
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False).set_index("id")
    assert (table.set_index(C.ID)[C.SPECIES] == labels.loc[table[C.ID], "species"]).all()
    assert table["order"].isna().sum() == (labels["order"] == "").sum() > 0  # empty rank -> null


def test_crlf_bom_wrapped_gzip_under_any_name(tmp_path):
    records = sample_records()
    text = "\ufeff" + fasta_text(records, wrap=60, newline="\r\n")
    fasta = write(tmp_path / "seqs.txt", text, gz=True)  # gzip found by magic bytes, not the name
    labels_text = "\ufeff" + SAMPLE_LABELS.read_text().replace("\n", "\r\n").replace("id,species", "ID, Species", 1)
    labels = write(tmp_path / "labels.csv", labels_text)
    table, counts = load_barcodes(cfg_for(fasta, labels))
    assert table[C.SEQUENCE].tolist() == [s for _, s in records]
    assert counts["normalised"] == {"gzip": 1, "bom": 2, "crlf": 2, "crlf_or_bom": 2}


def test_tsv_labels_and_plain_fasta_named_gz(tmp_path):
    fasta = write(tmp_path / "plain.fasta.gz", fasta_text(sample_records()))
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False)
    tsv = tmp_path / "labels.tsv"
    labels.to_csv(tsv, sep="\t", index=False)
    table, counts = load_barcodes(cfg_for(fasta, tsv))
    assert len(table) == 248 and counts["normalised"]["gzip"] == 0


def test_missing_values_read_as_null(tmp_path):
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False)
    labels.loc[0, "genus"] = "NA"
    labels.loc[1, "species"] = " "
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    table, _ = read_labels(path)
    assert pd.isna(table.loc[0, "genus"]) and pd.isna(table.loc[1, "species"])
    assert table.loc[2, "species"] == labels.loc[2, "species"]


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("ACGTACGT\n>{id}\nACGT\n", "line 1"),
        ("\n\nacgt\n>{id}\nACGT\n", "line 3"),
        (">\nACGT\n", "line 1"),
    ],
)
def test_malformed_fasta_is_refused_naming_the_line(tmp_path, content, where):
    rid, seq = sample_records()[0]
    path = write(tmp_path / "bad.fasta", content.format(id=rid) + fasta_text(sample_records()[1:3]))
    with pytest.raises(InputError) as err:
        read_fasta(path)
    assert str(path) in str(err.value) and where in str(err.value)


def test_binary_bytes_are_refused_naming_the_line(tmp_path):
    text = fasta_text(sample_records()[:5]).encode()
    lines = text.split(b"\n")
    for i, bad in enumerate((b"\x00\x01\x02", b"\xff\xfe\x80")):
        broken = b"\n".join(lines[:6] + [lines[6][:10] + bad + lines[6][10:]] + lines[7:])
        path = write(tmp_path / f"bad{i}.fasta.gz", broken, gz=True)
        with pytest.raises(InputError, match="line 7") as err:
            read_fasta(path)
        assert str(path) in str(err.value)


def test_truncated_gzip_is_refused(tmp_path):
    raw = SAMPLE_FASTA.read_bytes()
    path = write(tmp_path / "cut.fasta.gz", raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        read_fasta(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\n \n", gzip.compress(b"")])
def test_empty_files_are_refused(tmp_path, content):
    fasta = write(tmp_path / "empty.fasta", content)
    with pytest.raises(InputError, match="empty") as err:
        read_fasta(fasta)
    assert str(fasta) in str(err.value)
    labels = write(tmp_path / "labels.csv", content)
    with pytest.raises(InputError, match="empty") as err:
        load_barcodes(cfg_for(SAMPLE_FASTA, labels))
    assert str(labels) in str(err.value)


@pytest.mark.parametrize("drop", ["id", "species"])
def test_labels_without_id_or_species_column(tmp_path, drop):
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False).drop(columns=drop)
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        load_barcodes(cfg_for(SAMPLE_FASTA, path))
    assert str(path) in str(err.value) and f"no '{drop}' column" in str(err.value)


def test_duplicate_fasta_ids_refused_or_dropped(tmp_path):
    records = sample_records()
    first, third = records[0][0], records[2][0]
    dup = records + [(first, records[5][1]), records[2]]
    path = write(tmp_path / "dup.fasta", fasta_text(dup))
    with pytest.raises(InputError) as err:
        load_barcodes(cfg_for(path))
    message = str(err.value)
    assert str(path) in message and repr(first) in message and repr(third) in message and "2 id(s)" in message
    table, counts = load_barcodes(cfg_for(path, drop_duplicate_ids=True))
    assert counts["records_read"] == 250 and counts["dropped"] == {"duplicate_id": 4}
    assert len(table) == 246 and first not in set(table[C.ID]) and third not in set(table[C.ID])
    assert sorted(counts["dropped_rows"][C.ID]) == sorted([first, first, third, third])


def test_duplicate_label_ids_refused_or_dropped(tmp_path):
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False)
    path = tmp_path / "labels.csv"
    pd.concat([labels, labels.iloc[[7]]]).to_csv(path, index=False)
    dup = labels.loc[7, "id"]
    with pytest.raises(InputError) as err:
        load_barcodes(cfg_for(SAMPLE_FASTA, path))
    assert str(path) in str(err.value) and repr(dup) in str(err.value)
    table, counts = load_barcodes(cfg_for(SAMPLE_FASTA, path, drop_duplicate_ids=True))
    assert counts["dropped"] == {"duplicate_id": 1} and dup not in set(table[C.ID]) and len(table) == 247


def test_unmatched_ids_refused_or_dropped(tmp_path):
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False)
    no_label = labels.loc[3, "id"]
    extra = labels.iloc[[0]].assign(id="XX000001")
    path = tmp_path / "labels.csv"
    pd.concat([labels.drop(index=3), extra]).to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        load_barcodes(cfg_for(SAMPLE_FASTA, path))
    message = str(err.value)
    assert str(path) in message and str(SAMPLE_FASTA) in message
    assert repr(no_label) in message and "'XX000001'" in message and "drop_unmatched_ids" in message
    table, counts = load_barcodes(cfg_for(SAMPLE_FASTA, path, drop_unmatched_ids=True))
    assert counts["dropped"] == {"no_label": 1} and counts["unmatched_rows"] == {"labels": 1}
    assert len(table) == 247 and counts["records_read"] == 248
    rows = counts["dropped_rows"].set_index(C.ID)["reason"].to_dict()
    assert rows == {no_label: "no_label", "XX000001": "label_without_sequence"}


def test_vectors_and_clusters_join_by_id(tmp_path):
    records = sample_records()
    ids = [r for r, _ in records]
    vectors = pd.DataFrame({"id": ids[::-1], "GC": [s.count("G") / len(s) for _, s in records[::-1]], "len": 1})
    vectors.to_csv(tmp_path / "vectors.csv", index=False)
    clusters = pd.DataFrame({"id": ids, "cluster": [f"c{i // 3}" for i in range(len(ids))]})
    clusters.to_csv(tmp_path / "clusters.csv", index=False)
    cfg = cfg_for(SAMPLE_FASTA, vectors=str(tmp_path / "vectors.csv"), clusters=str(tmp_path / "clusters.csv"))
    table, _ = load_barcodes(cfg)
    assert table[C.ID].tolist() == ids
    assert table["vec_gc"].tolist() == [s.count("G") / len(s) for _, s in records]
    assert table["vec_len"].dtype == "float64" and table[C.CLUSTER].iloc[4] == "c1"


def test_vectors_with_text_cell_name_column_and_id(tmp_path):
    ids = [r for r, _ in sample_records()]
    vectors = pd.DataFrame({"id": ids, "gc": 0.5})
    vectors["gc"] = vectors["gc"].astype(object)
    vectors.loc[10, "gc"] = "high"
    vectors.to_csv(tmp_path / "vectors.csv", index=False)
    with pytest.raises(InputError) as err:
        load_barcodes(cfg_for(SAMPLE_FASTA, vectors=str(tmp_path / "vectors.csv")))
    assert "vectors.csv" in str(err.value) and "'gc'" in str(err.value) and repr(ids[10]) in str(err.value)


def test_clusters_missing_for_an_id(tmp_path):
    ids = [r for r, _ in sample_records()]
    pd.DataFrame({"id": ids[1:], "cluster": "c"}).to_csv(tmp_path / "clusters.csv", index=False)
    with pytest.raises(InputError) as err:
        load_barcodes(cfg_for(SAMPLE_FASTA, clusters=str(tmp_path / "clusters.csv")))
    assert "clusters.csv" in str(err.value) and repr(ids[0]) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        load_barcodes(cfg_for(tmp_path / "nope.fasta"))
    assert "nope.fasta" in str(err.value)


def test_rows_of_already_dropped_records_are_not_unmatched(tmp_path):
    labels = pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False)
    path = tmp_path / "labels.csv"
    labels.drop(index=3).to_csv(path, index=False)
    ids = labels["id"].tolist()
    pd.DataFrame({"id": ids, "gc": 0.5}).to_csv(tmp_path / "vectors.csv", index=False)
    cfg = cfg_for(SAMPLE_FASTA, path, vectors=str(tmp_path / "vectors.csv"), drop_unmatched_ids=True)
    table, counts = load_barcodes(cfg)
    assert counts["dropped"] == {"no_label": 1} and counts["unmatched_rows"] == {"labels": 0, "vectors": 0}
    assert len(table) == 247 and len(counts["dropped_rows"]) == 1
