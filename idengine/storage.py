"""Writing files so that nothing looks complete before it is: checksums, strict JSON, atomic files and directories.

Every directory idengine produces (prepared, cv, tune outputs, artifacts, caches) is built under a temporary sibling
name and renamed into place by `publish_dir`; an older directory at that place is moved aside first and removed only
after the new one is there, so a reader sees the old directory or the new one, never none and never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """Nested dicts/lists with numpy scalars made plain and NaN/inf made null, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write strict JSON (NaN/inf become null), atomically: a reader never sees half a file."""
    text = json.dumps(json_safe(data), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    write_text(path, text)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a truncated or invalid one raises ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); was the run that wrote it interrupted?") from err


def write_text(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name in the same directory, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_file(tmp: str | Path, out: str | Path) -> Path:
    """Rename a finished file into place (same directory, so atomic): a reader sees the old file or the new one."""
    os.replace(tmp, out)
    return Path(out)


def staging_dir(out: str | Path) -> Path:
    """A new empty directory beside `out` (same filesystem, so the final rename is atomic), mode 755."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    return tmp


def publish_dir(tmp: str | Path, out: str | Path) -> Path:
    """Put a finished directory at `out`; an existing one is moved aside first and deleted only afterwards."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return out
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@contextmanager
def building(out: str | Path) -> Iterator[Path]:
    """`with building(out) as tmp:` write into tmp; on success it replaces `out`, on any error it is removed.

    Example:
        with building(run_dir) as tmp:
            (tmp / "metrics.json").write_text(...)
    """
    tmp = staging_dir(out)
    try:
        yield tmp
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_cache(tmp: str | Path, cache_dir: str | Path, complete_marker: str) -> Path:
    """Publish a finished cache directory unless another process completed the same cache first (its copy stays)."""
    tmp, cache_dir = Path(tmp), Path(cache_dir)
    if (cache_dir / complete_marker).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return cache_dir
    return publish_dir(tmp, cache_dir)
