"""Where the recipes run: connect to a Ray cluster, or start a Ray of our own with its dashboard on localhost."""

from __future__ import annotations

import logging
import os
import tempfile
import time

from idengine.errors import InputError

log = logging.getLogger(__name__)

START_TRIES, RETRY_WAIT_S = 2, 5.0
"""A local Ray that fails to start (a timeout on a loaded machine) is tried once more before giving up."""
WORKER_NICENESS = "RAY_worker_niceness"
"""Ray's setting of how much its workers lower their own priority (`nice`); Ray's default is 15."""


def local_ray_environment() -> None:
    """Set, unless already set, the environment of a Ray this process starts: its workers (predict's actors, cv's
    training workers) run at this process's own priority. With Ray's default, they run 15 nice levels below it: on a
    machine busy with other work, `idengine predict` on 720 queries took 309 s instead of 7, its actor starved while
    it loaded the artifact. A user who wants idengine to yield runs the command under `nice`; the workers follow."""
    os.environ.setdefault(WORKER_NICENESS, "0")


def init_ray(address: str | None) -> None:
    """Connect to a cluster (address or RAY_ADDRESS) or start a local Ray; the dashboard stays on localhost.

    Raises:
        InputError: a local Ray could not start twice in a row; the message says what to check (its session
            directory's free space and file-size limit, RAY_TMPDIR, --address).
    """
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    local_ray_environment()
    for attempt in range(1, START_TRIES + 1):
        try:
            # "local": a Ray of our own. A bare ray.init() would attach to any cluster `ray start`ed on this
            # machine (found through /tmp/ray/ray_current_cluster) and die with it.
            ray.init(address="local", dashboard_host="127.0.0.1")
            return
        except Exception as err:  # Ray raises bare Exception/RuntimeError/TimeoutError when its daemons die
            ray.shutdown()
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if attempt == START_TRIES:
                session = os.environ.get("RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "ray")
                raise InputError(
                    f"Ray could not start on this machine ({type(err).__name__}: {first_line}). Ray writes its "
                    f"session under {session}: check its free space and the file-size limit (`ulimit -f`), or set "
                    "RAY_TMPDIR to another disk; `--address` connects to a running cluster instead") from err
            log.warning("Ray did not start (%s: %s); trying again in %.0f s", type(err).__name__, first_line,
                        RETRY_WAIT_S)
            time.sleep(RETRY_WAIT_S)
