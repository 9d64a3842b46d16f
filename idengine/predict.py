"""Step 15, predict: an exported model + a FASTA of any size -> one call per sequence, with Ray Data actors.

1. `iter_chunks` streams the FASTA (plain or gzip) in blocks of records and checks each record as `prepare` did
   (normalised with clean.py's rules, then empty / invalid characters / too short / too long / too many N). A bad
   record is kept with its reason; it never stops the job. Only a file that is not FASTA at all is fatal.
2. `PredictBatch` (a Ray Data `map_batches` callable run by an actor pool, one GPU per actor when the cluster has
   GPUs) loads the artifact once per actor and calls `predict_records` on the good records of each batch.
3. The driver writes calls to `out` (CSV, or parquet when `out` ends in .parquet) and bad records to
   `<out>.errors.csv` (id, record, reason, detail) as batches arrive, under temporary names renamed at the end.
Output columns: id, record (1-based position in the FASTA), length_bp, call, call_rank, confidence, then
top1_species, top1_prob ... topK_species, topK_prob (calibrated probabilities).
"""

from __future__ import annotations

import gzip
import logging
import os
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from idengine.calibrate import assign_calls
from idengine.columns import CONFIG_FILE
from idengine.config import DataConfig, PredictConfig, load_config
from idengine.data.clean import normalise_sequence
from idengine.data.load import GZIP_MAGIC, InputError
from idengine.export import load_artifact, verify_artifact

log = logging.getLogger(__name__)

CHUNK_RECORDS = 1024  # records per block read from the FASTA: memory stays flat whatever the file size
BATCHES_PER_CALL = 8  # forward batches per Ray Data batch: sorting by length within it cuts padding
ERRORS_SUFFIX = ".errors.csv"
ERROR_COLUMNS = ["id", "record", "reason", "detail"]
CHUNK_COLUMNS = ["id", "record", "sequence", "length_bp", "reason", "detail"]
_BOM = b"\xef\xbb\xbf"
_READ_ERRORS = (EOFError, OSError, zlib.error)  # what a truncated or corrupt gzip stream raises


def _open(path: Path):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def check_fasta_start(path: str | Path) -> None:
    """Refuse a file that cannot be FASTA at all (InputError: missing, empty, gzip corrupt from the start, or a first
    line that is not a '>' header); everything after the first header is checked per record instead."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; pass a FASTA or FASTA.gz file with --sequences")
    try:
        with _open(path) as stream:
            first = _first_line(stream)
    except _READ_ERRORS as err:
        raise InputError(f"{path}: the gzip stream is corrupt or truncated from the start ({err}); "
                         "check it with `gzip -t` and copy it again") from None
    if not first:
        raise InputError(f"{path}: the file is empty; expected FASTA records ('>id' lines, then sequence lines)")
    if not first.startswith(b">"):
        binary = b"\x00" in first or not _is_text(first)
        what = "binary data, not a FASTA file" if binary else f"text before the first '>' header ({first[:40]!r})"
        raise InputError(f"{path}: the file starts with {what}; expected FASTA (plain or gzip)")


def _first_line(stream, max_bytes: int = 1 << 16) -> bytes:
    """The first non-blank line (at most max_bytes of it), BOM removed; b"" for an empty file."""
    line = stream.readline(max_bytes).removeprefix(_BOM)
    while line and not line.strip():
        line = stream.readline(max_bytes)
    return line.strip()


def _is_text(raw: bytes) -> bool:
    return raw.decode("utf-8", errors="replace").encode("utf-8") == raw


def _iter_raw_records(path: Path) -> Iterator[tuple[bytes | None, list[bytes], str | None]]:
    """(header, sequence lines, read error) per record; a stream that breaks ends with its partial record."""
    header, lines = None, []
    with _open(path) as stream:
        try:
            for number, line in enumerate(stream):
                if number == 0:
                    line = line.removeprefix(_BOM)
                if line.startswith(b">"):
                    if header is not None:
                        yield header, lines, None
                    header, lines = line[1:], []
                elif header is not None:
                    lines.append(line)
        except _READ_ERRORS as err:
            yield header, lines, f"the file ends inside this record: truncated or corrupt gzip ({err})"
            return
    if header is not None:
        yield header, lines, None


def check_record(header: bytes, lines: list[bytes], cfg: DataConfig) -> tuple[str, str, str, str]:
    """(id, cleaned sequence, reason, detail) of one record; reason is "" for a record the model can score.

    Reasons: no_id, binary_data, empty_sequence, invalid_characters, too_short, too_long, too_many_n (the last five
    as in `idengine prepare`, with the thresholds the model was trained with).
    """
    words = header.decode("utf-8", errors="replace").split(None, 1)
    rid = words[0] if words else ""
    if not rid:
        return "", "", "no_id", "the header '>' has no id"
    raw = b"".join(lines)
    if b"\x00" in raw or not _is_text(raw):
        return rid, "", "binary_data", "the sequence lines hold bytes that are not text"
    seq, invalid, _flags = normalise_sequence(raw.decode("utf-8"))
    if invalid:
        return rid, "", "invalid_characters", f"not nucleotides/IUPAC/gaps: {''.join(sorted(invalid))[:20]!r}"
    if not seq:
        return rid, "", "empty_sequence", "no bases after the header"
    n_fraction = seq.count("N") / len(seq)
    for reason, bad, detail in (
        ("too_short", len(seq) < cfg.min_len_bp, f"{len(seq)} bp < min_len_bp={cfg.min_len_bp}"),
        ("too_long", len(seq) > cfg.max_len_bp, f"{len(seq)} bp > max_len_bp={cfg.max_len_bp}"),
        ("too_many_n", n_fraction > cfg.max_n_fraction, f"N fraction {n_fraction:.3f} > {cfg.max_n_fraction}"),
    ):
        if bad:
            return rid, "", reason, detail
    return rid, seq, "", ""


def iter_chunks(path: str | Path, cfg: DataConfig, chunk_records: int = CHUNK_RECORDS) -> Iterator[pd.DataFrame]:
    """Stream a FASTA as DataFrames of at most chunk_records rows: id, record, sequence, length_bp, reason, detail.

    Only a file that is not FASTA at all raises (InputError, see check_fasta_start); nothing else stops the stream.
    """
    path = Path(path)
    check_fasta_start(path)
    rows: list[tuple] = []
    for number, (header, lines, read_error) in enumerate(_iter_raw_records(path), start=1):
        if read_error is not None:
            rid = (header or b"").decode("utf-8", errors="replace").split(None, 1)
            rows.append((rid[0] if rid else "", number, "", 0, "truncated_file", read_error))
            log.warning("%s: %s", path, read_error)
        else:
            rid, seq, reason, detail = check_record(header, lines, cfg)
            rows.append((rid, number, seq, len(seq), reason, detail))
        if len(rows) >= chunk_records:
            yield pd.DataFrame(rows, columns=CHUNK_COLUMNS)
            rows = []
    if rows:
        yield pd.DataFrame(rows, columns=CHUNK_COLUMNS)


def predict_records(artifact, ids: list[str], sequences: list[str], top_k: int = 5,
                    batch_size: int = 64) -> pd.DataFrame:
    """Calls and top-k calibrated species probabilities for valid sequences, in-process (no Ray).

    Args:
        artifact: an `idengine.export.Artifact`.
        ids, sequences: record ids and their sequences (normalised here as in training; each must be usable).
        top_k: species written per record (at most the number of species).
        batch_size: sequences per forward pass.

    Returns:
        DataFrame: id, call, call_rank, confidence, top1_species, top1_prob, ... in input order.
    """
    probs = artifact.probabilities(list(sequences), batch_size=batch_size)
    return calls_frame(artifact, list(ids), probs, top_k)


def calls_frame(artifact, ids: list[str], probs: np.ndarray, top_k: int) -> pd.DataFrame:
    """The output rows for calibrated probabilities: the call (species, a higher rank or unassigned) and top-k."""
    labels = artifact.label_space
    fallback = artifact.config.calibrate.rank_fallback
    ranks = [r for r in reversed(labels.ranks)] if fallback else []
    calls = assign_calls(probs, labels.species, labels.taxonomy_table()[list(labels.ranks)], artifact.threshold,
                         ranks=ranks)
    k = min(top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    species = np.asarray(labels.species, dtype=object)
    out = {"id": ids, "call": calls["call"].to_numpy(), "call_rank": calls["rank"].to_numpy(),
           "confidence": calls["confidence"].to_numpy()}
    for j in range(k):
        out[f"top{j + 1}_species"] = species[top[:, j]]
        out[f"top{j + 1}_prob"] = probs[np.arange(len(ids)), top[:, j]]
    return pd.DataFrame(out)


def predict_frame(artifact, chunk: pd.DataFrame, top_k: int, batch_size: int = 64) -> pd.DataFrame:
    """Score the good rows of an `iter_chunks` block; bad rows pass through with their reason and no call."""
    good = chunk["reason"] == ""
    scored = predict_records(artifact, chunk.loc[good, "id"].tolist(), chunk.loc[good, "sequence"].tolist(),
                             top_k, batch_size)
    scored.index = chunk.index[good]
    # Even with no good row, `scored` has every column, so each block has the same schema.
    return chunk.drop(columns=["sequence"]).join(scored.drop(columns=["id"]))


class PredictBatch:
    """Ray Data callable: one artifact per actor (loaded once), then `predict_frame` on each batch.

    With output="logits" it returns {"row", "logits"} for batches of {"row", "sequence"} instead (final.py uses it).
    """

    def __init__(self, model_dir: str, top_k: int, batch_size: int, files: Any = None, output: str = "calls") -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if isinstance(files, ray.ObjectRef):
            files = ray.get(files)
        if files is not None:  # the artifact travelled through the object store: nodes need no shared disk
            model_dir = _materialise(files)
        # The driver verified every sha256; merged/ is never shipped, so it would read as missing here.
        self.artifact = load_artifact(model_dir, verify=False)
        self.top_k, self.batch_size, self.output = top_k, batch_size, output

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame | dict[str, np.ndarray]:
        if self.output == "logits":
            logits = self.artifact.logits(batch["sequence"].tolist(), self.batch_size)
            return {"row": batch["row"].to_numpy(), "logits": logits}
        return predict_frame(self.artifact, batch, self.top_k, self.batch_size)


def _artifact_files(model_dir: Path, limit_bytes: int = 1 << 30) -> dict[str, bytes] | None:
    """The files an actor needs (merged/ excluded), or None when they are too big to ship (read from disk then)."""
    files = [p for p in model_dir.rglob("*") if p.is_file() and p.relative_to(model_dir).parts[0] != "merged"]
    if sum(p.stat().st_size for p in files) > limit_bytes:
        return None
    return {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in files}


def _materialise(files: dict[str, bytes]) -> str:
    directory = Path(tempfile.mkdtemp(prefix="idengine-model-"))
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
    return str(directory)


class _Writer:
    """Appends calls (CSV or parquet) and bad records (CSV) under temporary names; `close` renames them."""

    def __init__(self, out: Path) -> None:
        self.out, self.errors, tag = out, out.with_name(out.name + ERRORS_SUFFIX), uuid.uuid4().hex[:8]
        self.tmp_out, self.tmp_errors = (out.with_name(f".{p.name}.{tag}.tmp") for p in (out, self.errors))
        self.parquet, self.n_calls, self.n_errors = out.suffix == ".parquet", 0, 0
        self.writer: pq.ParquetWriter | None = None
        self.columns: list[str] | None = None
        pd.DataFrame(columns=ERROR_COLUMNS).to_csv(self.tmp_errors, index=False)

    def write(self, block: pd.DataFrame) -> None:
        bad = block["reason"] != ""
        errors = block.loc[bad, ERROR_COLUMNS]
        errors.to_csv(self.tmp_errors, mode="a", header=False, index=False)
        calls = block.loc[~bad].drop(columns=["reason", "detail"])
        self.columns = self.columns or list(calls.columns)
        self.n_errors += len(errors)
        if calls.empty:  # nothing to append; an all-bad block would also give the parquet schema null types
            return
        calls = calls[self.columns]
        if self.parquet:
            table = pa.Table.from_pandas(calls, preserve_index=False)
            self.writer = self.writer or pq.ParquetWriter(self.tmp_out, table.schema)
            self.writer.write_table(table.cast(self.writer.schema))
        else:
            calls.to_csv(self.tmp_out, mode="a", header=self.n_calls == 0, index=False, float_format="%.6g")
        self.n_calls += len(calls)

    def close(self) -> None:
        if self.parquet and self.writer is None:
            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in self.columns or ["id"]}), self.tmp_out)
        elif self.writer is not None:
            self.writer.close()
        elif not self.tmp_out.exists():
            pd.DataFrame(columns=self.columns or ["id"]).to_csv(self.tmp_out, index=False)
        os.replace(self.tmp_errors, self.errors)
        os.replace(self.tmp_out, self.out)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for path in (self.tmp_out, self.tmp_errors):
            path.unlink(missing_ok=True)


class FastaDatasource(Datasource):
    """One read task that streams a FASTA through `iter_chunks` (a gzip stream cannot be split between tasks)."""

    def __init__(self, path: Path, cfg: DataConfig, chunk_records: int = CHUNK_RECORDS) -> None:
        super().__init__()
        self.path, self.cfg, self.chunk_records = path, cfg, chunk_records

    @property
    def supports_distributed_reads(self) -> bool:
        return False  # a local file: read it on the driver's node

    def estimate_inmemory_data_size(self) -> int | None:
        return self.path.stat().st_size
    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        path, cfg, chunk = self.path, self.cfg, self.chunk_records
        meta = BlockMetadata(num_rows=None, size_bytes=path.stat().st_size, exec_stats=None, input_files=(str(path),))
        return [ReadTask(lambda: iter_chunks(path, cfg, chunk), meta)]


def _actor_pool(cfg: PredictConfig) -> tuple[int, bool]:
    """(actors, one GPU each?): num_actors, or one per GPU of the cluster, or one per two CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if cfg.num_actors:
        return cfg.num_actors, gpus > 0
    return (gpus, True) if gpus else (max(1, int(resources.get("CPU", 1)) // 2), False)


def _predict_batches(ds: ray.data.Dataset, model_dir: Path, cfg: PredictConfig, output: str) -> ray.data.Dataset:
    """ds.map_batches(PredictBatch) on an actor pool; the artifact travels through the object store when small."""
    actors, use_gpu = _actor_pool(cfg)
    files = _artifact_files(model_dir)
    log.info("predict: %d actor(s)%s", actors, " with 1 GPU each" if use_gpu else "")
    return ds.map_batches(
        PredictBatch,
        fn_constructor_kwargs={"model_dir": str(model_dir.resolve()), "top_k": cfg.top_k, "output": output,
                               "batch_size": cfg.batch_size, "files": None if files is None else ray.put(files)},
        batch_size=cfg.batch_size * BATCHES_PER_CALL,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` is deprecated since Ray 2.51
        num_gpus=1 if use_gpu else None,
    )


def _ray_blocks(model_dir: Path, sequences: Path, data_cfg: DataConfig, cfg: PredictConfig) -> Iterator[pd.DataFrame]:
    ds = ray.data.read_datasource(FastaDatasource(sequences, data_cfg))
    ds.context.execution_options.preserve_order = True  # calls come out in FASTA order
    yield from _predict_batches(ds, model_dir, cfg, "calls").iter_batches(batch_format="pandas", batch_size=None)


def score_logits(model_dir: str | Path, sequences: list[str], cfg: PredictConfig, use_ray: bool = True) -> np.ndarray:
    """Raw (n, C) logits of valid sequences with an artifact, on the Ray Data actor pool or in this process."""
    if not use_ray or not sequences:
        return load_artifact(model_dir, verify=False, device=None).logits(list(sequences), cfg.batch_size)
    frame = pd.DataFrame({"row": np.arange(len(sequences)), "sequence": list(sequences)})
    ds = _predict_batches(ray.data.from_pandas(frame), Path(model_dir), cfg, "logits")
    rows, logits = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        rows.append(batch["row"])
        logits.append(batch["logits"])
    out = np.empty((len(sequences), logits[0].shape[1]), dtype=np.float32)
    out[np.concatenate(rows)] = np.concatenate(logits)
    return out


def _local_blocks(model_dir: Path, sequences: Path, data_cfg: DataConfig, cfg: PredictConfig) -> Iterator[pd.DataFrame]:
    artifact = load_artifact(model_dir, verify=False)
    for chunk in iter_chunks(sequences, data_cfg):
        yield predict_frame(artifact, chunk, cfg.top_k, cfg.batch_size)


def predict_file(model_dir: str | Path, sequences_path: str | Path, out_path: str | Path,
                 predict_cfg: PredictConfig, use_ray: bool = True) -> Path:
    """Identify every sequence of a FASTA (plain or gzip, any size) with an exported model.

    Args:
        model_dir: artifact directory written by `idengine train` (its files are checked against the manifest).
        sequences_path: FASTA or FASTA.gz.
        out_path: calls file, CSV (or parquet when it ends in .parquet); bad records go to `<out>.errors.csv`.
        predict_cfg: batch size, top-k, number of actors.
        use_ray: Ray Data actors (needs `ray.init()` first); False scores in this process (small files, tests).

    Returns:
        out_path as a Path; both files appear only when complete. Raises InputError when the sequences file is not
        FASTA at all, ValueError / FileNotFoundError for a bad artifact.
    """
    model_dir, sequences, out = Path(model_dir), Path(sequences_path), Path(out_path)
    verify_artifact(model_dir)
    data_cfg = load_config(model_dir / CONFIG_FILE).data
    check_fasta_start(sequences)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out)
    start = time.perf_counter()
    try:
        blocks = _ray_blocks if use_ray else _local_blocks
        for block in blocks(model_dir, sequences, data_cfg, predict_cfg):
            writer.write(block)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - start
    log.info("predict: %d records called, %d reported in %s, in %.1f s (%.0f records/s) -> %s", writer.n_calls,
             writer.n_errors, writer.errors.name, seconds, (writer.n_calls + writer.n_errors) / max(seconds, 1e-9), out)
    return out
