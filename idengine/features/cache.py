"""Step 6a, caches: parquet tables under `<prepared>/<kind>/<key>/`, complete or absent, shared by runs and trials.

The key hashes everything the table depends on, so a second run with the same inputs reads the table back instead
of computing it again. A cache is written under a temporary name with a completion marker and renamed into place
(`storage.publish_cache`): a half-written cache is never read, and when two processes race, the first copy stays.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from idengine import layout as C
from idengine.storage import publish_cache, staging_dir

log = logging.getLogger(__name__)


def read_cache(cache_dir: Path, filename: str) -> pa.Table | None:
    """The cached table, or None when the cache is absent or incomplete."""
    if not (cache_dir / C.CACHE_COMPLETE).exists():
        return None
    log.info("cache hit: %s", cache_dir)
    return pq.read_table(cache_dir / filename)


def write_cache(table: pa.Table, cache_dir: Path, filename: str, meta: dict) -> None:
    """Write `table` + a completion marker (meta as JSON) under a temporary name, then publish the directory."""
    tmp = staging_dir(cache_dir)
    pq.write_table(table, tmp / filename)
    (tmp / C.CACHE_COMPLETE).write_text(json.dumps(meta, indent=1, default=str))
    publish_cache(tmp, cache_dir, C.CACHE_COMPLETE)
