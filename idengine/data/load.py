"""Step 1b, load: the reference FASTA (`fasta.py`) + labels.csv (+ vectors.csv, clusters.csv) -> one table by id.

Accepted and normalised here: gzip (found by its magic bytes), a UTF-8 BOM, CRLF line endings. Rejected with
`InputError` (a message naming the file, the line or id, and what to do): an empty or binary file, a truncated gzip,
a CSV without an `id`/`species` column, duplicate ids and ids that do not match across files. The last two may
instead be dropped and counted (`DataConfig.drop_duplicate_ids`, `DataConfig.drop_unmatched_ids`). Cleaning the
bases is step 2 (`clean.py`); sequences are returned as read.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idengine import layout as C
from idengine.config import DataConfig
from idengine.data.fasta import GZIP_MAGIC, read_fasta
from idengine.errors import InputError, describe_ids

logger = logging.getLogger(__name__)

BOM = "\ufeff"
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "none", "null"})
"""Cell values (case-insensitive, stripped) read as missing in labels.csv: R and pandas write these for NA."""


def read_bytes(path: str | Path) -> tuple[bytes, bool]:
    """Read a file, decompressing it when it starts with the gzip magic bytes (whatever its extension).

    Args:
        path: file to read.

    Returns:
        The (decompressed) bytes, and whether the file was gzip.

    Raises:
        InputError: the file is missing, or a gzip stream is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path in the config (data.sequences / data.labels ...)")
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw, False
    try:
        return gzip.decompress(raw), True
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise InputError(
            f"{path}: the gzip stream is truncated or corrupt ({err}); copy or download the file again "
            "(check it with `gzip -t`)"
        ) from None


def decode_text(raw: bytes, path: str | Path) -> tuple[str, dict[str, int]]:
    """Decode UTF-8 text, removing a BOM and turning CRLF/CR line endings into LF.

    Args:
        raw: file content.
        path: the file's name, for messages.

    Returns:
        The text, and counts {"bom": 0/1, "crlf": number of CRLF or lone CR line ends}.

    Raises:
        InputError: NUL bytes or bytes that are not UTF-8 (a binary file), naming the line.
    """
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise InputError(
            f"{path}: binary data (a NUL byte) at line {line}; expected a text file (FASTA/CSV, plain or gzip)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(
            f"{path}: bytes that are not UTF-8 text at line {line} (byte {err.start}); expected a text file "
            "(FASTA/CSV, plain or gzip), saved as UTF-8"
        ) from None
    bom = int(text.startswith(BOM))
    text = text[bom:]
    crlf = text.count("\r")
    if crlf:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text, {"bom": bom, "crlf": crlf}


def read_table(path: str | Path, required: tuple[str, ...], role: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read a CSV (or TSV: `.tsv` name or a tab-separated header) as strings, column names stripped and lower-cased.

    Args:
        path: CSV file, plain or gzip.
        required: columns that must be present (after lower-casing).
        role: what the file is for (`labels`, `vectors`, ...), for messages.

    Returns:
        The table with every cell a stripped string, and counts {"bom", "crlf"}.

    Raises:
        InputError: empty or unparseable file, binary bytes, a required column missing.
    """
    raw, _ = read_bytes(path)
    if not raw.strip():
        raise InputError(f"{path}: the {role} file is empty; expected a header line with {', '.join(required)}")
    text, counts = decode_text(raw, path)
    header = text.lstrip().split("\n", 1)[0]
    if header.startswith(">"):
        setting = "data.folds_file" if role == "folds" else f"data.{role}"
        raise InputError(
            f"{path}: starts with a FASTA header ({header[:40]!r}): a FASTA file given as the {role} file "
            f"({setting}); expected a CSV with a header line such as '{','.join(required)}'"
        )
    sep = "\t" if str(path).endswith((".tsv", ".tsv.gz")) or ("\t" in header and "," not in header) else ","
    try:
        table = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(
            f"{path}: not a readable {role} CSV ({err}); check the quoting and the number of fields per line"
        ) from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(
            f"{path}: the {role} file has no {' or '.join(repr(m) for m in missing)} column "
            f"(columns found: {list(table.columns)}); add a header line such as '{','.join(required)}'"
        )
    table = table.apply(lambda col: col.str.strip())
    return table, counts


def duplicated_ids(ids: pd.Series) -> pd.Series:
    """Ids that occur more than once (every occurrence marked), as a boolean mask."""
    return ids.duplicated(keep=False)


def read_labels(path: str | Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read labels.csv: `id`, `species` and any rank columns of `columns.RANKS`; other columns are ignored.

    Missing-looking values ("", NA, NaN, None, null) become None in species and rank columns, so a record with an
    empty species is dropped later as `empty_species` rather than learned as a species named "NA".

    Args:
        path: labels CSV.

    Returns:
        DataFrame with id, species, and the rank columns found (in RANKS order), and counts {"bom", "crlf"}.

    Raises:
        InputError: see `read_table`.
    """
    table, counts = read_table(path, (C.ID, C.SPECIES), "labels")
    ranks = [r for r in C.RANKS if r in table.columns]
    table = table[[C.ID, C.SPECIES, *ranks]].copy()
    for col in (C.SPECIES, *ranks):
        table[col] = table[col].where(~table[col].str.lower().isin(MISSING_VALUES), None)
    return table, counts


def read_vectors(path: str | Path) -> pd.DataFrame:
    """Read vectors.csv: `id` plus numeric columns, renamed `vec_<name>` (float64).

    Raises:
        InputError: no id column, no numeric column, or a cell that is not a finite number (naming column and id).
    """
    table, _ = read_table(path, (C.ID,), "vectors")
    names = [c for c in table.columns if c != C.ID]
    if not names:
        raise InputError(f"{path}: the vectors file has only an id column; add numeric feature columns")
    out = pd.DataFrame({C.ID: table[C.ID]})
    for name in names:
        values = pd.to_numeric(table[name], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype="float64"))
        if bad.any():
            first = bad.nonzero()[0][0]
            raise InputError(
                f"{path}: column {name!r} has a value that is not a finite number ({table[name].iloc[first]!r}) "
                f"for id {table[C.ID].iloc[first]!r} ({int(bad.sum())} such cells); fill or remove them"
            )
        out[f"{C.VECTOR_PREFIX}{name}"] = values.astype("float64")
    return out


def read_clusters(path: str | Path) -> pd.DataFrame:
    """Read clusters.csv: `id`, `cluster` (any string). InputError without those columns or with an empty cluster."""
    table, _ = read_table(path, (C.ID, C.CLUSTER), "clusters")
    empty = table[C.CLUSTER] == ""
    if empty.any():
        raise InputError(f"{path}: empty cluster for {describe_ids(table.loc[empty, C.ID])}; give every id a cluster")
    return table[[C.ID, C.CLUSTER]].copy()


def _resolve_duplicates(table: pd.DataFrame, path: str | Path, drop: bool) -> tuple[pd.DataFrame, set[str]]:
    """Raise on duplicate ids, or (drop=True) remove every row of a duplicated id and return those ids."""
    mask = duplicated_ids(table[C.ID])
    if not mask.any():
        return table, set()
    dup_ids = table.loc[mask, C.ID]
    if not drop:
        raise InputError(
            f"{path}: duplicate ids (or duplicate FASTA headers) for {describe_ids(dup_ids)}; make ids unique, "
            "or set data.drop_duplicate_ids=true to drop every record of those ids"
        )
    logger.warning("%s: dropping %d rows of %d duplicated ids", path, int(mask.sum()), dup_ids.nunique())
    return table[~mask], set(dup_ids)


def _read_sides(cfg: DataConfig) -> tuple[list[tuple[str, str, pd.DataFrame, str]], dict[str, int]]:
    """The files joined to the sequences, as (role, path, table, drop reason for a record missing from it),
    and the labels file's text counts."""
    labels, label_counts = read_labels(cfg.labels)
    sides = [("labels", cfg.labels, labels, "no_label")]
    if cfg.vectors:
        sides.append(("vectors", cfg.vectors, read_vectors(cfg.vectors), "no_vector"))
    if cfg.clusters:
        sides.append(("clusters", cfg.clusters, read_clusters(cfg.clusters), "no_cluster"))
    return sides, label_counts


def load_barcodes(cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read the sequences and labels (and optional vectors/clusters) and join them by id, verifying alignment.

    A "record" is a FASTA record; every one is either returned or listed in `counts["dropped_rows"]`.

    Args:
        cfg: data settings (paths, `drop_duplicate_ids`, `drop_unmatched_ids`).

    Returns:
        The joined table (id, sequence as read, species, rank columns found, optional cluster, optional vec_*),
        in FASTA order, and counts: records_read, label_rows_read, normalised {gzip, bom, crlf, crlf_or_bom: files},
        dropped {reason: n} (reasons `duplicate_id`, `no_label`, `no_vector`, `no_cluster`), unmatched_rows
        {labels|vectors|clusters: rows whose id has no sequence}, dropped_rows (DataFrame id, reason, detail, with
        the unmatched rows under reasons `label_without_sequence` etc.) and ranks (rank columns found).

    Raises:
        InputError: any rejected input (see the module docstring), naming the file and the first offenders.
    """
    seqs, fasta_counts = read_fasta(cfg.sequences)
    sides, label_counts = _read_sides(cfg)
    n_read = len(seqs)
    dropped: list[tuple[str, str, str]] = []
    unmatched_dropped: list[tuple[str, str, str]] = []
    table, dups = _resolve_duplicates(seqs, cfg.sequences, cfg.drop_duplicate_ids)
    dropped.extend((i, "duplicate_id", f"id repeated in {Path(cfg.sequences).name}") for i in seqs[C.ID] if i in dups)
    unmatched: dict[str, int] = {}
    for role, path, side, reason in sides:
        side, side_dups = _resolve_duplicates(side, path, cfg.drop_duplicate_ids)
        hit = table[C.ID].isin(side_dups)
        dropped.extend((i, "duplicate_id", f"id repeated in {Path(path).name}") for i in table.loc[hit, C.ID])
        table = table[~hit]
        # rows of records already dropped (duplicate_id, or missing from an earlier file) are not unmatched rows
        side = side[side[C.ID].isin(table[C.ID]) | ~side[C.ID].isin(seqs[C.ID])]
        table, extra = _join_side(table, side, path, reason, cfg, dropped)
        unmatched[role] = len(extra)
        reason_extra = f"{role.rstrip('s')}_without_sequence"  # label_without_sequence, ...
        unmatched_dropped.extend((i, reason_extra, f"row in {Path(path).name}") for i in extra)
    reasons = pd.Series([r for _, r, _ in dropped], dtype=object).value_counts()
    counts: dict[str, Any] = {
        "records_read": n_read,
        "label_rows_read": int(len(sides[0][2])),
        "normalised": {  # files (of sequences and labels) that needed it
            "gzip": fasta_counts.gzip,
            "bom": fasta_counts.bom + label_counts["bom"],
            "crlf": int(fasta_counts.crlf > 0) + int(label_counts["crlf"] > 0),
            "crlf_or_bom": int(fasta_counts.bom > 0 or fasta_counts.crlf > 0)
            + int(label_counts["bom"] > 0 or label_counts["crlf"] > 0),
        },
        "dropped": {str(k): int(v) for k, v in reasons.items()},
        "unmatched_rows": unmatched,
        "dropped_rows": pd.DataFrame(dropped + unmatched_dropped, columns=[C.ID, "reason", "detail"], dtype=object),
        "ranks": [r for r in C.RANKS if r in sides[0][2].columns],
    }
    return table.reset_index(drop=True), counts


def _join_side(
    table: pd.DataFrame,
    side: pd.DataFrame,
    path: str | Path,
    reason: str,
    cfg: DataConfig,
    dropped: list[tuple[str, str, str]],
) -> tuple[pd.DataFrame, list[str]]:
    """Inner-join one side file on id; mismatches raise, or (drop_unmatched_ids) are dropped and returned."""
    in_side = table[C.ID].isin(side[C.ID])
    extra = side.loc[~side[C.ID].isin(table[C.ID]), C.ID].tolist()
    if (not in_side.all() or extra) and not cfg.drop_unmatched_ids:
        parts = []
        if not in_side.all():
            parts.append(f"{describe_ids(table.loc[~in_side, C.ID])} of {cfg.sequences} are missing from {path}")
        if extra:
            parts.append(f"{describe_ids(extra)} of {path} have no sequence in {cfg.sequences}")
        raise InputError(
            f"ids do not match across files: {'; '.join(parts)}. Fix the files, or set data.drop_unmatched_ids=true "
            "to drop them (they are counted in the report)"
        )
    dropped.extend((i, reason, f"id not in {Path(path).name}") for i in table.loc[~in_side, C.ID])
    joined = table[in_side].merge(side, on=C.ID, how="left", validate="one_to_one")
    return joined, extra
