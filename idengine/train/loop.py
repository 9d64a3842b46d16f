"""Step 9, train: one fold's epochs as a plain PyTorch loop (no Ray).

Weighted cross-entropy, AdamW with warm-up, gradient accumulation and clipping, per-epoch validation with a
train-vs-validation gap, early stopping, and checkpoints that hold only the trainable parameters (adapter + head).
`train/ray_train.py` runs `run_fold` on each Ray Train worker; `train_fold_local` runs it in-process.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from idengine.columns import INPUT_IDS, LABEL
from idengine.config import TrainConfig
from idengine.data.tokenize import PAD_ID, collate
from idengine.model import load_trainable_state, trainable_state_dict, unwrap
from idengine.train.checkpoint import FoldState, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
MAX_GRAD_NORM = 1.0
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class FoldData:
    """What the loop needs from the data pipeline; batches are already collated (see `data.tokenize.collate`)."""

    train_batches: Callable[[int], Iterable[Batch]]
    """epoch (0-based) -> that epoch's shuffled training micro-batches, on the CPU."""
    val_batches: Callable[[], Iterable[Batch]]
    """The validation fold's batches (the same on every worker, so every worker takes the same stopping decision)."""
    train_eval_batches: Callable[[], Iterable[Batch]]
    """A fixed sample of the training fold, scored each epoch for the train-vs-validation gap."""
    steps_per_epoch: int
    """Micro-batches per epoch on this worker; the loop takes at most this many (DDP needs equal counts)."""
    class_weights: torch.Tensor | None
    """Cross-entropy weight per class, or None."""


@dataclass
class FoldOutcome:
    """A finished fold: its progress, the best epoch's trainable parameters and validation logits."""

    state: FoldState
    best_state: dict[str, torch.Tensor]
    best_val_logits: np.ndarray
    val_labels: np.ndarray


def class_weights(labels: np.ndarray, num_classes: int, scheme: str, beta: float) -> torch.Tensor | None:
    """Per-class cross-entropy weights from the training labels, normalised to mean 1 over the present classes.

    Args:
        labels: int class of every training record.
        num_classes: size of the label space; absent classes get weight 1 (they never occur as a target).
        scheme: `none`, `inverse` (1/n) or `effective` ((1-beta)/(1-beta^n), Cui et al. 2019: the effective
            number of samples saturates, so rare classes gain less than with 1/n).
        beta: the effective-number beta in [0, 1).

    Returns:
        A float32 tensor of shape (num_classes,), or None for `none`.
    """
    if scheme == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    if scheme == "inverse":
        weights[present] = 1.0 / counts[present]
    elif scheme == "effective":
        weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    else:
        raise ValueError(f"class weighting must be none, inverse or effective, not {scheme!r}")
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy in fp32 (even under autocast), averaged as sum(w_y * nll) / sum(w_y) over the batch."""
    weight = None if weights is None else weights.to(logits.device)
    return F.cross_entropy(logits.float(), labels.to(logits.device), weight=weight)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights (1-D) get no weight decay."""
    decay, no_decay = [], []
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warm-up over `warmup_fraction` of the optimizer steps, then cosine, linear or constant."""
    from transformers import get_scheduler

    warmup = int(round(cfg.warmup_fraction * total_steps))
    return get_scheduler(_SCHEDULERS[cfg.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def autocast_dtype_for(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `cfg.precision` on `device`: None (fp32) on a CPU, bf16/fp16 on CUDA."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    elif cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float16


def forward_logits(model: nn.Module, batch: Batch, device: torch.device, autocast_dtype: torch.dtype | None):
    """The model's logits for one collated batch, under autocast when a dtype is given."""
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(
            input_ids=batch["input_ids"].to(device, non_blocking=True),
            attention_mask=batch["attention_mask"].to(device, non_blocking=True),
        )
    return out.logits


def _windows(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Group micro-batches into gradient-accumulation windows (the last one may be shorter)."""
    it = iter(batches)
    while window := list(islice(it, size)):
        yield window


def _optimizer_step(params, optimizer, scheduler, scaler) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_epoch(
    model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig,
    weights: torch.Tensor | None, device: torch.device, autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None, max_steps: int | None = None,
) -> dict:
    """One pass over the training batches: accumulate `cfg.grad_accum_steps` micro-batches, clip to 1.0, step.

    Args:
        model: the model (possibly DDP-wrapped), on `device`; batches: collated micro-batches with `labels`.
        optimizer, scheduler: from build_optimizer / build_scheduler; the scheduler steps per optimizer step.
        cfg, weights, device: settings, class weights (or None), the model's device.
        autocast_dtype, scaler: None / bf16 / fp16, and a GradScaler when training in fp16.
        max_steps: take at most this many micro-batches.

    Returns:
        `loss` (mean over sequences of the micro-batch losses before each step), `tokens` (non-pad),
        `sequences`, `steps` (optimizer steps) and `seconds`.
    """
    model.train()
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    start, steps, tokens, sequences = time.perf_counter(), 0, 0, 0
    loss_sum = torch.zeros((), device=device)
    for window in _windows(islice(batches, max_steps), cfg.grad_accum_steps):
        for i, batch in enumerate(window):
            # Gradients are all-reduced once per window, on its last micro-batch.
            with nullcontext() if not is_ddp or i == len(window) - 1 else model.no_sync():
                logits = forward_logits(model, batch, device, autocast_dtype)
                loss = weighted_cross_entropy(logits, batch["labels"], weights)
                scaled = loss / len(window)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach() * len(batch["labels"])
            sequences, tokens = sequences + len(batch["labels"]), tokens + int(batch["attention_mask"].sum())
        _optimizer_step(params, optimizer, scheduler, scaler)
        steps += 1
    mean_loss = loss_sum.item() / max(sequences, 1)  # .item() also waits for the GPU before the clock stops
    return {"loss": mean_loss, "tokens": tokens, "sequences": sequences, "steps": steps,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, autocast_dtype: torch.dtype | None
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits (n, C) and labels (n,; -1 where a batch has none) in evaluation mode.

    Runs the unwrapped module, so no DDP collective is involved and workers may hold different batch counts.
    """
    net, was_training = unwrap(model), model.training
    net.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(forward_logits(net, batch, device, autocast_dtype).float().cpu().numpy())
        n = len(batch["input_ids"])
        labels.append(batch["labels"].numpy() if "labels" in batch else np.full(n, -1, dtype=np.int64))
    net.train(was_training)
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def _score_epoch(model, data: FoldData, cfg: TrainConfig, score, device, autocast_dtype):
    """Validation metrics, `train_` metrics on the training sample, and `gap_<monitor>`."""
    val_logits, val_labels = predict_logits(model, data.val_batches(), device, autocast_dtype)
    metrics = {k: float(v) for k, v in score(val_logits, val_labels).items()}
    if cfg.monitor not in metrics:
        raise KeyError(f"the score function returned {sorted(metrics)}, without train.monitor {cfg.monitor!r}")
    train_logits, train_labels = predict_logits(model, data.train_eval_batches(), device, autocast_dtype)
    metrics.update({f"train_{k}": float(v) for k, v in score(train_logits, train_labels).items()})
    metrics[f"gap_{cfg.monitor}"] = metrics[f"train_{cfg.monitor}"] - metrics[cfg.monitor]
    return metrics, val_logits, val_labels


def _update_state(state: FoldState, value: float, metrics: dict) -> bool:
    """Count the epoch, track the best score (NaN never wins) and return whether this epoch is the new best."""
    value = -math.inf if math.isnan(value) else value
    state.epoch += 1
    improved = state.best_epoch < 0 or value > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.epochs_since_best = value, state.epoch, 0
    else:
        state.epochs_since_best += 1
    metrics.update(best_epoch=state.best_epoch, best_score=state.best_score)
    state.history.append(metrics)
    return improved


def _report_epoch(report, metrics, is_chief, model, optimizer, scheduler, state, best_state, best_logits, scaler):
    """Every worker reports; the chief attaches a fresh checkpoint dir, deleted once `report` has returned."""
    if not is_chief:
        return report(metrics, None)
    directory = Path(tempfile.mkdtemp(prefix="idengine-fold-ckpt-"))
    try:
        save_checkpoint(directory, model, optimizer, scheduler, state, best_state, best_logits, scaler)
        report(metrics, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_fold(
    model: nn.Module, data: FoldData, cfg: TrainConfig, score: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    device: torch.device, report: Callable[[dict, Path | None], None], resume_dir: Path | None = None,
    is_chief: bool = True, select_best: bool = True,
) -> FoldOutcome:
    """Train one fold: epochs of train_epoch + scoring, early stopping on `cfg.monitor`, a report per epoch.

    Args:
        model: from build_model, already on `device` (and DDP-wrapped by the caller if distributed).
        data, cfg: the fold's batches; training settings (epochs, lr, schedule, patience, monitor, precision, seed).
        score: (logits, labels) -> metrics that include cfg.monitor (higher is better).
        device: the device of the model.
        report: called once per epoch on every worker with the metrics and, on the chief, a checkpoint directory
            that is deleted when report returns (so report must copy or upload it synchronously).
        resume_dir: a save_checkpoint directory to continue from.
        is_chief: this worker writes checkpoints and logs.
        select_best: False for the final model: exactly cfg.epochs epochs, no early stopping, the last epoch is kept,
            and the validation data (the held-out test split) is scored once, after the last epoch, so that it
            can never influence training.

    Returns:
        The FoldOutcome; the model is left holding the best epoch's trainable parameters.
    """
    autocast_dtype = autocast_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, cfg.epochs * math.ceil(data.steps_per_epoch / cfg.grad_accum_steps))
    state, best_state, best_logits, val_labels = FoldState(), None, None, None
    if resume_dir is not None:
        state, best_state, best_logits = load_checkpoint(resume_dir, model, optimizer, scheduler, scaler)
        log.info("resumed after epoch %d (best epoch %d)", state.epoch, state.best_epoch)
    weights = data.class_weights.to(device) if data.class_weights is not None else None
    while state.epoch < cfg.epochs and not (select_best and cfg.patience > 0
                                             and state.epochs_since_best >= cfg.patience):
        torch.manual_seed(cfg.seed + state.epoch)  # dropout per epoch: a resumed fold replays the same draws
        stats = train_epoch(model, data.train_batches(state.epoch), optimizer, scheduler, cfg, weights, device,
                            autocast_dtype, scaler, max_steps=data.steps_per_epoch)
        last = state.epoch + 1 == cfg.epochs
        if select_best or last:
            metrics, val_logits, val_labels = _score_epoch(model, data, cfg, score, device, autocast_dtype)
        else:
            metrics, val_logits = {cfg.monitor: math.nan}, np.zeros((0,), dtype=np.float32)
        metrics.update(epoch=state.epoch + 1, loss=stats["loss"], seconds=stats["seconds"],
                       tokens_per_s=stats["tokens"] / max(stats["seconds"], 1e-9))
        improved = _update_state(state, metrics[cfg.monitor], metrics)
        if not select_best:  # the final model keeps its last epoch, whatever the scores
            state.best_epoch, state.best_score, improved = state.epoch, metrics[cfg.monitor], True
            metrics.update(best_epoch=state.best_epoch, best_score=state.best_score)
        if improved:
            best_state, best_logits = trainable_state_dict(model), val_logits
        if is_chief:
            log.info("epoch %d/%d loss %.4f val %s %.4f train %s %.4f tokens/s %.0f", state.epoch, cfg.epochs,
                     stats["loss"], cfg.monitor, metrics[cfg.monitor], cfg.monitor,
                     metrics.get(f"train_{cfg.monitor}", math.nan), metrics["tokens_per_s"])
        _report_epoch(report, metrics, is_chief, model, optimizer, scheduler, state, best_state, best_logits, scaler)
    load_trainable_state(model, best_state)
    if val_labels is None:  # resumed a fold that had already finished: no epoch ran here
        val_labels = np.concatenate([b["labels"].numpy() for b in data.val_batches()])
    return FoldOutcome(state=state, best_state=best_state, best_val_logits=best_logits, val_labels=val_labels)


def train_fold_local(
    model: nn.Module, data: FoldData, cfg: TrainConfig, score: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    device: torch.device,
) -> FoldOutcome:
    """run_fold in this process, without Ray: moves the model to `device`; reports are only logged."""

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        log.debug("epoch %s metrics %s", metrics.get("epoch"), metrics)

    return run_fold(model.to(device), data, cfg, score, device, report)


def local_fold_data(
    train: dict[str, np.ndarray], val: dict[str, np.ndarray], cfg: TrainConfig, num_classes: int, pad_id: int = PAD_ID
) -> FoldData:
    """FoldData over in-memory tokenized columns (`input_ids`, `label`), for tests and runs without Ray.

    Training batches are reshuffled each epoch from (cfg.seed, epoch), so an epoch's batches can be replayed.

    Args:
        train, val: columns as produced by `data.tokenize.tokenize_batch` plus the int `label` column.
        cfg: batch_size, train_eval_size, class_weighting, effective_beta and seed are read.
        num_classes, pad_id: size of the label space (for the class weights); the tokenizer's pad id.
    """
    n_train = len(train[LABEL])

    def batches(table: dict[str, np.ndarray], order: np.ndarray) -> Iterator[Batch]:
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            yield collate({INPUT_IDS: table[INPUT_IDS][rows], LABEL: table[LABEL][rows]}, pad_id)

    sample = np.sort(np.random.default_rng(cfg.seed).permutation(n_train)[: cfg.train_eval_size])
    return FoldData(
        train_batches=lambda epoch: batches(train, np.random.default_rng([cfg.seed, epoch]).permutation(n_train)),
        val_batches=lambda: batches(val, np.arange(len(val[LABEL]))),
        train_eval_batches=lambda: batches(train, sample),
        steps_per_epoch=math.ceil(n_train / cfg.batch_size),
        class_weights=class_weights(train[LABEL], num_classes, cfg.class_weighting, cfg.effective_beta),
    )
