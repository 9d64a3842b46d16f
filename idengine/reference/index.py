"""Step 10a, reference index: every reference record's sampled k-mers (the prefilter) and its sequence; a query's
top candidates by shared k-mers are aligned (`align.py`, parasail) and scored as VSEARCH's identity (`--iddef 2`).
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from idengine import layout as C
from idengine.reference.align import align_candidates
from idengine.storage import publish_file

log = logging.getLogger(__name__)

CHUNK_CELLS, MAX_CHUNK = 2**24, 64
"""Queries are prefiltered in chunks of about CHUNK_CELLS (query, reference) cells (the dense working set), at most
MAX_CHUNK: on 12s-fish (24,934 references) 256 queries at once set predict's peak RSS (+80 MiB over 64) and ran no
faster (bench/results/index_memory.json)."""
MIN_COLUMNS = 32  # fewer alignment columns are no hit: a few bases match something at 100 % (a 10-bp query)
BUILD_BLOCK = 1_000  # sequences whose k-mers are extracted at once while building: bounds the int64 temporaries
_CODE = np.full(256, 4, dtype=np.uint8)
_CODE[np.frombuffer(b"ACGT", dtype=np.uint8)] = np.arange(4, dtype=np.uint8)
_VALID = np.zeros(256, dtype=bool)
_VALID[np.frombuffer(b"ACGTN", dtype=np.uint8)] = True
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class ReferenceIndex:
    """The reference records as arrays (row j = record j of the table), integer codes for masking (indexing the
    `*_names` vocabularies, -1: unknown or none; fold codes are the fold numbers) and the k-mer prefilter, a CSR
    posting matrix: `vocab[i]`'s references are `post_refs[post_ptr[i]:post_ptr[i + 1]]`, ascending; `n_kmers[j]`
    counts reference j's distinct sampled k-mers. Without a group column each record is its own group (its id)."""

    ids: np.ndarray
    sequences: np.ndarray
    species: np.ndarray
    taxonomy: dict[str, np.ndarray]
    species_names: np.ndarray
    genus_names: np.ndarray
    group_names: np.ndarray
    species_code: np.ndarray
    genus_code: np.ndarray
    fold_code: np.ndarray
    group_code: np.ndarray
    k: int
    sampling: int
    vocab: np.ndarray
    post_ptr: np.ndarray
    post_refs: np.ndarray
    n_kmers: np.ndarray

    @property
    def n_ref(self) -> int:
        return int(self.ids.size)

    def code_of(self, level: str, values: Any) -> np.ndarray:
        """Codes of values at one level (`fold`, `species`, `genus` or `group`); -1 for None/NaN/unknown values."""
        values = np.asarray(values, dtype=object).ravel()
        if level == "fold":
            return fold_codes(values)
        names = {"species": self.species_names, "genus": self.genus_names, "group": self.group_names}[level]
        return pd.Index(names).get_indexer(pd.Index(values, dtype=object)).astype(np.int32)

    def nbytes(self, with_sequences: bool = True) -> int:
        """Bytes of the prefilter arrays and codes, plus the sequence strings unless with_sequences=False."""
        arrays = (self.vocab, self.post_ptr, self.post_refs, self.n_kmers, self.species_code, self.genus_code,
                  self.fold_code, self.group_code)
        return sum(a.nbytes for a in arrays) + (sum(map(sys.getsizeof, self.sequences)) if with_sequences else 0)


@dataclass
class Exclusions:
    """What each query must not see: one value per query (or one for all) in the reference table's vocabulary (fold
    "0".."K-1", species, genus and group names); None, NaN or a value unknown to the index excludes nothing.
    `keep`: one record id per query that stays visible whatever else hides it (a species thinned to one record)."""

    fold: Any = None
    species: Any = None
    genus: Any = None
    group: Any = None
    keep: Any = None


@dataclass
class Hits:
    """Aligned hits, (n_queries, n) arrays sorted best first (identity descending, ties to the lower reference row).

    ref: row in the index (int64, -1 = empty slot); identity: matches / alignment columns without the terminal gaps
    (VSEARCH --iddef 2, N matches anything); coverage: (matches + mismatches) / query length (VSEARCH's qcov);
    overlap: the same over the shorter of the two sequences; columns: alignment columns without the terminal gaps
    (VSEARCH's alnlen); prefilter: shared sampled k-mers / the query's. An empty slot has NaN floats and 0 columns.
    """

    ref: np.ndarray
    identity: np.ndarray
    coverage: np.ndarray
    overlap: np.ndarray
    columns: np.ndarray
    prefilter: np.ndarray


def sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and the position of each one's first occurrence in the sorted array; np.unique is
    avoided: numpy 2.4's hash-based unique took 55 s on 14 M int64, sorting 0.3 s."""
    values = np.sort(values)
    first = np.flatnonzero(np.concatenate([[values.size > 0], values[1:] != values[:-1]]))
    return values[first], first


def check_bases(sequences: Sequence[str], what: str) -> None:
    """Raise ValueError when a sequence holds anything but upper-case A, C, G, T, N (clean it first)."""
    bad = np.flatnonzero(~_VALID[np.frombuffer("".join(sequences).encode(), dtype=np.uint8)])
    if bad.size:
        row = int(np.searchsorted(np.cumsum([len(s) for s in sequences]), bad[0], side="right"))
        raise ValueError(f"{what} {row} holds characters other than ACGTN; clean it with data.clean.check_sequence")


def kmer_pairs(sequences: Sequence[str], k: int, sampling: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sampled k-mers of each sequence: (sequence number, k-mer code), sorted by both, in one vectorised
    pass. Windows with an N, or across two sequences, are skipped; with sampling s > 1 a k-mer is kept when its
    64-bit multiplicative hash is divisible by s (FracMinHash: the same k-mers in every sequence)."""
    lengths = np.fromiter((len(x) for x in sequences), dtype=np.int64, count=len(sequences))
    codes = _CODE[np.frombuffer("".join(sequences).encode(), dtype=np.uint8)]  # uint8 + in-place ops: ~35 B/window
    n_win = codes.size - k + 1
    if n_win <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(sequences), dtype=np.int32), lengths)
    bad = np.concatenate([[0], np.cumsum(codes == 4, dtype=np.int32)])
    ok = (bad[k:] - bad[:-k] == 0) & (owner[:n_win] == owner[k - 1:])
    kmer = np.zeros(n_win, dtype=np.int64)
    for i in range(k):
        kmer <<= 2
        kmer |= codes[i:i + n_win] & 3
    if sampling > 1:
        ok &= ((kmer.view(np.uint64) * _MIX) >> np.uint64(32)) % np.uint64(sampling) == 0
    key = sorted_unique((owner[:n_win][ok].astype(np.int64) << (2 * k)) | kmer[ok])[0]
    return key >> (2 * k), key & ((1 << (2 * k)) - 1)


def _postings(sequences: np.ndarray, k: int, sampling: int) -> tuple[np.ndarray, ...]:
    """vocab, post_ptr, post_refs, n_kmers: k-mers in blocks of sequences, written into one (k-mer << 32 | reference)
    key array sized for every window (pages past the pairs found are never touched, so they cost no memory), then
    one in-place sort; the peak is about 12 bytes per (reference, k-mer) pair plus one block's temporaries."""
    bound = sum(max(len(s) - k + 1, 0) for s in sequences)
    key, filled, n_kmers = np.empty(max(bound, 1), dtype=np.int64), 0, []
    for start in range(0, len(sequences), BUILD_BLOCK):
        ref, kmer = kmer_pairs(list(sequences[start:start + BUILD_BLOCK]), k, sampling)
        part = key[filled:filled + ref.size]
        np.left_shift(kmer, 32, out=part)
        part |= ref + start
        filled += ref.size
        n_kmers.append(np.bincount(ref, minlength=min(BUILD_BLOCK, len(sequences) - start)))
    key = key[:filled]
    key.sort()
    post_refs = key.astype(np.int32)  # the low 32 bits, the reference: the cast truncates, no int64 temporary
    key >>= 32  # in place: the k-mer of each pair, sorted
    starts = np.flatnonzero(np.concatenate([[key.size > 0], key[1:] != key[:-1]]))
    vocab = key[starts]
    post_ptr = np.append(starts, post_refs.size).astype(np.int32 if post_refs.size < 2**31 else np.int64)
    return vocab.astype(np.int32), post_ptr, post_refs, np.concatenate(n_kmers).astype(np.int32)


def _text(values: Any) -> np.ndarray:
    """Object array of str, None where missing (None, NaN or an empty string); equal values share one str object
    (a genus repeated over 10^5 records costs a pointer per record, not a string)."""
    codes, names = pd.factorize(pd.Series([None if pd.isna(v) or str(v) == "" else str(v) for v in values],
                                          dtype=object))
    return np.append(np.asarray(names, dtype=object), None)[codes]


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct non-missing values and each entry's code into them (-1 where missing)."""
    codes, names = pd.factorize(pd.Series(values, dtype=object), sort=True)
    return np.asarray(names, dtype=object), codes.astype(np.int32)


def fold_codes(values: Any) -> np.ndarray:
    """Fold strings "0".."K-1" as integers; anything else (None, NaN, "test") -1."""
    values = np.asarray(values, dtype=object).ravel()
    return np.array([int(v) if isinstance(v, str) and v.isdigit() else -1 for v in values], dtype=np.int32)


def build_index(table: pd.DataFrame, k: int = 10, sampling: int = 2) -> ReferenceIndex:
    """Index the reference records: codes for masking and the posting lists of their sampled k-mers.

    Args:
        table: `id`, `sequence` (cleaned: upper-case ACGTN), `species`, any rank columns of `layout.RANKS`
            (without `genus` every genus code is -1), optional `fold` ("0".."K-1"; anything else -1) and optional
            `group` (missing: each record its own group, named by its id).
        k: k-mer length, 1-15 (10 matched VSEARCH best).
        sampling: keep 1 in this many k-mers (FracMinHash): memory and prefilter time fall by this factor.

    Returns:
        The ReferenceIndex, rows in table order.

    Raises:
        ValueError: a required column missing, an empty table, k or sampling out of range, an uncleaned sequence.
    """
    missing = [c for c in (C.ID, C.SEQUENCE, C.SPECIES) if c not in table.columns]
    if missing or not len(table) or not 1 <= k <= 15 or sampling < 1:
        raise ValueError(f"reference table: missing columns {missing}" if missing else
                         f"reference table: {len(table)} rows, k={k} (1-15), sampling={sampling} (>= 1)")
    ids, sequences, species = (np.array([str(v) for v in table[column]], dtype=object)
                               for column in (C.ID, C.SEQUENCE, C.SPECIES))
    check_bases(list(sequences), "reference")
    taxonomy = {rank: _text(table[rank]) for rank in C.RANKS if rank in table.columns}
    none = np.full(len(table), None, dtype=object)
    species_names, species_code = _codes(species)
    genus_names, genus_code = _codes(taxonomy.get("genus", none))
    groups = _text(table[C.GROUP]) if C.GROUP in table.columns else none
    group_names, group_code = _codes(np.where(pd.isna(groups), ids, groups))
    folds = fold_codes(table[C.FOLD].to_numpy()) if C.FOLD in table.columns else np.full(len(table), -1, np.int32)
    vocab, post_ptr, post_refs, n_kmers = _postings(sequences, k, sampling)
    index = ReferenceIndex(ids=ids, sequences=sequences, species=species, taxonomy=taxonomy,
                           species_names=species_names, genus_names=genus_names, group_names=group_names,
                           species_code=species_code, genus_code=genus_code, fold_code=folds, group_code=group_code,
                           k=k, sampling=sampling, vocab=vocab, post_ptr=post_ptr, post_refs=post_refs,
                           n_kmers=n_kmers)
    log.info("reference index: %d records, %d distinct k-mers, %.1f MB", len(ids), vocab.size, index.nbytes() / 1e6)
    return index


def _exclusion_codes(index: ReferenceIndex, exclude: Exclusions | None, n_queries: int) -> dict[str, np.ndarray]:
    """Per level given, each query's code to mask (-1: nothing)."""
    out = {}
    for level in ("fold", "species", "genus", "group"):
        if exclude is None or (values := getattr(exclude, level)) is None:
            continue
        codes = index.code_of(level, [values] * n_queries if np.ndim(values) == 0 else values)
        if codes.size != n_queries:
            raise ValueError(f"Exclusions.{level}: {codes.size} values for {n_queries} queries")
        out[level] = codes
    return out


def _kept_rows(index: ReferenceIndex, exclude: Exclusions | None, n_queries: int) -> np.ndarray | None:
    """Per query, the reference row it sees whatever hides it (-1: none); None when nothing is kept."""
    if exclude is None or exclude.keep is None:
        return None
    keep = pd.Index(index.ids).get_indexer(pd.Index(np.asarray(exclude.keep, dtype=object).ravel()))
    if keep.size != n_queries:
        raise ValueError(f"Exclusions.keep: {keep.size} values for {n_queries} queries")
    return keep


def top_n(score: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the columns of the n highest scores (higher first, ties: lower column first) and the scores."""
    (rows, cols), take = score.shape, min(n, score.shape[1])
    kth = np.partition(score, cols - take, axis=1)[:, cols - take, None]
    above, tied = score > kth, score == kth
    room = take - above.sum(axis=1, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room))
    idx = np.nonzero(keep)[1].reshape(rows, take)
    val = np.take_along_axis(score, idx, axis=1)
    order = np.argsort(-val, axis=1, kind="stable")
    idx, val = np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1)
    pad = ((0, 0), (0, n - take))  # slots beyond the number of columns: column -1, score -inf
    return np.pad(idx, pad, constant_values=-1), np.pad(val, pad, constant_values=-np.inf)


def candidates(index: ReferenceIndex, queries: Sequence[str], n: int = 16, exclude: Exclusions | None = None,
               chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The prefilter of `search` (same arguments): each query's n references sharing most of its sampled k-mers.

    Score = shared k-mers / the query's: VSEARCH's order (shared count). Excluded references are masked before the
    top n is taken; ties go to the lower row, as in VSEARCH. Returns (nq, n) int64 reference rows and float64
    scores; a slot without a reference that shares a k-mer is -1 / NaN."""
    queries = list(queries)
    check_bases(queries, "query")
    codes, keep = _exclusion_codes(index, exclude, len(queries)), _kept_rows(index, exclude, len(queries))
    chunk = chunk or max(8, min(MAX_CHUNK, CHUNK_CELLS // index.n_ref))
    # the posting matrix is made per call: keeping its data array (ones) would double the prefilter's memory
    posting = sp.csr_matrix((np.ones(index.post_refs.size, dtype=np.float32), index.post_refs, index.post_ptr),
                            shape=(index.vocab.size, index.n_ref))
    out_ref, out_score = [np.zeros((0, n), np.int64)], [np.zeros((0, n))]
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        block = queries[rows]
        row, kmer = kmer_pairs(block, index.k, index.sampling)
        col = np.minimum(np.searchsorted(index.vocab, kmer.astype(np.int32)), max(index.vocab.size - 1, 0))
        hit = index.vocab[col] == kmer if index.vocab.size else np.zeros(kmer.size, dtype=bool)
        qmat = sp.csr_matrix((np.ones(int(hit.sum()), np.float32), (row[hit], col[hit])),
                             shape=(len(block), index.vocab.size))
        n_q = np.bincount(row, minlength=len(block)).astype(np.float32)
        score = (qmat @ posting).toarray() / np.maximum(n_q, 1)[:, None]
        if codes:  # predict hides nothing: no mask to build
            hidden = np.zeros(score.shape, dtype=bool)
            for level, all_codes in codes.items():  # a query code of -1 becomes -2, which matches no reference
                part = np.where(all_codes[rows] >= 0, all_codes[rows], -2)
                hidden |= getattr(index, f"{level}_code")[None, :] == part[:, None]
            if keep is not None:
                at = np.flatnonzero(keep[rows] >= 0)
                hidden[at, keep[rows][at]] = False
            score[hidden] = -1.0
        ref, val = top_n(score, n)
        out_ref.append(np.where(val > 0, ref, -1).astype(np.int64))
        out_score.append(np.where(val > 0, val.astype(np.float64), np.nan))
    return np.concatenate(out_ref), np.concatenate(out_score)


def search(index: ReferenceIndex, queries: Sequence[str], n: int = 16, min_overlap: float = 0.3,
           exclude: Exclusions | None = None, chunk: int | None = None) -> Hits:
    """Prefilter then alignment: each query's best references by identity.

    Args:
        index: from `build_index` or `load_index`.
        queries: cleaned query sequences (ACGTN); an empty one, or one sharing no k-mer, gets an empty row.
        n: candidates aligned per query.
        min_overlap: a hit must align (matches + mismatches) this share of the shorter sequence: free end gaps
            otherwise let unrelated pairs "match" at 100 % over a few columns.
        exclude: references each query must not see (masked before the top n is taken).
        chunk: queries prefiltered at once (default: CHUNK_CELLS / n_ref); results do not depend on it.

    Returns:
        Hits, (len(queries), n) arrays sorted best first; a hit failing min_overlap or MIN_COLUMNS is an empty slot.

    Raises:
        ValueError: a query is not cleaned, or an Exclusions array has the wrong length.
    """
    queries = list(queries)
    ref, score = candidates(index, queries, n, exclude, chunk)
    ident, cover, over, cols = align_candidates(index.sequences, queries, ref)
    empty = (ref < 0) | (cols < MIN_COLUMNS) | ~(over >= min_overlap)
    ref, cols = np.where(empty, -1, ref), np.where(empty, 0, cols)
    ident, cover, over, score = (np.where(empty, np.nan, a) for a in (ident, cover, over, score))
    order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, ref), np.where(empty, np.inf, -ident)), axis=1)
    return Hits(*(np.take_along_axis(a, order, axis=1) for a in (ref, ident, cover, over, cols, score)))


def save_index(index: ReferenceIndex, path: Path) -> None:
    """Write the records as one zstd parquet file (id, sequence, species, rank columns), renamed into place.

    Neither the prefilter (`load_index` rebuilds it in seconds) nor folds and groups (deployment masks nothing)
    are written; nothing is pickled.
    """
    path = Path(path)
    columns = {C.ID: index.ids, C.SEQUENCE: index.sequences, C.SPECIES: index.species, **index.taxonomy}
    table = pa.table({name: pa.array(list(values), type=pa.string()) for name, values in columns.items()})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    publish_file(tmp, path)


def load_index(path: Path, k: int = 10, sampling: int = 2) -> ReferenceIndex:
    """Read a file written by `save_index` and rebuild its prefilter.

    Args:
        path: the parquet file (an artifact's `layout.REFERENCE_FILE`).
        k: as in `build_index`.
        sampling: as in `build_index`.

    Returns:
        The index: `search` gives the same hits as on the saved one (fold/group exclusions aside).
    """
    table = pq.read_table(Path(path), use_threads=False).to_pandas()  # one small file: threads only add buffers
    index = build_index(table, k=k, sampling=sampling)
    del table
    pa.default_memory_pool().release_unused()  # the decoded file's buffers: Arrow's pool keeps them otherwise
    return index
