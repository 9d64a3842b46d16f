"""Tune: search-space conversion and trial concurrency (no Ray), then real experiments (integration)."""

import pytest
from ray import tune as ray_tune

from idengine.config_io import load_config
from idengine.recipes.tune import max_concurrent_trials, search_space, trial_resources


def test_search_space_becomes_tune_domains():
    space = search_space({"train.lr": {"loguniform": [1e-5, 1e-3]}, "lora.r": {"choice": [4, 8]},
                          "lora.dropout": {"uniform": [0.0, 0.2]}, "train.epochs": {"randint": [2, 5]}})
    assert isinstance(space["train.lr"], ray_tune.search.sample.Float)
    assert space["lora.r"].categories == [4, 8]
    with pytest.raises(ValueError, match="unknown distribution"):
        search_space({"train.lr": {"normal": [0, 1]}})


@pytest.mark.parametrize("overrides, cluster, expected", [
    (["train.num_workers=0"], {"CPU": 2.0}, 1),                    # this machine: one trial, 1 CPU left for data
    (["train.num_workers=0"], {"CPU": 16.0}, 15),
    (["train.num_workers=1", "train.cpus_per_worker=0.5"], {"CPU": 2.0}, 1),
    (["train.num_workers=4", "train.use_gpu=true", "train.cpus_per_worker=4", "tune.cpus_per_trial=1"],
     {"CPU": 64.0, "GPU": 16.0}, 3),                                # CPUs bind first: (64-1) // 17
    (["train.num_workers=4", "train.use_gpu=true", "train.cpus_per_worker=2", "tune.cpus_per_trial=1"],
     {"CPU": 64.0, "GPU": 16.0}, 4),                                # GPUs bind: 16 // 4
    (["tune.max_concurrent_trials=3"], {"CPU": 2.0}, 3),
])
def test_concurrency_leaves_room_for_every_trial_and_ray_data(overrides, cluster, expected):
    config = load_config(None, overrides)
    assert max_concurrent_trials(config, cluster) == expected
    if config.tune.max_concurrent_trials == 0:
        need = trial_resources(config)
        assert expected * need["CPU"] + 1.0 <= cluster["CPU"]


def test_a_trial_bigger_than_the_cluster_is_an_error():
    with pytest.raises(ValueError, match="one trial needs"):
        max_concurrent_trials(load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1"]), {"CPU": 2.0})
