"""Step 9b: one fold's training as a Ray Train `TorchTrainer` run around the plain loop of `train/loop.py`.

The driver (`fit_fold`) builds the fold's Ray Datasets from the cached token table, starts the trainer and reads the
best epoch's validation logits back from the final checkpoint. Each worker (`train_loop_per_worker`) builds the model,
lets Ray wrap it in DDP, streams its shard of the training fold, scores the whole validation fold, and reports every
epoch; rank 0 attaches a checkpoint holding only the trainable weights (adapter + head), never the base model.
A worker that dies is replaced and the fold resumes from the latest checkpoint (`train.max_failures`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from ray.data import ExecutionOptions
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

from idengine import columns as C
from idengine.config import Config, config_from_dict, config_to_dict

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class InjectedFault:
    """Test hook: rank 0 exits abruptly once, right after reporting `after_epoch`, to prove that a fold resumes.

    `marker` is a file on storage every worker can see; its existence means the fault already happened.
    """

    after_epoch: int
    marker: str


@dataclass
class FoldRun:
    """What the driver keeps of one fold: history, best epoch and its validation logits."""

    fold: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    val_ids: np.ndarray = field(default_factory=lambda: np.array([]))
    val_labels: np.ndarray = field(default_factory=lambda: np.array([]))
    val_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    checkpoint_path: str = ""
    seconds: float = 0.0


def storage_uri(path: str) -> str:
    """Ray needs an absolute local path or a URI (s3://, gs://)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def fold_tables(tokens: pa.Table, fold: str) -> tuple[pa.Table, pa.Table]:
    """Training part (every other fold, never the test split) and validation part of a token table."""
    folds = tokens.column(C.FOLD)
    train = tokens.filter(pc.and_(pc.not_equal(folds, fold), pc.not_equal(folds, C.TEST_FOLD)))
    val = tokens.filter(pc.equal(folds, fold))
    return train, val


def fold_datasets(train: pa.Table, val: pa.Table, config: Config) -> dict[str, ray.data.Dataset]:
    """Ray Datasets for one fold: train (sharded across workers), val and a fixed training sample for the gap."""
    rng = np.random.default_rng(config.train.seed)
    sample = rng.choice(train.num_rows, size=min(config.train.train_eval_size, train.num_rows), replace=False)
    columns = [C.INPUT_IDS, C.LABEL]
    n_blocks = max(1, min(64, train.num_rows // 256))
    datasets = {
        "train": ray.data.from_arrow(train.select(columns)).repartition(n_blocks).materialize(),
        "val": ray.data.from_arrow(val.select(columns)).materialize(),
        "train_eval": ray.data.from_arrow(train.take(pa.array(np.sort(sample))).select(columns)).materialize(),
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


def fit_fold(config: Config, tokens: pa.Table, fold: str, num_classes: int, id2label: dict[int, str],
             run_name: str, fault: InjectedFault | None = None) -> FoldRun:
    """Train one fold as a Ray Train run and return its best epoch's validation logits.

    Args:
        config: The resolved config (model, LoRA, training and scaling settings).
        tokens: The token table of the prepared directory (see `data/ray_tokenize.py`).
        fold: The validation fold ("0" ... "K-1"); or "test" to train the final model on every non-test record for
            exactly `train.epochs` epochs and score the held-out test split once, after the last epoch.
        num_classes: Size of the label space (the head's output size).
        id2label: Label index -> species name, stored in the model config.
        run_name: Ray Train run name; checkpoints go to `<train.storage_path>/<run_name>`.
        fault: Tests only: make a worker die once after a checkpoint.

    Returns:
        The fold's history and best-epoch validation logits (rows in the order of `val_ids`).
    """
    from idengine.train.loop import class_weights

    start = time.time()
    train, val = fold_tables(tokens, fold)
    if val.num_rows == 0:
        raise ValueError(f"fold {fold!r} has no validation records")
    labels = np.asarray(train.column(C.LABEL))
    weights = class_weights(labels, num_classes, config.train.class_weighting, config.train.effective_beta)
    loop_config = {
        "config": config_to_dict(config),
        "num_classes": num_classes,
        "id2label": {int(k): v for k, v in id2label.items()},
        "class_weights": None if weights is None else weights.tolist(),
        "n_train": train.num_rows,
        # Local mode persists its own checkpoints (Ray keeps only a reference there).
        "local_run_dir": f"{storage_uri(config.train.storage_path).rstrip('/')}/{run_name}"
        if config.train.num_workers == 0 else None,
        # The final model (fold "test") trains a fixed number of epochs and scores the test split once, at the end.
        "select_best": fold != C.TEST_FOLD,
        "fault": None if fault is None else {"after_epoch": fault.after_epoch, "marker": fault.marker},
    }
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_uri(config.train.storage_path),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=fold_datasets(train, val, config),
        # Only the training fold is split; every worker scores the whole validation fold, in order.
        dataset_config=DataConfig(
            datasets_to_split=["train"],
            execution_options={"val": ExecutionOptions(preserve_order=True),
                               "train_eval": ExecutionOptions(preserve_order=True)},
        ),
    )
    result = trainer.fit()
    return _fold_run_from_result(result, fold, val, start)


def _fold_run_from_result(result, fold: str, val: pa.Table, start: float) -> FoldRun:
    if result.error is not None:
        raise RuntimeError(f"fold {fold} failed") from result.error
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        logits = np.load(ckpt / "best_val_logits.npy", allow_pickle=False)
        state = json.loads((ckpt / "state.json").read_text())
    val_labels = np.asarray(val.column(C.LABEL))
    if logits.shape[0] != len(val_labels):
        raise RuntimeError(f"fold {fold}: {logits.shape[0]} validation logits for {len(val_labels)} records")
    return FoldRun(
        fold=fold,
        history=state["history"],
        best_epoch=state["best_epoch"],
        val_ids=np.asarray(val.column(C.ID).to_pylist()),
        val_labels=val_labels,
        val_logits=logits,
        checkpoint_path=result.checkpoint.path,
        seconds=time.time() - start,
    )


class _PadCollate(NumpyBatchCollateFn):
    """Ray Data collate class (a plain function is deprecated since Ray 2.47): pad a numpy batch of token rows."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        from idengine.data.tokenize import collate

        return collate(batch, pad_id=self.pad_id)


def _batches(iterator, batch_size: int, pad_id: int, shuffle_seed: int | None = None):
    kwargs = {}
    if shuffle_seed is not None:
        kwargs = {"local_shuffle_buffer_size": batch_size * 16, "local_shuffle_seed": shuffle_seed}
    return iterator.iter_torch_batches(batch_size=batch_size, collate_fn=_PadCollate(pad_id), device="cpu", **kwargs)


def _persist_locally(checkpoint_dir: Path, run_dir: str, epoch: int) -> ray.train.Checkpoint:
    """Local mode (num_workers=0) keeps only a reference to the directory it is given: copy it to storage first."""
    import pyarrow.fs

    target = f"{run_dir.rstrip('/')}/checkpoint_epoch_{epoch:03d}"
    fs, path = pyarrow.fs.FileSystem.from_uri(target if "://" in target else Path(target).resolve().as_uri())
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(checkpoint_dir), path, destination_filesystem=fs)
    old = f"{run_dir.rstrip('/')}/checkpoint_epoch_{epoch - 2:03d}"  # keep the latest two, as CheckpointConfig does
    if epoch > 2 and "://" not in old and Path(old).exists():
        shutil.rmtree(old)
    return ray.train.Checkpoint(path=path, filesystem=fs)


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


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: model, data shards, the plain loop, reports and checkpoints."""
    from idengine.data.tokenize import load_tokenizer
    from idengine.metrics import classification_metrics, softmax
    from idengine.model import build_model
    from idengine.train.loop import FoldData, run_fold

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.lora, loop_config["num_classes"], loop_config["id2label"],
                        seed=config.train.seed)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    pad_id = load_tokenizer(config.model.backbone, revision=config.model.revision,
                            trust_remote_code=config.model.trust_remote_code).pad_token_id
    bs, seed = config.train.batch_size, config.train.seed
    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    train_eval_it = ray.train.get_dataset_shard("train_eval")
    weights = loop_config["class_weights"]
    data = FoldData(
        train_batches=lambda epoch: _batches(train_it, bs, pad_id, shuffle_seed=seed + epoch),
        val_batches=lambda: _batches(val_it, bs * 2, pad_id),
        train_eval_batches=lambda: _batches(train_eval_it, bs * 2, pad_id),
        steps_per_epoch=math.ceil(loop_config["n_train"] / (bs * max(world, 1))),
        class_weights=None if weights is None else torch.tensor(weights, dtype=torch.float32),
    )
    top_k = config.train.top_k

    def score(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return classification_metrics(labels, softmax(logits), top_k=top_k)

    reporter = _reporter(rank, loop_config["local_run_dir"], loop_config["fault"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        run_fold(model, data, config.train, score, device, reporter, None, is_chief=rank == 0,
                 select_best=loop_config["select_best"])
        return
    with checkpoint.as_directory() as resume_dir:
        local = Path(tempfile.mkdtemp(prefix="idengine-resume-"))
        shutil.copytree(resume_dir, local, dirs_exist_ok=True)
    logger.info("rank %d resumes from %s", rank, checkpoint.path)
    run_fold(model, data, config.train, score, device, reporter, local, is_chief=rank == 0,
             select_best=loop_config["select_best"])
