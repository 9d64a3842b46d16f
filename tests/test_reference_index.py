"""Step 10a, reference index: the identity is VSEARCH's, exclusions remove exactly what they name, and the index
survives save/load, odd queries and any chunk size, on real 12S records."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from idengine import layout as C
from idengine.config import DataConfig
from idengine.data.clean import check_sequence
from idengine.data.fasta import read_fasta
from idengine.reference.align import align_pair
from idengine.reference.index import (
    Exclusions,
    Hits,
    build_index,
    candidates,
    kmer_pairs,
    load_index,
    save_index,
    search,
    top_n,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = (REPO / "tests" / "data" / "12s_sample.fasta.gz", REPO / "tests" / "data" / "12s_sample_labels.csv")
MINI = (REPO / "examples" / "12s-fish-mini" / "sequences.fasta.gz", REPO / "examples" / "12s-fish-mini" / "labels.csv")
HIT_ARRAYS = ("ref", "identity", "coverage", "overlap", "columns", "prefilter")


def read_table(fasta: Path, labels: Path) -> pd.DataFrame:
    """Records as idengine cleans them (usable ones only), joined to their labels; empty rank cells stay empty."""
    raw, _ = read_fasta(fasta)
    cleaned = [check_sequence(s, DataConfig()) for s in raw[C.SEQUENCE]]
    raw[C.SEQUENCE] = [seq for seq, _, _ in cleaned]
    raw = raw[[reason == "" for _, reason, _ in cleaned]]
    table = raw.merge(pd.read_csv(labels, dtype=str, keep_default_na=False), on=C.ID)
    return table.reset_index(drop=True)


@pytest.fixture(scope="module")
def mini() -> pd.DataFrame:
    """The example's records with a seeded fold ("0".."4", some "test") and groups of identical sequences."""
    table = read_table(*MINI)
    rng = np.random.default_rng(0)
    table[C.FOLD] = np.where(rng.random(len(table)) < 0.1, C.TEST_FOLD, rng.integers(0, 5, len(table)).astype(str))
    table[C.GROUP] = [f"g{code}" for code in pd.factorize(table[C.SEQUENCE])[0]]
    return table


@pytest.fixture(scope="module")
def mini_index(mini):
    return build_index(mini)


def assert_same_hits(a: Hits, b: Hits) -> None:
    for name in HIT_ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def random_dna(n: int, seed: int) -> str:
    return "".join(np.random.default_rng(seed).choice(list("ACGT"), n))


def test_identity_is_vsearch_iddef2_on_hand_made_pairs():
    target = random_dna(120, 1)
    inner = target[20:100]
    assert align_pair(inner, target) == (80, 0, 80)  # terminal gaps (the target's overhangs) are not columns
    assert align_pair("GATTACA" + target + "TTT", target) == (120, 0, 120)  # nor the query's
    assert align_pair(target[:60] + target[63:], target) == (117, 0, 120)  # an internal gap is 3 columns
    mutated = target[:50] + {"A": "C", "C": "G", "G": "T", "T": "A"}[target[50]] + target[51:]
    assert align_pair(mutated, target) == (119, 1, 120)
    assert align_pair(target[:50] + "N" + target[51:], target) == (120, 0, 120)  # N matches, as in VSEARCH
    index = build_index(pd.DataFrame({C.ID: ["t"], C.SEQUENCE: [target], C.SPECIES: ["Genus species"]}), k=8,
                        sampling=1)
    hits = search(index, [target[:60] + target[63:], inner, mutated], n=2)
    np.testing.assert_allclose(hits.identity[:, 0], [117 / 120, 1.0, 119 / 120])
    np.testing.assert_allclose(hits.coverage[:, 0], [1.0, 1.0, 1.0])
    assert hits.columns[:, 0].tolist() == [120, 80, 120]
    assert (hits.ref[:, 1] == -1).all() and np.isnan(hits.identity[:, 1]).all()  # one reference, one hit


def test_kmers_skip_n_and_sequence_boundaries():
    rows, kmers = kmer_pairs(["ACGTN", "ACGT"], k=3)
    assert rows.tolist() == [0, 0, 1, 1]  # ACG, CGT twice; GTN skipped; no k-mer across the two sequences
    assert kmers.tolist() == [0b000110, 0b011011] * 2


def test_top_n_ties_go_to_the_lower_column_and_short_rows_pad():
    score = np.array([[0.5, 0.9, 0.9, 0.1, 0.9]], dtype=np.float32)
    idx, val = top_n(score, 2)
    assert idx.tolist() == [[1, 2]] and np.allclose(val, 0.9)
    idx, val = top_n(score, 7)
    assert idx.tolist() == [[1, 2, 4, 0, 3, -1, -1]] and np.isneginf(val[0, 5:]).all()


def test_every_record_finds_itself_and_hits_are_sorted(mini, mini_index):
    rows = np.arange(0, len(mini), 7)
    hits = search(mini_index, mini[C.SEQUENCE].iloc[rows])
    assert hits.ref.shape == (rows.size, 16) and hits.ref.dtype == np.int64 and hits.columns.dtype == np.int64
    assert (hits.identity[:, 0] == 1.0).all()
    assert all(row in hits.ref[i] for i, row in enumerate(rows))
    ident = np.where(hits.ref < 0, -1.0, hits.identity)
    assert (np.diff(ident, axis=1) <= 0).all()  # best first, empty slots last
    same = (np.diff(ident, axis=1) == 0) & (hits.ref[:, 1:] >= 0)
    assert (hits.ref[:, 1:][same] > hits.ref[:, :-1][same]).all()  # ties: lower reference row first
    found = hits.ref >= 0
    assert (hits.overlap[found] >= 0.3).all() and (hits.prefilter[found] > 0).all()
    assert ((hits.coverage[found] > 0) & (hits.coverage[found] <= 1)).all()


def subset_hits(table: pd.DataFrame, keep: np.ndarray, query: str) -> np.ndarray:
    """The hits of a query on an index of the kept rows only, as rows of the full table (the reference answer)."""
    hits = search(build_index(table[keep].reset_index(drop=True)), [query])
    return np.where(hits.ref[0] >= 0, np.flatnonzero(keep)[np.maximum(hits.ref[0], 0)], -1)


@pytest.mark.parametrize("level", ["fold", "species", "genus", "group"])
def test_exclusion_removes_exactly_those_references(mini, mini_index, level):
    rows = np.random.default_rng(1).choice(np.flatnonzero(mini["genus"] != ""), 5, replace=False)
    values = mini[level].to_numpy()[rows]
    hits = search(mini_index, mini[C.SEQUENCE].iloc[rows], exclude=Exclusions(**{level: values}))
    for i, row in enumerate(rows):
        keep = mini[level].to_numpy() != values[i]
        if level == "fold" and values[i] == C.TEST_FOLD:
            keep[:] = True  # "test" is no fold: it excludes nothing
        np.testing.assert_array_equal(hits.ref[i], subset_hits(mini, keep, mini[C.SEQUENCE].iloc[row]))
        assert keep[hits.ref[i][hits.ref[i] >= 0]].all()


def test_a_kept_record_stays_visible_when_its_species_is_hidden(mini, mini_index):
    """A thinned query: its species hidden but one record of it kept. The hits are those of an index holding the
    other species and that one record."""
    counts = mini[C.SPECIES].value_counts()
    species = counts.index[counts >= 3][:4].tolist()
    rows = [int(np.flatnonzero(mini[C.SPECIES] == s)[0]) for s in species]
    kept = [int(np.flatnonzero(mini[C.SPECIES] == s)[-1]) for s in species[:2]] + rows[2:]  # 2: itself
    hits = search(mini_index, mini[C.SEQUENCE].iloc[rows], exclude=Exclusions(
        species=species, keep=mini[C.ID].to_numpy()[kept]))
    for i, (s, k) in enumerate(zip(species, kept)):
        visible = mini[C.SPECIES].to_numpy() != s
        visible[k] = True
        np.testing.assert_array_equal(hits.ref[i], subset_hits(mini, visible, mini[C.SEQUENCE].iloc[rows[i]]))
    assert hits.ref[2, 0] == kept[2] and hits.ref[3, 0] == kept[3] and (hits.identity[2:, 0] == 1).all()
    with pytest.raises(ValueError, match="Exclusions.keep"):
        search(mini_index, mini[C.SEQUENCE].iloc[rows], exclude=Exclusions(keep=["x"]))


def test_unknown_or_missing_values_exclude_nothing(mini, mini_index):
    queries = mini[C.SEQUENCE].iloc[:4].tolist()
    plain = search(mini_index, queries)
    nothing = Exclusions(fold=[None, "test", "9", np.nan], species=[None, np.nan, "Nomen nudum", None],
                         genus=["Nogenus", None, None, np.nan], group=[None, "no-such-group", None, None])
    assert_same_hits(search(mini_index, queries, exclude=nothing), plain)
    one = search(mini_index, queries, exclude=Exclusions(species=mini[C.SPECIES].iloc[0]))  # one value for all
    assert not np.isin(one.ref, np.flatnonzero(mini[C.SPECIES] == mini[C.SPECIES].iloc[0])).any()
    with pytest.raises(ValueError, match="Exclusions.genus"):
        search(mini_index, queries, exclude=Exclusions(genus=["Eleotris"]))


def test_without_a_genus_column_genus_exclusion_does_nothing():
    table = read_table(*SAMPLE).drop(columns=["genus"])
    index = build_index(table)
    assert (index.genus_code == -1).all() and "genus" not in index.taxonomy
    assert (index.fold_code == -1).all() and index.group_code.tolist() == list(range(len(table)))
    queries = table[C.SEQUENCE].iloc[:20].tolist()
    plain = search(index, queries)
    assert_same_hits(search(index, queries, exclude=Exclusions(genus=["Stylephorus"] * 20)), plain)
    species = table[C.SPECIES].iloc[:20].to_numpy()
    masked = search(index, queries, exclude=Exclusions(species=species, group=table[C.ID].iloc[:20].to_numpy()))
    found = masked.ref >= 0
    assert (index.species[masked.ref[found]] != np.repeat(species, 16).reshape(20, 16)[found]).all()


def test_save_load_gives_identical_hits(mini, mini_index, tmp_path):
    path = tmp_path / C.REFERENCE_FILE
    save_index(mini_index, path)
    assert [p.name for p in tmp_path.iterdir()] == [C.REFERENCE_FILE]
    stored = pq.read_table(path)
    assert stored.column_names == [C.ID, C.SEQUENCE, C.SPECIES, *[r for r in C.RANKS if r in mini.columns]]
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    again = load_index(path)
    queries = pd.concat([mini[C.SEQUENCE].iloc[::9], pd.Series([random_dna(300, 5)])]).tolist()
    assert_same_hits(search(again, queries), search(mini_index, queries))
    np.testing.assert_array_equal(again.species_names, mini_index.species_names)
    np.testing.assert_array_equal(again.genus_code, mini_index.genus_code)
    assert again.taxonomy["order"].tolist() == mini_index.taxonomy["order"].tolist()


def test_odd_queries_give_an_empty_row_without_error(mini, mini_index):
    real = mini[C.SEQUENCE].iloc[3]
    odd = ["N" * 300, real[100:110], random_dna(500, 7), "", real[:9]]
    hits = search(mini_index, odd + [real])
    assert (hits.ref[:-1] == -1).all() and np.isnan(hits.identity[:-1]).all() and (hits.columns[:-1] == 0).all()
    assert hits.identity[-1, 0] == 1.0
    assert search(mini_index, []).ref.shape == (0, 16)
    with pytest.raises(ValueError, match="query 1"):
        search(mini_index, [real, real.lower()])


def test_results_do_not_depend_on_the_chunk_size(mini, mini_index):
    rows = np.arange(1, len(mini), 5)
    queries = mini[C.SEQUENCE].iloc[rows].tolist()
    exclude = Exclusions(fold=mini[C.FOLD].to_numpy()[rows], genus=mini["genus"].to_numpy()[rows])
    default = search(mini_index, queries, exclude=exclude)
    for chunk in (1, 7, 1000):
        assert_same_hits(search(mini_index, queries, exclude=exclude, chunk=chunk), default)
    ref, score = candidates(mini_index, queries, 16, exclude, chunk=3)
    assert np.isfinite(score[ref >= 0]).all() and np.isnan(score[ref < 0]).all()


def test_build_refuses_what_it_cannot_index(mini):
    with pytest.raises(ValueError, match="missing columns"):
        build_index(mini.drop(columns=[C.SPECIES]))
    bad = mini.head(3).copy()
    bad.loc[2, C.SEQUENCE] = "ACGT-ACGT"
    with pytest.raises(ValueError, match="reference 2"):
        build_index(bad)


def vsearch_best(queries: list[str], index, work: Path) -> pd.DataFrame:
    """VSEARCH usearch_global (peers settings, id lowered to 0.9) on the index's records, in row order."""
    (work / "q.fa").write_text("".join(f">{i}\n{s}\n" for i, s in enumerate(queries)))
    (work / "db.fa").write_text("".join(f">{j}\n{s}\n" for j, s in enumerate(index.sequences)))
    subprocess.run(["vsearch", "--usearch_global", str(work / "q.fa"), "--db", str(work / "db.fa"), "--id", "0.9",
                    "--maxaccepts", "20", "--userout", str(work / "hits.tsv"), "--userfields",
                    "query+target+ids+alnlen", "--threads", "1", "--quiet"], check=True)
    hits = pd.read_csv(work / "hits.tsv", sep="\t", names=["query", "target", "ids", "alnlen"])
    return hits.groupby("query").head(1).set_index("query")  # its first hit is its best (id, then earlier target)


@pytest.mark.skipif(shutil.which("vsearch") is None, reason="vsearch is not installed (apt-get install vsearch): "
                                                            "the comparison with VSEARCH's identity is skipped")
def test_best_identity_agrees_with_vsearch(mini, tmp_path):
    rows = np.random.default_rng(2).choice(len(mini), 50, replace=False)
    queries = mini[C.SEQUENCE].iloc[rows].tolist()
    index = build_index(mini.drop(index=rows).reset_index(drop=True))
    ours = search(index, queries)
    theirs = vsearch_best(queries, index, tmp_path)
    assert len(theirs) >= 35
    q = theirs.index.to_numpy()
    diff = np.abs(ours.identity[q, 0] - theirs["ids"].to_numpy() / theirs["alnlen"].to_numpy())
    assert np.median(diff) == 0 and np.mean(diff <= 0.005) >= 0.9
    same = index.species[ours.ref[q, 0]] == index.species[theirs["target"].to_numpy()]
    assert same.mean() >= 0.9
