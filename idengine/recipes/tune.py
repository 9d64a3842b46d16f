"""Recipe `idengine tune`: Ray Tune + Optuna (+ ASHA) over the cross-validated objective of `recipes/cv.py`.

A trial is a driver function (Ray's train/tune interop pattern): it turns its sample into a Config, runs exactly the
folds `idengine cv` runs (each a Ray Train run), and reports after every fold the fold's metric and the running mean,
so ASHA can stop a poor trial after `tune.grace_folds` folds. The objective is the mean validation metric over folds.
Outputs: trials.csv / trials.md (ranked), best_config.yaml (ready for `idengine train`), and the Tune experiment
directory (TensorBoard logs; `Tuner.restore` resumes it).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from idengine import layout as C
from idengine.config import Config
from idengine.config_io import config_from_dict, config_to_dict, save_config, with_values
from idengine.data.prepared import read_prepared
from idengine.features.embeddings import embed_table
from idengine.features.tokens import tokenized_table
from idengine.recipes.cv import iter_folds, running_summary, write_cv
from idengine.report.markdown import trials_markdown
from idengine.storage import write_json, write_text
from idengine.train.ray_train import storage_uri

logger = logging.getLogger(__name__)


def search_space(space: dict[str, Any]) -> dict[str, Any]:
    """YAML distributions -> ray.tune domains, keyed by the dotted config key."""
    domains = {}
    for key, dist in space.items():
        (kind, args), = dist.items()
        if kind == "loguniform":
            domains[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "uniform":
            domains[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "choice":
            domains[key] = tune.choice(list(args))
        elif kind == "randint":
            domains[key] = tune.randint(int(args[0]), int(args[1]))
        else:
            raise ValueError(f"tune.space.{key}: unknown distribution {kind!r} (loguniform, uniform, choice, randint)")
    return domains


def tunable(config: Config) -> Config:
    """The config trials run: Ray Train refuses its API inside a Tune session in local mode (num_workers=0), so
    trials then train with one worker actor of at most half a CPU."""
    if config.train.num_workers > 0:
        return config
    logger.info("tune: train.num_workers=0 (local mode) cannot run inside a Tune trial; trials use 1 worker")
    return with_values(config, {"train.num_workers": 1,
                                "train.cpus_per_worker": min(config.train.cpus_per_worker, 0.5)})


def trial_resources(config: Config) -> dict[str, float]:
    """What one trial holds at once: its driver plus its fold trainer's workers."""
    t = tunable(config).train
    return {"CPU": config.tune.cpus_per_trial + t.num_workers * t.cpus_per_worker,
            "GPU": float(t.num_workers) if t.use_gpu else 0.0}


# Ray Data's tasks inside a trial (building a fold's datasets, tokenizing) need a whole CPU of their own: when the
# trials hold every CPU they wait forever (seen here with 2 trials on 2 CPUs; FACTS, ray #24259).
DATA_CPU_RESERVE = 1.0


def max_concurrent_trials(config: Config, cluster: dict[str, float]) -> int:
    """Trials that fit side by side while one CPU stays free for Ray Data, so no trial waits on another forever."""
    if config.tune.max_concurrent_trials > 0:
        return config.tune.max_concurrent_trials
    need = trial_resources(config)
    free = {**cluster, "CPU": cluster.get("CPU", 0.0) - DATA_CPU_RESERVE}
    fits = [math.floor(free.get(kind, 0.0) / amount + 1e-9) for kind, amount in need.items() if amount > 0]
    n = min(fits) if fits else 1
    if n < 1:
        raise ValueError(f"one trial needs {need} plus {DATA_CPU_RESERVE} CPU for Ray Data, but the cluster has "
                         f"{cluster}: lower train.num_workers, train.cpus_per_worker or tune.cpus_per_trial, or add "
                         "nodes")
    return n


def _trial(sample: dict[str, Any], base: dict, prepared_dir: str, out_dir: str) -> None:
    """One Tune trial: the cv folds of one sampled config, reporting after each fold (fold metric, running mean)."""
    config = with_values(config_from_dict(base), sample)
    monitor = config.tune.metric
    trial_dir = Path(out_dir) / C.TRIALS_DIR / tune.get_context().get_trial_id()
    results, per_fold = [], {}
    for result in iter_folds(config, prepared_dir, trial_dir):
        results.append(result)
        per_fold[f"{monitor}_fold{result.fold}"] = result.val[monitor]
        running = running_summary(results)[monitor]
        tune.report({"folds_done": len(results), f"mean_{monitor}": running["mean"], f"sd_{monitor}": running["sd"],
                     **per_fold})
    write_cv(trial_dir, config, results, read_prepared(prepared_dir)[1].num_classes)


def run_tune(config: Config, prepared_dir: str | Path, out_dir: str | Path, resume: bool = False) -> Path:
    """Search the config's `tune.space`, maximising the mean validation metric over folds.

    Args:
        config: Base config; each trial replaces the keys of `tune.space`.
        prepared_dir: Output of `idengine prepare` (every trial reads the same folds).
        out_dir: Trials table, best config and per-trial cv outputs. On a multi-node cluster, shared storage.
        resume: Continue the interrupted experiment of the same name instead of starting a new one.

    Returns:
        The output directory.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tunable(config)
    monitor = config.tune.metric
    metric = f"mean_{monitor}"
    records, _ = read_prepared(prepared_dir)
    if config.model.kind == "probe":
        embed_table(prepared_dir, config)  # embed once here: trials then only fit heads on the cached embeddings
    elif config.model.kind == "transformer":
        tokenized_table(prepared_dir, config)  # tokenize once here, so trials share the cache instead of racing
    n_folds = records["fold"].nunique() - int((records["fold"] == "test").any())
    trainable = tune.with_parameters(_trial, base=config_to_dict(config), prepared_dir=str(Path(prepared_dir).resolve()),
                                     out_dir=str(out_dir))
    # The trial actor holds only its driver's share: the fold trainer reserves its workers in its own placement group
    # (trial_resources, the sum of both, only decides how many trials run side by side).
    trainable = tune.with_resources(trainable, {"CPU": config.tune.cpus_per_trial})
    storage = storage_uri(config.train.storage_path)
    experiment = f"{storage.rstrip('/')}/{config.tune.name}"
    if resume and tune.Tuner.can_restore(experiment):
        logger.info("resuming %s: finished trials are kept, unfinished ones continue", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(config, trainable, metric, n_folds, storage)
    grid = tuner.fit()
    return _write_outputs(grid, config, out_dir, metric, n_folds)


def _new_tuner(config: Config, trainable, metric: str, n_folds: int, storage: str) -> tune.Tuner:
    t = config.tune
    concurrent = max_concurrent_trials(config, ray.cluster_resources())
    logger.info("tune: %d trials, %d at a time, each holding %s", t.num_samples, concurrent, trial_resources(config))
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="folds_done", max_t=n_folds, grace_period=min(t.grace_folds, n_folds),
                                  reduction_factor=2)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=search_space(t.space),
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=t.num_samples, max_concurrent_trials=concurrent,
            search_alg=OptunaSearch(seed=config.data.seed), scheduler=scheduler,
        ),
        run_config=tune.RunConfig(name=t.name, storage_path=storage, callbacks=[TBXLoggerCallback()],
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def _write_outputs(grid, config: Config, out_dir: Path, metric: str, n_folds: int) -> Path:
    rows = []
    for result in grid:
        m = result.metrics or {}
        row = {"trial_id": m.get("trial_id", Path(result.path).name), "status": "ERROR" if result.error else
               ("STOPPED_EARLY" if m.get("folds_done", 0) < n_folds else "COMPLETE"),
               metric: m.get(metric), "folds_done": m.get("folds_done", 0),
               "seconds": round(m.get("time_total_s", 0.0), 1)}
        row.update({f"config/{k}": v for k, v in (result.config or {}).items()})
        row.update({k: v for k, v in m.items() if k.startswith(f"{config.tune.metric}_fold")})
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["folds_done", metric], ascending=False, na_position="last")
    table.to_csv(out_dir / C.TRIALS_CSV, index=False)
    write_text(out_dir / C.TRIALS_MD, trials_markdown(table))
    # Only trials that ran every fold compete for "best": a stopped trial's running mean covers fewer folds.
    complete = table[table["status"] == "COMPLETE"]
    sample = {k[len("config/"):]: _plain(v) for k, v in complete.iloc[0].items() if k.startswith("config/")} \
        if len(complete) else dict(grid.get_best_result(metric=metric, mode="max", scope="last").config)
    best_config = with_values(config, sample)
    save_config(best_config, out_dir / C.BEST_CONFIG)
    write_json(out_dir / C.BEST_JSON, {"config": sample, metric: float(complete.iloc[0][metric]) if len(complete)
                                       else None, "experiment": str(grid.experiment_path)})
    logger.info("tune done: best %s, %s -> %s", sample, metric, out_dir / C.BEST_CONFIG)
    return out_dir


def _plain(value: Any) -> Any:
    """numpy scalars from the trials table -> Python values (YAML and the config loader need them)."""
    return value.item() if hasattr(value, "item") else value
