"""Step 10a, embed: a frozen backbone's pooled embeddings of every prepared record, computed once with Ray Data.

`embed_table` runs the frozen backbone over the cached token table with Ray Data actors (one per GPU, else one per two
CPUs) and caches one pooled vector per record as parquet: `mean`, the last hidden states averaged over the sequence's
tokens (padding and CLS excluded), or `cls`. The probe (`probe.py`) trains its heads on them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from idengine import columns as C
from idengine.config import TINY_BACKBONE, Config, ModelConfig, config_from_dict, config_to_dict

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
EMBEDDINGS_DIR = "embeddings"
CACHE_VERSION = 1  # bump when the embedding computation changes, so old caches are not read
ROWS_PER_CALL = 512
"""Records per Ray Data block / actor call; each call runs forwards of `predict.batch_size` length-sorted rows."""
_DONE = "_COMPLETE.json"


def load_backbone(model_cfg: ModelConfig) -> nn.Module:
    """The backbone (`tiny`, a hub id or a local checkpoint dir) without any head: an EsmModel for NT checkpoints,
    frozen, in eval mode, fp32 on the CPU."""
    from idengine.model import PICKLE_TRUSTED_BACKBONES, _tiny_masked_lm

    if model_cfg.backbone == TINY_BACKBONE:
        model = _tiny_masked_lm().esm  # the same TINY_SEED weights build_model starts from
    else:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(
            model_cfg.backbone, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=model_cfg.backbone not in PICKLE_TRUSTED_BACKBONES, dtype=torch.float32,
            add_pooling_layer=False,  # ESM's pooler is untrained in NT checkpoints; we pool ourselves
        )
    model.requires_grad_(False)
    return model.eval()


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, L, H) last hidden states -> (B, H): mean over real tokens after CLS (position 0), or the CLS state."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.clone()
    mask[:, 0] = 0  # masked-LM pre-training gives CLS no summary task; NT issue #33 finds the two about equal
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def embed_token_ids(model: nn.Module, rows: Sequence[np.ndarray], batch_size: int, pooling: str = "mean",
                    device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Pooled embeddings of unpadded token-id rows (CLS first), batched by length so little padding is computed.

    Args:
        model: a backbone from load_backbone, already on `device` (the CPU when None).
        rows: token ids per record (e.g. the token table's `input_ids`); batch_size: rows per forward pass.
        pooling: `mean` or `cls`; autocast_dtype: bf16/fp16 autocast on a GPU, or None for fp32.

    Returns:
        (len(rows), hidden) float32, in the order of `rows`.
    """
    from idengine.data.tokenize import PAD_ID, collate

    device = device or torch.device("cpu")
    pad_id = getattr(model.config, "pad_token_id", None)
    order = np.argsort([-len(r) for r in rows], kind="stable")
    out = np.empty((len(rows), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        idx = order[start:start + batch_size]
        batch = collate({C.INPUT_IDS: [rows[i] for i in idx]}, pad_id=PAD_ID if pad_id is None else pad_id)
        mask = batch["attention_mask"].to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        out[idx] = pool_hidden(hidden.float(), mask, pooling).cpu().numpy()
    return out


class EmbedBatch:
    """Ray Data callable: loads the frozen backbone once per actor, then embeds batches of token ids."""

    def __init__(self, config: dict, pooling: str, threads: int) -> None:
        from idengine.train.loop import autocast_dtype_for

        cfg = config_from_dict(config)
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_backbone(cfg.model).to(self.device)
        self.autocast_dtype = autocast_dtype_for(cfg.train, self.device)
        self.batch_size, self.pooling = cfg.predict.batch_size, pooling

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        vectors = embed_token_ids(self.model, list(batch[C.INPUT_IDS]), self.batch_size, self.pooling,
                                  self.device, self.autocast_dtype)
        flat = pa.array(vectors.ravel(), type=pa.float32())
        return pa.table({C.ID: pa.array(batch[C.ID], type=pa.string()),
                         EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def embedding_cache_key(prepared_dir: str | Path, config: Config, use_gpu: bool) -> str:
    """Hash of the token cache key, the backbone (the tiny config and seed, a local dir's file sizes and times, or a
    hub id), its revision, the pooling and the numeric precision."""
    from idengine.data.ray_tokenize import cache_key
    from idengine.model import TINY_SEED, tiny_config

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

    from idengine.data.ray_tokenize import tokenized_table, write_parquet_cache

    prepared_dir = Path(prepared_dir)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if ray.is_initialized() else torch.cuda.is_available()
    cache_dir = prepared_dir / EMBEDDINGS_DIR / embedding_cache_key(prepared_dir, config, use_gpu)
    if (cache_dir / _DONE).exists():
        log.info("embedding cache hit: %s", cache_dir)
        return pq.read_table(cache_dir / "embeddings.parquet")
    tokens = tokenized_table(prepared_dir, config)
    start = time.time()
    vectors = _embed_with_ray(tokens, config)
    seconds = time.time() - start
    table = pa.table({C.ID: tokens.column(C.ID), C.LABEL: tokens.column(C.LABEL), C.FOLD: tokens.column(C.FOLD),
                      EMBEDDING: vectors})
    meta = {"rows": table.num_rows, "dim": vectors.type.list_size, "backbone": config.model.backbone,
            "revision": config.model.revision, "pooling": config.model.pooling, "gpu": use_gpu,
            "seconds": round(seconds, 2), "seqs_per_s": round(table.num_rows / max(seconds, 1e-9), 1)}
    write_parquet_cache(table, cache_dir, "embeddings.parquet", meta)
    log.info("embedded %d records with %s in %.1f s (%.0f seqs/s, Ray start-up included) -> %s",
             table.num_rows, config.model.backbone, seconds, meta["seqs_per_s"], cache_dir)
    return table


def _embed_with_ray(tokens: pa.Table, config: Config) -> pa.FixedSizeListArray:
    """Run EmbedBatch over length-sorted blocks of the token table; vectors come back in the token table's order."""
    import ray

    resources = ray.cluster_resources()  # one actor per GPU, else one per two CPUs running 2 torch threads
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    actors, use_gpu, threads = (gpus, True, 0) if gpus else (max(1, cpus // 2), False, 2)
    by_length = tokens.select([C.ID, C.INPUT_IDS]).take(
        pa.array(np.argsort(-np.asarray(tokens.column(C.N_TOKENS)), kind="stable")))
    blocks = [by_length.slice(i, ROWS_PER_CALL) for i in range(0, by_length.num_rows, ROWS_PER_CALL)]
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
    return done.column(EMBEDDING).combine_chunks().take(pa.array(position))


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The embedding column of an embed_table result as an (n, hidden) float32 array."""
    column = table.column(EMBEDDING).combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(table.num_rows, column.type.list_size)
