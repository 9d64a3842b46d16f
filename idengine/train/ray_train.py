"""Step 8b: a training run as a Ray Train `TorchTrainer` run around the plain loop of `train/loop.py`.

Two entry points, one per purpose: `fit_fold` trains a cv fold (early stopping on its validation fold), `fit_final`
trains the final model on every non-test record for a fixed number of epochs and scores the held-out test split once,
after the last epoch. Each builds the Ray Datasets from the cached token table, starts the trainer and reads the
best epoch's evaluation logits back from the final checkpoint. Each worker (`train_loop_per_worker`) builds the model,
lets Ray wrap it in DDP, streams its shard of the training part, scores the whole evaluation part, and reports every
epoch; rank 0 attaches a checkpoint holding only the trainable weights (adapter + head), never the base model.

A worker that dies is replaced and the run resumes from the latest checkpoint (`train.max_failures`). Run names are
chosen by the caller and deterministic, so a driver that is started again with the same name and `storage_path`
finds its runs: Ray Train V2 restores a run of the same name, and local mode (`train.num_workers=0`) resumes from the
latest checkpoint this module persisted under `<storage_path>/<name>`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.data import ExecutionOptions
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

from idengine import layout as C
from idengine.config import Config
from idengine.config_io import config_from_dict, config_to_dict
from idengine.data.splits import fold_rows, train_eval_sample
from idengine.data.tokenize import collate, load_tokenizer
from idengine.models.transformer import build_model
from idengine.train.checkpoint import read_progress
from idengine.train.loop import TrainData, class_weights, run_training

logger = logging.getLogger(__name__)

Score = Callable[[np.ndarray, np.ndarray], dict]
"""(logits, labels) -> metrics including train.monitor; a module-level function, so Ray sends it by reference."""
LOCAL_CHECKPOINT_PREFIX = "checkpoint_epoch_"


@dataclass(frozen=True)
class InjectedFault:
    """Test hook: rank 0 exits abruptly once, right after reporting `after_epoch`, to prove that a run resumes.

    `marker` is a file on storage every worker can see; its existence means the fault already happened.
    """

    after_epoch: int
    marker: str


@dataclass
class TrainRun:
    """What the driver keeps of one training run: history, best epoch and its evaluation logits.

    The evaluation part is the validation fold of a cv fold (`eval_split` "0" ... "K-1"), or the held-out test split
    of the final model (`eval_split` "test").
    """

    eval_split: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    eval_ids: np.ndarray = field(default_factory=lambda: np.array([]))
    eval_labels: np.ndarray = field(default_factory=lambda: np.array([]))
    eval_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    checkpoint_path: str = ""
    seconds: float = 0.0


def storage_uri(path: str) -> str:
    """Ray needs an absolute local path or a URI (s3://, gs://)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def split_tokens(tokens: pa.Table, split: str) -> tuple[pa.Table, pa.Table]:
    """Training and evaluation parts of a token table for a cv fold or `test` (`data.splits.fold_rows`)."""
    train, evaluate = fold_rows(np.asarray(tokens.column(C.FOLD)), split)
    return tokens.take(pa.array(train)), tokens.take(pa.array(evaluate))


def run_datasets(train: pa.Table, evaluate: pa.Table, config: Config) -> dict[str, ray.data.Dataset]:
    """Ray Datasets of one run: train (sharded across workers), eval and a fixed training sample for the gap."""
    sample = train_eval_sample(train.num_rows, config.train.train_eval_size, config.train.seed)
    columns = [C.INPUT_IDS, C.LABEL]
    n_blocks = max(1, min(64, train.num_rows // 256))
    datasets = {
        "train": ray.data.from_arrow(train.select(columns)).repartition(n_blocks).materialize(),
        "eval": ray.data.from_arrow(evaluate.select(columns)).materialize(),
        "train_eval": ray.data.from_arrow(train.take(pa.array(sample)).select(columns)).materialize(),
    }
    for ds in datasets.values():
        # Each epoch iterates these three times; the loop's per-epoch log line is the progress report instead.
        ds.context.enable_progress_bars = False
    return datasets


def scaling_config(config: Config) -> ScalingConfig:
    """Workers and their resources from the config; num_workers=0 is Ray Train's local mode (in-process)."""
    t = config.train
    if t.num_workers == 0:
        return ScalingConfig(num_workers=0)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources)


def fit_fold(config: Config, tokens: pa.Table, fold: str, id2label: dict[int, str], score: Score, run_name: str,
             fault: InjectedFault | None = None) -> TrainRun:
    """Train one cv fold as a Ray Train run (early stopping on its validation fold) and return its best epoch.

    Args:
        config: The resolved config (model, LoRA, training and scaling settings).
        tokens: The token table of the prepared directory (see `features/tokens.py`).
        fold: The validation fold ("0" ... "K-1").
        id2label: Label index -> species name (its size is the head's output size).
        score: (logits, labels) -> metrics, run on the workers every epoch.
        run_name: Ray Train run name; checkpoints go to `<train.storage_path>/<run_name>`. Deterministic, so a
            restarted driver finds the run.
        fault: Tests only: make a worker die once after a checkpoint.

    Returns:
        The run's history and best-epoch validation logits (rows in the order of `eval_ids`).
    """
    if fold == C.TEST_FOLD:
        raise ValueError("fit_fold trains cv folds; the final model is trained by fit_final")
    return _fit(config, tokens, fold, id2label, score, run_name, select_best=True, fault=fault)


def fit_final(config: Config, tokens: pa.Table, id2label: dict[int, str], score: Score, run_name: str) -> TrainRun:
    """Train the final model on every non-test record for exactly `train.epochs` epochs (no early stopping, the last
    epoch is kept) and score the held-out test split once, after the last epoch, so it never influences training.

    Returns:
        The run, its `eval_*` holding the test split's logits.
    """
    return _fit(config, tokens, C.TEST_FOLD, id2label, score, run_name, select_best=False)


def _fit(config: Config, tokens: pa.Table, split: str, id2label: dict[int, str], score: Score, run_name: str,
         select_best: bool, fault: InjectedFault | None = None) -> TrainRun:
    start = time.time()
    train, evaluate = split_tokens(tokens, split)
    if evaluate.num_rows == 0:
        raise ValueError(f"split {split!r} has no records to evaluate on")
    t = config.train
    weights = class_weights(np.asarray(train.column(C.LABEL)), len(id2label), t.class_weighting, t.effective_beta)
    run_dir = f"{storage_uri(t.storage_path).rstrip('/')}/{run_name}"
    loop_config = {
        "config": config_to_dict(config), "id2label": {int(k): v for k, v in id2label.items()}, "score": score,
        "class_weights": None if weights is None else weights.tolist(), "n_train": train.num_rows,
        # Local mode persists its own checkpoints (Ray keeps only a reference there).
        "local_run_dir": run_dir if t.num_workers == 0 else None, "select_best": select_best,
        "fault": None if fault is None else {"after_epoch": fault.after_epoch, "marker": fault.marker},
    }
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(config),
        run_config=RunConfig(name=run_name, storage_path=storage_uri(t.storage_path),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=run_datasets(train, evaluate, config),
        # Only the training part is split; every worker scores the whole evaluation part, in order.
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options={"eval": ExecutionOptions(preserve_order=True),
                                                     "train_eval": ExecutionOptions(preserve_order=True)}),
    )
    return _run_from_result(trainer.fit(), split, evaluate, start)


def _run_from_result(result, split: str, evaluate: pa.Table, start: float) -> TrainRun:
    if result.error is not None:
        raise RuntimeError(f"training run for split {split} failed") from result.error
    with result.checkpoint.as_directory() as ckpt:
        state, logits = read_progress(ckpt)
    labels = np.asarray(evaluate.column(C.LABEL))
    if logits.shape[0] != len(labels):
        raise RuntimeError(f"split {split}: {logits.shape[0]} evaluation logits for {len(labels)} records")
    return TrainRun(eval_split=split, history=state.history, best_epoch=state.best_epoch,
                    eval_ids=np.asarray(evaluate.column(C.ID).to_pylist()), eval_labels=labels, eval_logits=logits,
                    checkpoint_path=result.checkpoint.path, seconds=time.time() - start)


class _PadCollate(NumpyBatchCollateFn):
    """Ray Data collate class (a plain function is deprecated since Ray 2.47): pad a numpy batch of token rows."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch, pad_id=self.pad_id)


def shard_batches(iterator, batch_size: int, pad_id: int, shuffle_seed: int | None = None):
    """Padded torch batches of a dataset shard, locally shuffled from `shuffle_seed` when given."""
    kwargs = {}
    if shuffle_seed is not None:
        kwargs = {"local_shuffle_buffer_size": batch_size * 16, "local_shuffle_seed": shuffle_seed}
    return iterator.iter_torch_batches(batch_size=batch_size, collate_fn=_PadCollate(pad_id), device="cpu", **kwargs)


def _persist_locally(checkpoint_dir: Path, run_dir: str, epoch: int) -> ray.train.Checkpoint:
    """Local mode (num_workers=0) keeps only a reference to the directory it is given: copy it to storage first,
    under a temporary name renamed when complete, so a resumed run never reads half a checkpoint."""
    import pyarrow.fs

    target = f"{run_dir.rstrip('/')}/{LOCAL_CHECKPOINT_PREFIX}{epoch:03d}"
    fs, path = pyarrow.fs.FileSystem.from_uri(target if "://" in target else Path(target).resolve().as_uri())
    staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.create_dir(staging, recursive=True)
    pyarrow.fs.copy_files(str(checkpoint_dir), staging, destination_filesystem=fs)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)
    fs.move(staging, path)
    old = f"{run_dir.rstrip('/')}/{LOCAL_CHECKPOINT_PREFIX}{epoch - 2:03d}"  # keep the latest two, as Ray does
    if epoch > 2 and "://" not in old and Path(old).exists():
        shutil.rmtree(old)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def latest_local_checkpoint(run_dir: str | None) -> Path | None:
    """The newest checkpoint `_persist_locally` completed under a local run directory, if any."""
    if not run_dir or "://" in run_dir or not Path(run_dir).is_dir():
        return None
    done = sorted(p for p in Path(run_dir).glob(f"{LOCAL_CHECKPOINT_PREFIX}[0-9][0-9][0-9]") if p.is_dir())
    return done[-1] if done else None


def _reporter(rank: int, local_run_dir: str | None, fault: dict | None):
    """The loop's report hook: every worker reports each epoch; rank 0 attaches the checkpoint directory."""

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = _persist_locally(checkpoint_dir, local_run_dir, int(metrics["epoch"])) if local_run_dir \
                else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)
        if fault and rank == 0 and int(metrics["epoch"]) == fault["after_epoch"] and not Path(fault["marker"]).exists():
            Path(fault["marker"]).write_text(f"worker {rank} exited after epoch {fault['after_epoch']}\n")
            logger.warning("injected fault: worker %d exits after epoch %d", rank, fault["after_epoch"])
            os._exit(1)

    return report


def _resume_dir(local_run_dir: str | None, rank: int) -> Path | None:
    """A local copy of the checkpoint to resume from: Ray's (a replaced worker, a restored run) or local mode's."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        found = latest_local_checkpoint(local_run_dir)
        if found is not None:
            logger.info("resumes from %s", found)
        return found
    with checkpoint.as_directory() as resume_dir:
        local = Path(tempfile.mkdtemp(prefix="idengine-resume-"))
        shutil.copytree(resume_dir, local, dirs_exist_ok=True)
    logger.info("rank %d resumes from %s", rank, checkpoint.path)
    return local


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: model, data shards, the plain loop, reports and checkpoints."""
    import yaml

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.train.seed)
    id2label = loop_config["id2label"]
    model = ray.train.torch.prepare_model(build_model(config.model, config.lora, len(id2label), id2label,
                                                      seed=config.train.seed))
    pad_id = load_tokenizer(config.model.backbone, revision=config.model.revision,
                            trust_remote_code=config.model.trust_remote_code).pad_token_id
    bs, seed, weights = config.train.batch_size, config.train.seed, loop_config["class_weights"]
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "eval", "train_eval")}
    data = TrainData(
        train_batches=lambda epoch: shard_batches(shards["train"], bs, pad_id, shuffle_seed=seed + epoch),
        eval_batches=lambda: shard_batches(shards["eval"], bs * 2, pad_id),
        train_eval_batches=lambda: shard_batches(shards["train_eval"], bs * 2, pad_id),
        steps_per_epoch=math.ceil(loop_config["n_train"] / (bs * max(world, 1))),
        class_weights=None if weights is None else torch.tensor(weights, dtype=torch.float32),
    )
    run_training(model, data, config.train, loop_config["score"], ray.train.torch.get_device(),
                 _reporter(rank, loop_config["local_run_dir"], loop_config["fault"]),
                 _resume_dir(loop_config["local_run_dir"], rank), is_chief=rank == 0,
                 select_best=loop_config["select_best"],
                 config_yaml=yaml.safe_dump(loop_config["config"], sort_keys=False))
