"""Writing files so that nothing looks complete before it is: checksums, strict JSON, atomic files and directories.

Every directory idengine produces (prepared, cv, tune outputs, artifacts, caches) is built under a temporary sibling
name and renamed into place by `publish_dir`; an older directory at that place is moved aside first and removed only
after the new one is there (on Linux both swap in one `renameat2(RENAME_EXCHANGE)` call), so a reader sees the old
directory or the new one, never none and never half of one. Temporary names carry their writer's pid and host, so the
leftovers of a killed run are removed by the next one (`remove_stale_temps`), and a write that runs out of space (or
past the file-size limit) becomes an InputError naming the output (`out_of_space`).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from idengine.errors import InputError

log = logging.getLogger(__name__)

SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
"""A write failed for want of room: the disk or quota is full, or the file passed the size limit (`ulimit -f`)."""
SPACE_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|os error (?:28|27|122)\b")
"""The same, as libraries that do not raise OSError (safetensors' SafetensorError) word it."""
TEMP_MARK = ".tmp-"


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
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise out_of_space(err, path) or err
    finally:
        tmp.unlink(missing_ok=True)


def out_of_space(err: BaseException, path: str | Path) -> InputError | None:
    """The InputError to raise for a write into `path` that ran out of space or past the file-size limit, else None.

    Example:
        except OSError as err:
            raise out_of_space(err, out) or err
    """
    if isinstance(err, OSError) and err.errno in SPACE_ERRNOS:
        cause = os.strerror(err.errno) + (f": {err.filename}" if err.filename else "")
    elif isinstance(err, Exception) and not isinstance(err, InputError) and SPACE_TEXT.search(str(err)):
        cause = SPACE_TEXT.search(str(err)).group(0)
    else:
        return None
    return InputError(f"{path}: out of space / file too large while writing it ({cause}); nothing was left "
                      "half-written there. Free disk space (or raise the file-size limit, `ulimit -f`) and run the "
                      "command again")


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def temp_path(out: str | Path) -> Path:
    """A hidden temporary name beside `out` that names its writer: `.<name>.tmp-<pid>@<host>-<random>`."""
    out = Path(out)
    return out.with_name(f".{out.name}{TEMP_MARK}{_owner()}-{uuid.uuid4().hex[:8]}")


def _dead_owner(name: str, prefix: str) -> bool:
    """True when a temporary name was made by a process of this host that no longer runs."""
    pid, _, host = name[len(prefix):].rpartition("-")[0].partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Remove the temporary files and staging directories of `out` left by killed runs (owner dead, same host).

    The temporaries of a run still going (any live owner, or another host's) are kept. Returns what was removed.
    """
    out = Path(out)
    prefix = f".{out.name}{TEMP_MARK}"
    removed = []
    for path in out.parent.glob(glob.escape(prefix) + "*"):
        if _dead_owner(path.name, prefix):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d leftover(s) of interrupted runs beside %s: %s", len(removed), out,
                 ", ".join(p.name for p in removed))
    return removed


def publish_file(tmp: str | Path, out: str | Path) -> Path:
    """Rename a finished file into place (same directory, so atomic): a reader sees the old file or the new one."""
    os.replace(tmp, out)
    return Path(out)


def staging_dir(out: str | Path) -> Path:
    """A new empty directory beside `out` (same filesystem, so the final rename is atomic), mode 755."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}{_owner()}-", dir=out.parent))
    os.chmod(tmp, 0o755)
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem or kernel that cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_dir(tmp: str | Path, out: str | Path) -> Path:
    """Put a finished directory at `out`; an existing one is swapped out in the same step (Linux) or moved aside first,
    and deleted only afterwards."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return out
    if _exchange(tmp, out):  # tmp now holds the old directory
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@contextmanager
def building(out: str | Path) -> Iterator[Path]:
    """`with building(out) as tmp:` write into tmp; on success it replaces `out`, on any error it is removed.

    A write that runs out of space (or past the file-size limit) raises an InputError naming `out`.

    Example:
        with building(run_dir) as tmp:
            (tmp / "metrics.json").write_text(...)
    """
    tmp = staging_dir(out)
    try:
        yield tmp
        publish_dir(tmp, out)
    except Exception as err:
        raise out_of_space(err, out) or err
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
