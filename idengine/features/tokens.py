"""Step 6b, tokens: tokenize a prepared directory with Ray Data `map_batches` and cache the result as parquet.

The cache lives in `<prepared>/tokens/<key>/`, where the key hashes the records file, the tokenizer's vocabulary and
`max_tokens` (`features/cache.py`): a second run with the same inputs reads it back instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from idengine import layout as C
from idengine.config import Config
from idengine.data.tokenize import load_tokenizer, tokenize_batch
from idengine.features.cache import read_cache, write_cache
from idengine.storage import file_sha256

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = (C.ID, C.LABEL, C.FOLD, C.INPUT_IDS, C.N_TOKENS, C.TRUNCATED)


class TokenizeBatch:
    """A Ray Data callable: loads the tokenizer once per actor, then turns sequence batches into token ids."""

    def __init__(self, backbone: str, revision: str | None, trust_remote_code: bool, max_tokens: int) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = load_tokenizer(backbone, revision=revision, trust_remote_code=trust_remote_code)
        self.max_tokens = max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        out = tokenize_batch(batch, self.tokenizer, self.max_tokens)
        ids = pa.array([np.asarray(x, dtype=np.int32) for x in out[C.INPUT_IDS]], type=pa.list_(pa.int32()))
        table = {name: out[name] for name in (C.ID, C.LABEL, C.FOLD, C.N_TOKENS, C.TRUNCATED) if name in out}
        return pa.table({**{k: pa.array(v) for k, v in table.items()}, C.INPUT_IDS: ids})


def cache_key(records_path: Path, config: Config) -> str:
    """Hash of everything the token ids depend on: the records, the tokenizer (vocabulary) and max_tokens."""
    tokenizer = load_tokenizer(config.model.backbone, revision=config.model.revision,
                               trust_remote_code=config.model.trust_remote_code)
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [file_sha256(records_path), hashlib.sha256(vocab.encode()).hexdigest(), str(config.model.max_tokens)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def tokenized_table(prepared_dir: str | Path, config: Config) -> pa.Table:
    """Token ids of every record of a prepared directory, from the cache or tokenized now with Ray Data.

    Args:
        prepared_dir: Output of `idengine prepare`.
        config: Model settings (backbone, revision, max_tokens) decide the tokenizer and the cache key.

    Returns:
        An Arrow table with columns id, label, fold, input_ids (list<int32>, CLS first, unpadded), n_tokens, truncated,
        in the order of records.parquet.
    """
    prepared_dir = Path(prepared_dir)
    records_path = prepared_dir / C.RECORDS_FILE
    key = cache_key(records_path, config)
    cache_dir = prepared_dir / C.TOKENS_DIR / key
    cached = read_cache(cache_dir, C.TOKENS_FILE)
    if cached is not None:
        return cached
    table = _tokenize_with_ray(records_path, config)
    write_cache(table, cache_dir, C.TOKENS_FILE, {
        "rows": table.num_rows, "backbone": config.model.backbone, "revision": config.model.revision,
        "max_tokens": config.model.max_tokens})
    n_truncated = int(np.asarray(table.column(C.TRUNCATED)).sum())
    logger.info("tokenized %d records (%d truncated to %d tokens) -> %s",
                table.num_rows, n_truncated, config.model.max_tokens, cache_dir)
    return table


def _tokenize_with_ray(records_path: Path, config: Config) -> pa.Table:
    import ray

    records = pq.read_table(records_path, columns=[C.ID, C.SEQUENCE, C.LABEL, C.FOLD])
    order = {name: i for i, name in enumerate(records.column(C.ID).to_pylist())}
    ds = ray.data.from_arrow(records).repartition(max(1, records.num_rows // 2000))
    cpus = ray.cluster_resources().get("CPU", 1)
    tokens = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={
            "backbone": config.model.backbone,
            "revision": config.model.revision,
            "trust_remote_code": config.model.trust_remote_code,
            "max_tokens": config.model.max_tokens,
        },
        batch_size=1024,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cpus))),  # not `concurrency=` (Ray 2.51)
        num_cpus=0.5,  # leaves room for the driver on a 2-core machine (FACTS: Ray Data starved of CPU hangs)
    )
    table = pa.concat_tables([pa.Table.from_pandas(df, preserve_index=False) if not isinstance(df, pa.Table) else df
                              for df in _iter_tables(tokens)])
    # Restore the records' order: Ray Data may return blocks in any order.
    position = np.array([order[x] for x in table.column(C.ID).to_pylist()])
    return table.take(pa.array(np.argsort(position)))


def _iter_tables(ds) -> list[pa.Table]:
    return [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
