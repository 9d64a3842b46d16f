"""Where the recipes run: connect to a Ray cluster, or start a Ray of our own with its dashboard on localhost."""

from __future__ import annotations

import os


def init_ray(address: str | None) -> None:
    """Connect to a cluster (address or RAY_ADDRESS) or start a local Ray; the dashboard stays on localhost."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local": a Ray of our own. A bare ray.init() would attach to any cluster `ray start`ed on this machine
        # (found through /tmp/ray/ray_current_cluster) and die with it.
        ray.init(address="local", dashboard_host="127.0.0.1")
