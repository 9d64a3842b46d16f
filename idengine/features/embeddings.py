"""Step 6c, embeddings: a frozen backbone's pooled embeddings of every prepared record, computed once with Ray Data.

`embed_table` runs the frozen backbone (`models/transformer.load_backbone`) over the cached token table with Ray Data
actors (one per GPU, else one per two CPUs) and caches one pooled vector per record as parquet
(`models/inference.embed_rows`, `mean` or `cls` pooling). The probe (`models/probe.py`) trains its heads on them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from idengine import layout as C
from idengine.config import TINY_BACKBONE, Config
from idengine.config_io import config_from_dict, config_to_dict
from idengine.features.cache import read_cache, write_cache
from idengine.features.tokens import cache_key, tokenized_table
from idengine.models.inference import autocast_dtype_for, embed_rows, length_sorted_batches
from idengine.models.tiny import TINY_SEED, tiny_config
from idengine.models.transformer import load_backbone

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the embedding computation changes, so old caches are not read
ROWS_PER_CALL = 512
"""Records per Ray Data block / actor call; each call runs forwards of `predict.batch_size` length-sorted rows."""


class EmbedBatch:
    """Ray Data callable: loads the frozen backbone once per actor, then embeds batches of token ids."""

    def __init__(self, config: dict, pooling: str, threads: int) -> None:
        cfg = config_from_dict(config)
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_backbone(cfg.model).to(self.device)
        self.autocast_dtype = autocast_dtype_for(cfg.train.precision, self.device)
        self.batch_size, self.pooling = cfg.predict.batch_size, pooling

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        vectors = embed_rows(self.model, list(batch[C.INPUT_IDS]), self.batch_size, self.pooling, self.device,
                             self.autocast_dtype)
        flat = pa.array(vectors.ravel(), type=pa.float32())
        return pa.table({C.ID: pa.array(batch[C.ID], type=pa.string()),
                         C.EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def embedding_cache_key(prepared_dir: str | Path, config: Config, use_gpu: bool) -> str:
    """Hash of the token cache key, the backbone (the tiny config and seed, a local dir's file sizes and times, or a
    hub id), its revision, the pooling and the numeric precision."""
    m, path = config.model, Path(config.model.backbone)
    if m.backbone == TINY_BACKBONE:
        weights = f"tiny:{TINY_SEED}:{tiny_config().to_json_string()}"
    elif path.is_dir():
        weights = str(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
    else:
        weights = f"hub:{m.backbone}"
        if m.revision is None:
            log.warning("backbone %s has no pinned revision: its embedding cache cannot see a new upload", m.backbone)
    precision = f"gpu-{config.train.precision}" if use_gpu else "cpu-fp32"
    parts = [cache_key(Path(prepared_dir) / C.RECORDS_FILE, config),
             m.backbone, weights, str(m.revision), m.pooling, precision, str(CACHE_VERSION)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def embed_table(prepared_dir: str | Path, config: Config) -> pa.Table:
    """Pooled frozen-backbone embeddings of every record of a prepared directory, from the cache or computed now.

    Args:
        prepared_dir: output of `idengine prepare`.
        config: backbone, revision, max_tokens (through the token table), pooling, precision, predict.batch_size.

    Returns:
        Columns id, label, fold, embedding (fixed_size_list<float32>[hidden]), in the order of records.parquet.
    """
    import ray

    prepared_dir = Path(prepared_dir)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if ray.is_initialized() else torch.cuda.is_available()
    cache_dir = prepared_dir / C.EMBEDDINGS_DIR / embedding_cache_key(prepared_dir, config, use_gpu)
    cached = read_cache(cache_dir, C.EMBEDDINGS_FILE)
    if cached is not None:
        return cached
    tokens = tokenized_table(prepared_dir, config)
    start = time.time()
    vectors = _embed_with_ray(tokens, config)
    seconds = time.time() - start
    table = pa.table({C.ID: tokens.column(C.ID), C.LABEL: tokens.column(C.LABEL), C.FOLD: tokens.column(C.FOLD),
                      C.EMBEDDING: vectors})
    meta = {"rows": table.num_rows, "dim": vectors.type.list_size, "backbone": config.model.backbone,
            "revision": config.model.revision, "pooling": config.model.pooling, "gpu": use_gpu,
            "seconds": round(seconds, 2), "seqs_per_s": round(table.num_rows / max(seconds, 1e-9), 1)}
    write_cache(table, cache_dir, C.EMBEDDINGS_FILE, meta)
    log.info("embedded %d records with %s in %.1f s (%.0f seqs/s, Ray start-up included) -> %s",
             table.num_rows, config.model.backbone, seconds, meta["seqs_per_s"], cache_dir)
    return table


def _embed_with_ray(tokens: pa.Table, config: Config) -> pa.FixedSizeListArray:
    """Run EmbedBatch over length-sorted blocks of the token table; vectors come back in the token table's order."""
    import ray

    resources = ray.cluster_resources()  # one actor per GPU, else one per two CPUs running 2 torch threads
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    actors, use_gpu, threads = (gpus, True, 0) if gpus else (max(1, cpus // 2), False, 2)
    rows = tokens.select([C.ID, C.INPUT_IDS])
    blocks = [rows.take(pa.array(idx))
              for idx in length_sorted_batches(np.asarray(tokens.column(C.N_TOKENS)), ROWS_PER_CALL)]
    log.info("embedding %d records on %d actor(s)%s", tokens.num_rows, actors, " with 1 GPU each" if use_gpu else "")
    ds = ray.data.from_arrow(blocks).map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"config": config_to_dict(config), "pooling": config.model.pooling,
                               "threads": threads},
        batch_size=ROWS_PER_CALL,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=1 if use_gpu else None,
    )
    done = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    position = pd.Index(done.column(C.ID).to_pylist()).get_indexer(tokens.column(C.ID).to_pylist())
    if (position < 0).any() or done.num_rows != tokens.num_rows:
        raise RuntimeError(f"embedding returned {done.num_rows} rows for {tokens.num_rows} records")
    return done.column(C.EMBEDDING).combine_chunks().take(pa.array(position))


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The embedding column of an embed_table result as an (n, hidden) float32 array."""
    column = table.column(C.EMBEDDING).combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(table.num_rows, column.type.list_size)


def record_embeddings(prepared_dir: str | Path, config: Config, records: pd.DataFrame) -> np.ndarray:
    """(len(records), hidden) embeddings of `records` (rows of the prepared directory), in their order.

    Raises:
        ValueError: the embedding cache lacks some of the records.
    """
    table = embed_table(prepared_dir, config)
    position = pd.Index(table.column(C.ID).to_pylist()).get_indexer(records[C.ID])
    if (position < 0).any():
        raise ValueError(f"{prepared_dir}: embeddings lack {int((position < 0).sum())} records; delete "
                         f"{Path(prepared_dir) / C.EMBEDDINGS_DIR} and run again")
    return embedding_matrix(table)[position]
