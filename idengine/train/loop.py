"""Step 8a, train: one training run's epochs (a cv fold, or the final model) as a plain PyTorch loop (no Ray).

Weighted cross-entropy, AdamW with warm-up, gradient accumulation and clipping, per-epoch evaluation with a
train-vs-validation gap, early stopping, and checkpoints that hold only the trainable parameters (adapter + head).
`train/ray_train.py` runs `run_training` on each Ray Train worker; `train_local` runs it in-process.
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

from idengine.config import TrainConfig
from idengine.data.splits import train_eval_sample
from idengine.data.tokenize import PAD_ID, collate
from idengine.layout import INPUT_IDS, LABEL
from idengine.models.inference import autocast_dtype_for, forward_logits
from idengine.models.transformer import half_base_dtype, load_trainable_state, trainable_state_dict, unwrap
from idengine.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
MAX_GRAD_NORM = 1.0
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainData:
    """What the loop needs from the data pipeline; batches are already collated (see `data.tokenize.collate`)."""

    train_batches: Callable[[int], Iterable[Batch]]
    """epoch (0-based) -> that epoch's shuffled training micro-batches, on the CPU."""
    eval_batches: Callable[[], Iterable[Batch]]
    """The evaluation part's batches: the validation fold, or the test split for the final model (the same on every
    worker, so every worker takes the same stopping decision)."""
    train_eval_batches: Callable[[], Iterable[Batch]]
    """A fixed sample of the training fold, scored each epoch for the train-vs-validation gap."""
    steps_per_epoch: int
    """Micro-batches per epoch on this worker; the loop takes at most this many (DDP needs equal counts)."""
    class_weights: torch.Tensor | None
    """Cross-entropy weight per class, or None."""


@dataclass
class TrainOutcome:
    """A finished run: its progress, the best epoch's trainable parameters and evaluation logits."""

    state: TrainState
    best_state: dict[str, torch.Tensor]
    best_eval_logits: np.ndarray
    eval_labels: np.ndarray


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


def grad_scaler_for(model: nn.Module, autocast_dtype: torch.dtype | None, device: torch.device
                    ) -> torch.amp.GradScaler | None:
    """A GradScaler when the forward runs in fp16: fp16 autocast, or a frozen fp16 base (`model.base_dtype=fp16`,
    even without autocast). Gradients flowing back through fp16 activations underflow to zero unless the loss is
    scaled; the scaler also skips a step whose gradients overflowed, so no inf or NaN reaches the fp32 weights."""
    if autocast_dtype == torch.float16 or half_base_dtype(model) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def warn_half_base_on_cpu(model: nn.Module, device: torch.device) -> None:
    """`model.base_dtype` bf16/fp16 is for GPUs: CPUs without AVX512-BF16/AMX have no fast half-precision matmul, so
    a step there runs several times slower than over an fp32 base (bench/results/full_scale.json)."""
    half = half_base_dtype(model)
    if half is not None and device.type == "cpu":
        log.warning("model.base_dtype=%s on a CPU: half-precision matmuls are slow on most CPUs (the 2.5B measured "
                    "~3x slower per step at 1 x 4 tokens; a backward matmul of 256 tokens ~140x); use "
                    "model.base_dtype=fp32 on a CPU", {torch.bfloat16: "bf16", torch.float16: "fp16"}[half])


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


def _score_epoch(model, data: TrainData, cfg: TrainConfig, score, device, autocast_dtype):
    """Evaluation metrics, `train_` metrics on the training sample, and `gap_<monitor>`."""
    eval_logits, eval_labels = predict_logits(model, data.eval_batches(), device, autocast_dtype)
    metrics = {k: float(v) for k, v in score(eval_logits, eval_labels).items()}
    if cfg.monitor not in metrics:
        raise KeyError(f"the score function returned {sorted(metrics)}, without train.monitor {cfg.monitor!r}")
    train_logits, train_labels = predict_logits(model, data.train_eval_batches(), device, autocast_dtype)
    metrics.update({f"train_{k}": float(v) for k, v in score(train_logits, train_labels).items()})
    metrics[f"gap_{cfg.monitor}"] = metrics[f"train_{cfg.monitor}"] - metrics[cfg.monitor]
    return metrics, eval_logits, eval_labels


def _update_state(state: TrainState, value: float, metrics: dict, select_best: bool) -> bool:
    """Count the epoch, track the best score (NaN never wins) and return whether this epoch is the new best.

    Without `select_best` (the final model) the last epoch is always kept, whatever the scores.
    """
    value = -math.inf if math.isnan(value) else value
    state.epoch += 1
    improved = not select_best or state.best_epoch < 0 or value > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.epochs_since_best = value, state.epoch, 0
    else:
        state.epochs_since_best += 1
    metrics.update(best_epoch=state.best_epoch, best_score=state.best_score)
    state.history.append(metrics)
    return improved


@dataclass
class _Run:
    """The optimisation state of one run, built once: what each epoch updates and each checkpoint saves."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    autocast_dtype: torch.dtype | None
    config_yaml: str


def _report_epoch(report, metrics, is_chief, model, run: _Run, state, best_state, best_logits):
    """Every worker reports; the chief attaches a fresh checkpoint dir, deleted once `report` has returned."""
    if not is_chief:
        return report(metrics, None)
    directory = Path(tempfile.mkdtemp(prefix="idengine-ckpt-"))
    try:
        save_checkpoint(directory, model, run.optimizer, run.scheduler, state, best_state, best_logits,
                        run.config_yaml, run.scaler)
        report(metrics, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _epoch(model, data: TrainData, cfg: TrainConfig, score, device, run: _Run, weights, state: TrainState,
           select_best: bool) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Train one epoch, then score it (every epoch when selecting the best, else only after the last one)."""
    torch.manual_seed(cfg.seed + state.epoch)  # dropout per epoch: a resumed run replays the same draws
    stats = train_epoch(model, data.train_batches(state.epoch), run.optimizer, run.scheduler, cfg, weights, device,
                        run.autocast_dtype, run.scaler, max_steps=data.steps_per_epoch)
    eval_labels = None
    if select_best or state.epoch + 1 == cfg.epochs:
        metrics, eval_logits, eval_labels = _score_epoch(model, data, cfg, score, device, run.autocast_dtype)
    else:
        metrics, eval_logits = {cfg.monitor: math.nan}, np.zeros((0,), dtype=np.float32)
    metrics.update(epoch=state.epoch + 1, loss=stats["loss"], seconds=stats["seconds"],
                   tokens_per_s=stats["tokens"] / max(stats["seconds"], 1e-9))
    return metrics, eval_logits, eval_labels


def run_training(
    model: nn.Module, data: TrainData, cfg: TrainConfig, score: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    device: torch.device, report: Callable[[dict, Path | None], None], resume_dir: Path | None = None,
    is_chief: bool = True, select_best: bool = True, config_yaml: str = "",
) -> TrainOutcome:
    """Train one run: epochs of train_epoch + scoring, early stopping on `cfg.monitor`, a report per epoch.

    Args:
        model, data, cfg: from build_model, on `device` (DDP-wrapped by the caller if distributed); the batches;
            training settings (epochs, lr, schedule, patience, monitor, precision, seed).
        score: (logits, labels) -> metrics that include cfg.monitor (higher is better).
        report: called once per epoch on every worker with the metrics and, on the chief, a checkpoint directory
            that is deleted when report returns (so report must copy or upload it synchronously).
        resume_dir: a save_checkpoint directory to continue from; is_chief: this worker writes checkpoints and logs.
        select_best: False for the final model: exactly cfg.epochs epochs, no early stopping, the last epoch is kept,
            and the evaluation data (the held-out test split) is scored once, after the last epoch, so that it
            can never influence training.
        config_yaml: the resolved config, stored in every checkpoint.

    Returns:
        The TrainOutcome; the model is left holding the best epoch's trainable parameters.
    """
    autocast_dtype = autocast_dtype_for(cfg.precision, device)
    warn_half_base_on_cpu(model, device)
    optimizer = build_optimizer(model, cfg)
    run = _Run(optimizer, build_scheduler(optimizer, cfg, cfg.epochs * math.ceil(data.steps_per_epoch /
                                                                              cfg.grad_accum_steps)),
               grad_scaler_for(model, autocast_dtype, device), autocast_dtype, config_yaml)
    state, best_state, best_logits, eval_labels = TrainState(), None, None, None
    if resume_dir is not None:
        state, best_state, best_logits = load_checkpoint(resume_dir, model, run.optimizer, run.scheduler, run.scaler)
        log.info("resumed after epoch %d (best epoch %d)", state.epoch, state.best_epoch)
    weights = data.class_weights.to(device) if data.class_weights is not None else None
    while state.epoch < cfg.epochs and not (select_best and 0 < cfg.patience <= state.epochs_since_best):
        metrics, eval_logits, labels = _epoch(model, data, cfg, score, device, run, weights, state, select_best)
        eval_labels = labels if labels is not None else eval_labels
        if _update_state(state, metrics[cfg.monitor], metrics, select_best):
            best_state, best_logits = trainable_state_dict(model), eval_logits
        if is_chief:
            log.info("epoch %d/%d loss %.4f eval %s %.4f train %s %.4f tokens/s %.0f", state.epoch, cfg.epochs,
                     metrics["loss"], cfg.monitor, metrics[cfg.monitor], cfg.monitor,
                     metrics.get(f"train_{cfg.monitor}", math.nan), metrics["tokens_per_s"])
        _report_epoch(report, metrics, is_chief, model, run, state, best_state, best_logits)
    if eval_labels is None:  # resumed a run that had already finished: no epoch ran here, so report its end again
        _report_epoch(report, dict(state.history[-1]), is_chief, model, run, state, best_state, best_logits)
        eval_labels = np.concatenate([b["labels"].numpy() for b in data.eval_batches()])
    load_trainable_state(model, best_state)
    return TrainOutcome(state=state, best_state=best_state, best_eval_logits=best_logits, eval_labels=eval_labels)


def train_local(
    model: nn.Module, data: TrainData, cfg: TrainConfig, score: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    device: torch.device,
) -> TrainOutcome:
    """run_training in this process, without Ray: moves the model to `device`; reports are only logged."""

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        log.debug("epoch %s metrics %s", metrics.get("epoch"), metrics)

    return run_training(model.to(device), data, cfg, score, device, report)


def local_train_data(
    train: dict[str, np.ndarray], evaluate: dict[str, np.ndarray], cfg: TrainConfig, num_classes: int,
    pad_id: int = PAD_ID,
) -> TrainData:
    """TrainData over in-memory tokenized columns (`input_ids`, `label`), for tests and runs without Ray.

    Training batches are reshuffled each epoch from (cfg.seed, epoch), so an epoch's batches can be replayed.

    Args:
        train, evaluate: columns as produced by `data.tokenize.tokenize_batch` plus the int `label` column.
        cfg: batch_size, train_eval_size, class_weighting, effective_beta and seed are read.
        num_classes, pad_id: size of the label space (for the class weights); the tokenizer's pad id.
    """
    n_train = len(train[LABEL])

    def batches(table: dict[str, np.ndarray], order: np.ndarray) -> Iterator[Batch]:
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            yield collate({INPUT_IDS: table[INPUT_IDS][rows], LABEL: table[LABEL][rows]}, pad_id)

    sample = train_eval_sample(n_train, cfg.train_eval_size, cfg.seed)
    return TrainData(
        train_batches=lambda epoch: batches(train, np.random.default_rng([cfg.seed, epoch]).permutation(n_train)),
        eval_batches=lambda: batches(evaluate, np.arange(len(evaluate[LABEL]))),
        train_eval_batches=lambda: batches(train, sample),
        steps_per_epoch=math.ceil(n_train / cfg.batch_size),
        class_weights=class_weights(train[LABEL], num_classes, cfg.class_weighting, cfg.effective_beta),
    )
