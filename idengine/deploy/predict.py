"""Step 12, predict: an exported model + a FASTA of any size -> one call per sequence, with Ray Data actors.

1. `iter_chunks` streams the FASTA (`data/fasta.py`) in blocks of records and checks each record as `prepare` did
   (`data/clean.check_sequence`, with the thresholds the model was trained with). A bad record is kept with its
   reason; it never stops the job. Only a file that is not FASTA at all is fatal.
2. `PredictBatch` (a Ray Data `map_batches` callable run by an actor pool, one GPU per actor when the cluster has
   GPUs) loads the artifact once per actor and calls `Artifact.call_chunk` on the good records of each batch.
3. The driver writes calls to `out` (CSV, or parquet when `out` ends in .parquet) and bad records to
   `<out>.errors.csv` (id, record, reason, detail) as batches arrive, under temporary names renamed at the end, and
   logs progress (records done, records/s) every PROGRESS_SECONDS. A killed run leaves only hidden temporaries, which
   the next run removes; a full disk or file-size limit stops it with an InputError naming `out`, nothing written.
Output columns: id, record (1-based position in the FASTA), length_bp, then the artifact's call columns
(`deploy/artifact.py`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from idengine import layout as L
from idengine.config import DataConfig, PredictConfig
from idengine.config_io import load_config
from idengine.data.clean import check_sequence
from idengine.data.fasta import check_fasta_start, iter_fasta
from idengine.deploy.artifact import CHUNK_COLUMNS, ERROR_COLUMNS, load_artifact, verify_artifact
from idengine.errors import InputError
from idengine.storage import out_of_space, publish_file, remove_stale_temps, temp_path

log = logging.getLogger(__name__)

CHUNK_RECORDS = 1024  # records per block read from the FASTA: memory stays flat whatever the file size
BATCHES_PER_CALL = 8  # forward batches per Ray Data batch: sorting by length within it cuts padding
PROGRESS_SECONDS = 10.0  # a progress line at most this often
READ_AHEAD_BYTES = 64 << 20
"""Object-store memory the predict dataset may hold. Without a cap, Ray Data reads the whole query file into the
object store ahead of the actors (its default budget is a share of the store: gigabytes); with it, the reader waits."""


def iter_chunks(path: str | Path, cfg: DataConfig, chunk_records: int = CHUNK_RECORDS) -> Iterator[pd.DataFrame]:
    """Stream a FASTA as DataFrames of at most chunk_records rows: id, record, sequence, length_bp, reason, detail.

    Only a file that is not FASTA at all raises (InputError, see `data.fasta.check_fasta_start`); a bad record is
    a row with its reason (no_id, binary_data, truncated_file, or a `check_sequence` reason).
    """
    rows: list[tuple] = []
    for record in iter_fasta(path):
        if record.problem:
            rows.append((record.id, record.number, "", 0, record.problem, record.detail))
            if record.problem == "truncated_file":
                log.warning("%s: %s", path, record.detail)
        else:
            seq, reason, detail = check_sequence(record.sequence, cfg)
            rows.append((record.id, record.number, "" if reason else seq, 0 if reason else len(seq), reason, detail))
        if len(rows) >= chunk_records:
            yield pd.DataFrame(rows, columns=CHUNK_COLUMNS)
            rows = []
    if rows:
        yield pd.DataFrame(rows, columns=CHUNK_COLUMNS)


class PredictBatch:
    """Ray Data callable: one artifact per actor (loaded once), then `Artifact.call_chunk` on each batch."""

    def __init__(self, model_dir: str, top_k: int, batch_size: int, files: Any = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if isinstance(files, ray.ObjectRef):
            files = ray.get(files)
        if files is not None:  # the artifact travelled through the object store: nodes need no shared disk
            model_dir = _materialise(files)
        # The driver verified every sha256; merged/ is never shipped, so it would read as missing here.
        self.artifact = load_artifact(model_dir, verify=False)
        self.top_k, self.batch_size = top_k, batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.artifact.call_chunk(batch, self.top_k, self.batch_size)


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
        self.out, self.errors = out, out.with_name(out.name + L.ERRORS_SUFFIX)
        for path in (self.out, self.errors):
            remove_stale_temps(path)  # a killed run's temporaries (a run still going keeps its own)
        self.tmp_out, self.tmp_errors = temp_path(self.out), temp_path(self.errors)
        self.parquet, self.n_calls, self.n_errors = out.suffix == ".parquet", 0, 0
        self.first_errors: list[tuple[str, str]] = []  # (id, reason) of the first bad records, for a message
        self.writer: pq.ParquetWriter | None = None
        self.columns: list[str] | None = None
        try:
            pd.DataFrame(columns=ERROR_COLUMNS).to_csv(self.tmp_errors, index=False)
        except BaseException:
            self.tmp_errors.unlink(missing_ok=True)
            raise

    def write(self, block: pd.DataFrame) -> None:
        bad = block["reason"] != ""
        errors = block.loc[bad, ERROR_COLUMNS]
        errors.to_csv(self.tmp_errors, mode="a", header=False, index=False)
        calls = block.loc[~bad].drop(columns=["reason", "detail"])
        self.columns = self.columns or list(calls.columns)
        self.n_errors += len(errors)
        self.first_errors += list(zip(errors["id"], errors["reason"]))[:5 - len(self.first_errors)]
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
        publish_file(self.tmp_errors, self.errors)
        publish_file(self.tmp_out, self.out)

    def abort(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError:  # e.g. the disk is full: the temporaries go anyway
            pass
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


def call_blocks(ds: ray.data.Dataset, model_dir: Path, cfg: PredictConfig) -> Iterator[pd.DataFrame]:
    """Calls of a dataset of `iter_chunks` rows on an actor pool, in order; the artifact travels through the object
    store when small, so worker nodes need no shared disk."""
    actors, use_gpu = _actor_pool(cfg)
    files = _artifact_files(model_dir)
    log.info("predict: %d actor(s)%s", actors, " with 1 GPU each" if use_gpu else "")
    options = ds.context.execution_options
    options.preserve_order = True  # calls come out in input order
    options.resource_limits = options.resource_limits.copy(object_store_memory=READ_AHEAD_BYTES)
    calls = ds.map_batches(
        PredictBatch,
        fn_constructor_kwargs={"model_dir": str(model_dir.resolve()), "top_k": cfg.top_k,
                               "batch_size": cfg.batch_size, "files": None if files is None else ray.put(files)},
        batch_size=cfg.batch_size * BATCHES_PER_CALL,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` is deprecated since Ray 2.51
        num_gpus=1 if use_gpu else None,
    )
    yield from calls.iter_batches(batch_format="pandas", batch_size=None)


def _ray_blocks(model_dir: Path, sequences: Path, data_cfg: DataConfig, cfg: PredictConfig) -> Iterator[pd.DataFrame]:
    yield from call_blocks(ray.data.read_datasource(FastaDatasource(sequences, data_cfg)), model_dir, cfg)


def _local_blocks(model_dir: Path, sequences: Path, data_cfg: DataConfig, cfg: PredictConfig) -> Iterator[pd.DataFrame]:
    artifact = load_artifact(model_dir, verify=False)
    for chunk in iter_chunks(sequences, data_cfg, CHUNK_RECORDS):
        yield artifact.call_chunk(chunk, cfg.top_k, cfg.batch_size)


def _refuse_if_nothing_usable(writer: _Writer, sequences: Path) -> None:
    """A file none of whose records is a usable nucleotide sequence is not a query file: say so, write nothing."""
    if writer.n_calls or not writer.n_errors:
        return
    reasons = pd.Series([r for _, r in writer.first_errors]).value_counts()
    shown = ", ".join(repr(i) for i, _ in writer.first_errors)
    hint = "; is this a protein FASTA?" if "invalid_characters" in reasons.index else ""
    raise InputError(f"{sequences}: none of the {writer.n_errors} records is a usable nucleotide sequence "
                     f"({', '.join(f'{n} {r}' for r, n in reasons.items())} among the first: {shown}){hint} "
                     "Nothing was written; pass a FASTA of DNA/RNA barcodes")


class _Progress:
    """Logs records done and records/s (over the last interval and since the start) every `every_s` seconds."""

    def __init__(self, every_s: float | None = None) -> None:
        self.every_s, self.start = PROGRESS_SECONDS if every_s is None else every_s, time.perf_counter()
        self.last_time, self.last_done = self.start, 0

    def update(self, writer: _Writer) -> None:
        now, done = time.perf_counter(), writer.n_calls + writer.n_errors
        if now - self.last_time < self.every_s:
            return
        log.info("predict: %d records done (%d called, %d not usable), %.0f records/s (%.0f since the start)", done,
                 writer.n_calls, writer.n_errors, (done - self.last_done) / max(now - self.last_time, 1e-9),
                 done / max(now - self.start, 1e-9))
        self.last_time, self.last_done = now, done


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
        FASTA at all or the disk fills up (or a file passes the size limit), ValueError / FileNotFoundError for a bad
        artifact.
    """
    model_dir, sequences, out = Path(model_dir), Path(sequences_path), Path(out_path)
    verify_artifact(model_dir)
    data_cfg = load_config(model_dir / L.CONFIG_FILE).data
    check_fasta_start(sequences)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer, progress = None, _Progress()
    try:
        writer = _Writer(out)
        blocks = _ray_blocks if use_ray else _local_blocks
        for block in blocks(model_dir, sequences, data_cfg, predict_cfg):
            writer.write(block)
            progress.update(writer)
        _refuse_if_nothing_usable(writer, sequences)
        writer.close()
    except BaseException as err:
        if writer is not None:
            writer.abort()
        raise out_of_space(err, out) or err
    seconds = time.perf_counter() - progress.start
    log.info("predict: %d records called, %d reported in %s, in %.1f s (%.0f records/s) -> %s", writer.n_calls,
             writer.n_errors, writer.errors.name, seconds, (writer.n_calls + writer.n_errors) / max(seconds, 1e-9), out)
    return out
