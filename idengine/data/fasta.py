"""Step 1a, FASTA: one streaming reader (Biopython's parser) for reference files and query files of any size.

The file may be plain or gzip (found by its magic bytes, whatever its name), start with a UTF-8 BOM, use CRLF line
ends and wrap its sequence lines. `iter_fasta` yields every record with the problem that makes it unusable, if any
(no id, binary bytes, the file ending inside it), and never stops on a bad record: `idengine predict` reports such
records and goes on, while `read_fasta` (a reference set for `idengine prepare`) refuses the file, naming the record.
Only a file that cannot be FASTA at all (missing, empty, corrupt from the start, text before the first header) stops
either with `InputError`. What the bases may be is step 2 (`clean.py`).
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from Bio.SeqIO.FastaIO import SimpleFastaParser

from idengine.errors import InputError
from idengine.layout import ID, SEQUENCE

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
READ_ERRORS = (EOFError, OSError, zlib.error)
"""What a truncated or corrupt gzip stream raises while it is read."""
_BINARY = re.compile("[\x00\udc80-\udcff]")
"""A NUL, or a byte that is not UTF-8 (kept as a lone surrogate by errors="surrogateescape")."""


@dataclass(frozen=True)
class FastaRecord:
    """One record as read: its 1-based position, the line of its header, its id and its sequence lines joined."""

    number: int
    line: int
    id: str
    sequence: str
    problem: str = ""
    """`""`, or `no_id`, `binary_data` or `truncated_file`: why the record cannot be used."""
    detail: str = ""


@dataclass
class TextCounts:
    """What reading normalised: gzip, a BOM, CRLF or CR line ends (1 when the file had it)."""

    gzip: int = 0
    bom: int = 0
    crlf: int = 0


def open_binary(path: str | Path):
    """A binary stream of the file's content, decompressed when it starts with the gzip magic bytes."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


class _Lines:
    """Text lines of a binary stream (universal newlines, BOM removed), counting them and remembering the last header,
    so a record can be named by its line and a stream that breaks can name the record it broke in."""

    def __init__(self, stream) -> None:
        head = stream.peek(3)[:3] if hasattr(stream, "peek") else b""
        self.bom = int(head.startswith(BOM))
        # surrogateescape: undecodable bytes survive as lone surrogates, found per record instead of stopping the file
        self.text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=None)
        self.number, self.header_line, self.header = 0, 0, ""
        # [header line, first line with binary bytes or 0] of records not yet yielded (the parser reads one ahead)
        self.pending: deque[list[int]] = deque()

    def __iter__(self) -> Iterator[str]:
        for line in self.text:
            self.number += 1
            if line.startswith(">"):
                self.header_line, self.header = self.number, line[1:].strip()
                self.pending.append([self.number, 0])
            if self.pending and not self.pending[-1][1] and _BINARY.search(line):
                self.pending[-1][1] = self.number
            yield line

    @property
    def crlf(self) -> int:
        seen = self.text.newlines
        seen = (seen,) if isinstance(seen, str) else (seen or ())
        return int(any(n != "\n" for n in seen))


def check_fasta_start(path: str | Path) -> None:
    """Refuse a file that cannot be FASTA at all: missing, empty, a gzip stream corrupt from the start, binary data,
    or text before the first '>' header (Biopython would skip that text silently).

    Raises:
        InputError: naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path (data.sequences in the config, or --sequences)")
    try:
        with open_binary(path) as stream:
            first, number = _first_line(stream)
    except READ_ERRORS as err:
        raise InputError(f"{path}: the gzip stream is truncated or corrupt ({err}); copy the file again "
                         "(check it with `gzip -t`)") from None
    if not first:
        raise InputError(f"{path}: the file is empty; expected FASTA records ('>id' lines followed by sequence lines)")
    if not first.startswith(b">"):
        if b"\x00" in first or not _is_text(first):
            raise InputError(f"{path}: binary data at line {number}, not a FASTA file; expected FASTA text "
                             "(plain or gzip)")
        text = first[:40].decode("utf-8", errors="replace")
        hint = "is this a CSV given as the sequences?" if "," in text or "\t" in text else \
            "a sequence line without its header?"
        raise InputError(f"{path}: line {number} has text before the first '>' header ({text!r}); every "
                         f"FASTA record must start with a '>id' line ({hint})")


def _first_line(stream, max_bytes: int = 1 << 16) -> tuple[bytes, int]:
    """The first non-blank line (at most max_bytes of it, BOM removed) and its number; b"" for an empty file."""
    number, line = 1, stream.readline(max_bytes).removeprefix(BOM)
    while line and not line.strip():
        number, line = number + 1, stream.readline(max_bytes)
    return line.strip(), number


def _is_text(raw: bytes) -> bool:
    return raw.decode("utf-8", errors="replace").encode("utf-8") == raw


def _record(number: int, lines: tuple[int, int], title: str, sequence: str) -> FastaRecord:
    header_line, binary_line = lines
    words = title.split(None, 1)
    rid = words[0] if words else ""
    if not rid:
        return FastaRecord(number, header_line, "", "", "no_id", "the header '>' has no id")
    if binary_line:
        return FastaRecord(number, header_line, rid, "", "binary_data",
                           f"line {binary_line} holds bytes that are not text (a binary file?)")
    return FastaRecord(number, header_line, rid, sequence)


def iter_fasta(path: str | Path, counts: TextCounts | None = None) -> Iterator[FastaRecord]:
    """Every record of a FASTA file, in file order, each with its problem (if any); the stream never stops early.

    Args:
        path: FASTA or FASTA.gz; `check_fasta_start` is applied first.
        counts: filled with what reading normalised (gzip, BOM, CRLF), once the stream is exhausted.

    Yields:
        FastaRecord per record; a gzip stream that breaks ends with a `truncated_file` record for the record it
        broke in.
    """
    check_fasta_start(path)
    number = 0
    with open_binary(path) as stream:
        lines = _Lines(stream)
        try:
            for title, sequence in SimpleFastaParser(lines):
                number += 1
                yield _record(number, tuple(lines.pending.popleft()), title, sequence)
        except READ_ERRORS as err:
            rid = (lines.header.split() or [""])[0]
            yield FastaRecord(number + 1, lines.header_line, rid, "", "truncated_file",
                              f"the file ends inside this record: truncated or corrupt gzip ({err})")
        if counts is not None:
            counts.gzip, counts.bom, counts.crlf = int(isinstance(stream, gzip.GzipFile)), lines.bom, lines.crlf


def read_fasta(path: str | Path) -> tuple[pd.DataFrame, TextCounts]:
    """Read a reference FASTA whole: ids and sequences as read (wrapped lines joined, nothing else changed).

    An empty record (a header with no sequence) is returned with an empty sequence: cleaning drops it as
    `empty_sequence`, counted by id, rather than stopping the run.

    Returns:
        DataFrame with `id` and `sequence` in file order, and what reading normalised.

    Raises:
        InputError: the file cannot be FASTA (see check_fasta_start), or a record has no id, binary bytes or is cut
            off by a truncated gzip stream (naming the record and its line).
    """
    counts, ids, sequences = TextCounts(), [], []
    for record in iter_fasta(path, counts):
        if record.problem:
            what = f"record {record.number}" + (f" ({record.id!r})" if record.id else "")
            raise InputError(f"{path}: {what} at line {record.line}: {record.detail}; fix or remove it "
                             "(expected '>id' lines followed by nucleotide lines)")
        ids.append(record.id)
        sequences.append(record.sequence)
    log.info("read %d FASTA records from %s", len(ids), path)
    return pd.DataFrame({ID: ids, SEQUENCE: sequences}, dtype=object), counts
