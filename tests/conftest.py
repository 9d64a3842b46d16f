"""Shared fixtures: one Ray session per test run (integration tier only), paths to the small real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED_12S = REPO.parent / "shared" / "data" / "12s-fish"

# Ray 2.60 token auth writes ~/.ray/auth_token; tests run without it, on server and client alike.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """Start Ray once for all integration tests: 2 CPUs, no dashboard, a capped object store, temp dirs."""
    import ray

    from idengine.recipes.runtime import local_ray_environment

    local_ray_environment()  # as `init_ray` starts a local Ray
    temp_dir = Path("/tmp") / f"idengine-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    ray.init(
        address="local",  # never attach to a head another test started with `ray start`
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=384 * 1024 * 1024,
        _temp_dir=str(temp_dir),
        ignore_reinit_error=True,
        log_to_driver=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_12s() -> Path:
    """The full 12s-fish development set beside the repo (the `full_data` tier); skipped, saying so, without it."""
    from fixtures_tiny import FULL_DATA_SKIP

    if not (SHARED_12S / "labels.csv").exists():
        pytest.skip(FULL_DATA_SKIP)
    return SHARED_12S


from fixtures_tiny import *  # noqa: E402,F401,F403  (tiny model, offline tokenizer, real 12S records)


@pytest.fixture(scope="session")
def prepared_example(tmp_path_factory) -> Path:
    """The bundled example (examples/12s-fish-mini) prepared with default settings, once per test run."""
    from idengine.config_io import load_config
    from idengine.recipes.prepare import prepare_dataset

    config = load_config(REPO / "jobs" / "configs" / "tiny-cpu.yaml", [
        f"data.sequences={REPO / 'examples' / '12s-fish-mini' / 'sequences.fasta.gz'}",
        f"data.labels={REPO / 'examples' / '12s-fish-mini' / 'labels.csv'}",
    ])
    return prepare_dataset(config, tmp_path_factory.mktemp("example") / "prepared")


def tiny_test_config(tmp_path: Path, *overrides: str):
    """The tiny CPU config with storage in tmp_path and short training, plus overrides."""
    from idengine.config_io import load_config

    return load_config(REPO / "jobs" / "configs" / "tiny-cpu.yaml", [
        f"train.storage_path={tmp_path / 'ray'}", "train.epochs=2", "train.patience=0", "train.num_workers=0",
        "train.train_eval_size=64", *overrides,
    ])
