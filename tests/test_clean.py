"""Step 2, clean: real rows transformed into what users send; every drop counted under its reason and id."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from idengine import layout as C
from idengine.config import DataConfig
from idengine.data.clean import (
    assign_groups,
    clean_barcodes,
    drop_bad_records,
    filter_rare_species,
    normalise_sequence,
    resolve_label_conflicts,
)
from idengine.data.load import load_barcodes

DATA = Path(__file__).parent / "data"
CFG = DataConfig(sequences=str(DATA / "12s_sample.fasta.gz"), labels=str(DATA / "12s_sample_labels.csv"))


@pytest.fixture(scope="module")
def loaded() -> pd.DataFrame:
    return load_barcodes(CFG)[0]


def test_normalise_real_row_in_every_user_form(loaded):
    seq = loaded[C.SEQUENCE].iloc[0]
    assert set(seq) <= set("ACGT")
    lower = seq[:50].lower() + seq[50:]
    rna = seq.replace("T", "U")
    gapped = "--" + seq[:30] + "-..-" + seq[30:] + "..."
    spaced = seq[:40] + " \t" + seq[40:]
    for form, flag in ((lower, "lowercase"), (rna, "rna_u"), (gapped, "gaps"), (spaced, "whitespace")):
        cleaned, invalid, flags = normalise_sequence(form)
        assert cleaned == seq and invalid == set()
        assert flags[flag] and sum(flags.values()) == 1
    iupac = seq[:10] + "R" + seq[11:20] + "y" + seq[21:]
    cleaned, invalid, flags = normalise_sequence(iupac)
    assert cleaned == seq[:10] + "N" + seq[11:20] + "N" + seq[21:] and flags["iupac"] and flags["lowercase"]
    assert normalise_sequence(seq[:5] + "EQX*" + seq[5:])[1] == {"E", "Q", "X", "*"}


def test_real_iupac_and_n_runs_become_n(loaded):
    ambiguous = loaded[loaded[C.SEQUENCE].str.contains("[RYSWKMBDHV]")]
    assert len(ambiguous) == 9
    for raw in ambiguous[C.SEQUENCE]:
        cleaned, invalid, flags = normalise_sequence(raw)
        assert set(cleaned) <= set("ACGTN") and len(cleaned) == len(raw) and flags["iupac"] and not invalid
    assert loaded[C.SEQUENCE].str.contains("NNN").sum() == 2


def test_each_bad_record_dropped_under_its_first_reason(loaded):
    t = loaded.head(12).copy()
    ids = t[C.ID].tolist()
    seqs = t[C.SEQUENCE].tolist()
    t.loc[0, C.SEQUENCE] = ""  # header with no sequence
    t.loc[1, C.SEQUENCE] = "---..."
    t.loc[2, C.SEQUENCE] = seqs[2][:20] + "MKVLE" + "J" + seqs[2][20:]  # J is no IUPAC code
    t.loc[3, C.SPECIES] = None
    t.loc[4, C.SEQUENCE] = seqs[4][:49]
    t.loc[5, C.SEQUENCE] = seqs[5] * 40
    t.loc[6, C.SEQUENCE] = seqs[6][:100] + "N" * 30 + seqs[6][130:]
    t.loc[7, C.SEQUENCE] = ""  # empty and no species: the first reason wins
    t.loc[7, C.SPECIES] = None
    cfg = DataConfig(min_len_bp=50, max_len_bp=5_000, max_n_fraction=0.05)
    kept, dropped, _ = drop_bad_records(t, cfg)
    reasons = dict(zip(dropped[C.ID], dropped["reason"]))
    assert reasons == {
        ids[0]: "empty_sequence", ids[1]: "empty_sequence", ids[2]: "invalid_characters", ids[3]: "empty_species",
        ids[4]: "too_short", ids[5]: "too_long", ids[6]: "too_many_n", ids[7]: "empty_sequence",
    }  # fmt: skip
    detail = dict(zip(dropped[C.ID], dropped["detail"]))
    assert "'EJL'" in detail[ids[2]] and "position 24" in detail[ids[2]]  # M, K, V are IUPAC codes
    assert "49 bp" in detail[ids[4]]
    assert kept[C.ID].tolist() == ids[8:] and kept[C.SEQUENCE].tolist() == seqs[8:]


def test_label_conflicts_keep_drop_majority(loaded):
    good, _, _ = drop_bad_records(loaded, CFG)
    kept, dropped, counts = resolve_label_conflicts(good, "keep")
    assert counts == {"sequences": 12, "records": 27, "policy": "keep", "dropped": 0} and len(kept) == len(good)

    kept, dropped, counts = resolve_label_conflicts(good, "drop")
    assert counts["dropped"] == 27 == len(dropped) and set(dropped["reason"]) == {"label_conflict"}
    assert kept.groupby(C.SEQUENCE)[C.SPECIES].nunique().max() == 1 and len(kept) == len(good) - 27

    kept, dropped, counts = resolve_label_conflicts(good, "majority")
    assert kept.groupby(C.SEQUENCE)[C.SPECIES].nunique().max() == 1
    per_seq = good.groupby(C.SEQUENCE)[C.SPECIES].agg(lambda s: sorted(s.value_counts().tolist(), reverse=True))
    majority_seq = [seq for seq, n in per_seq.items() if len(n) > 1 and n[0] > n[1]]
    assert len(majority_seq) == 1
    survivors = kept[kept[C.SEQUENCE] == majority_seq[0]]
    assert len(survivors) == 2 and survivors[C.SPECIES].nunique() == 1
    # the 11 ties have no majority: all of their 24 records go, plus the minority record of the 2-to-1 sequence
    assert counts["dropped"] == 25 and "no majority" in " ".join(dropped["detail"])


def test_groups_are_identical_sequences_unioned_with_clusters(loaded):
    t = loaded.head(6).copy()
    seqs = t[C.SEQUENCE].tolist()
    t[C.SEQUENCE] = [seqs[0], seqs[1], seqs[0], seqs[2], seqs[3], seqs[4]]
    groups = assign_groups(t).tolist()
    assert groups == ["g000000", "g000001", "g000000", "g000002", "g000003", "g000004"]
    # records 1 and 3 share a cluster; record 4 shares one with 3: transitive union
    t[C.CLUSTER] = ["a", "b", "c", "b", "d", "e"]
    t.loc[t.index[4], C.CLUSTER] = "b"
    groups = assign_groups(t).tolist()
    assert groups == ["g000000", "g000001", "g000000", "g000001", "g000001", "g000002"]


def test_rare_species_counted_by_distinct_sequences(loaded):
    t = loaded.assign(**{C.GROUP: assign_groups(loaded)})
    kept, rare, distinct = filter_rare_species(t, 5)
    records = loaded[C.SPECIES].value_counts()
    low = sorted(s for s in records.index if records[s] >= 5 and distinct[s] < 5)
    assert low == ["Larimichthys polyactis", "Pempheris schwenkii"]
    assert set(low) <= set(rare[C.SPECIES]) and not set(low) & set(kept[C.SPECIES])
    assert kept[C.SPECIES].nunique() == 20 and (kept.groupby(C.SPECIES)[C.GROUP].nunique() >= 5).all()
    assert len(kept) + len(rare) == len(t)


def test_clean_barcodes_accounts_for_every_record(loaded):
    t = loaded.copy()
    t.loc[0, C.SEQUENCE] = ""
    t.loc[1, C.SEQUENCE] = t.loc[1, C.SEQUENCE][:30]
    kept, rare, dropped, counts = clean_barcodes(t, DataConfig(label_conflicts="drop"))
    assert len(kept) + len(rare) + len(dropped) == len(t)
    assert sum(counts["dropped"].values()) == len(dropped)
    assert counts["dropped"] == {"empty_sequence": 1, "too_short": 1, "label_conflict": 27}
    assert not set(kept[C.ID]) & set(rare[C.ID]) and not set(kept[C.ID]) & set(dropped[C.ID])
    assert kept[C.SEQUENCE].str.fullmatch("[ACGTN]+").all() and counts["normalised"]["iupac"] == 9
