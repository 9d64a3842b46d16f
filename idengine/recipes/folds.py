"""One cv fold of each model kind, trained on the fold's training part and scored on its validation fold.

Every kind ends in the same `FoldResult` (`evaluate/oof.py`), on the same rows: the split is `data.splits.fold_rows`
and the training sample of the train-vs-validation gap is `data.splits.train_eval_sample`.
- k-mer models and the probe fit in this process in one pass ("one epoch"); the probe on cached embeddings;
- the transformer trains as a Ray Train run (`train/ray_train.fit_fold`) with early stopping.
Each fold's model also scores the records of rare species dealt to its fold (`rare`): species it never had as a
class, which the engine's decision model learns novelty from (`reference/scenarios.py`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from idengine import layout as C
from idengine.config import Config
from idengine.data.labels import LabelSpace
from idengine.data.splits import fold_rows, train_eval_sample
from idengine.evaluate.metrics import classification_metrics, score_logits, softmax
from idengine.evaluate.oof import FoldResult, fold_result
from idengine.data.tokenize import load_tokenizer
from idengine.models.inference import autocast_dtype_for, sequence_embeddings, sequence_logits
from idengine.models.kmer import fit_kmer_model
from idengine.models.probe import fit_probe
from idengine.models.transformer import build_model, load_backbone, load_trainable_state
from idengine.train.checkpoint import read_best_weights
from idengine.train.ray_train import fit_fold


def _one_pass_fold(config: Config, fold: str, ids: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                   fit: Callable[[np.ndarray], tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]]) -> FoldResult:
    """A model fitted in one pass: fit on the training rows, score the validation rows and the training sample.

    Args:
        fit: training row positions -> (a function from row positions to logits, the rare records' logits).
    """
    start = time.time()
    logits_of, rare_logits = fit(train)
    fit_s = time.time() - start
    start = time.time()
    val_logits = logits_of(val)
    predict_s = time.time() - start
    sample = train[train_eval_sample(len(train), config.train.train_eval_size, config.train.seed)]
    k, monitor = config.train.top_k, config.train.monitor
    val_m = classification_metrics(y[val], softmax(val_logits), top_k=k)
    train_m = classification_metrics(y[sample], softmax(logits_of(sample)), top_k=k)
    epoch = {**val_m, **{f"train_{m}": v for m, v in train_m.items()}, "epoch": 1, "fit_s": round(fit_s, 2),
             "predict_seqs_per_s": round(len(val) / max(predict_s, 1e-9), 1),
             f"gap_{monitor}": train_m[monitor] - val_m[monitor]}
    result = fold_result(fold, ids[val], y[val], val_logits, epoch, [epoch], monitor)
    result.rare_logits = rare_logits
    return result


def kmer_fold(config: Config, records: pd.DataFrame, labels: LabelSpace, fold: str, rare: pd.DataFrame) -> FoldResult:
    """A k-mer model (`model.kind` kmer-nb or kmer-linear) fitted on the fold's training records."""
    sequences, y = records[C.SEQUENCE].to_numpy(), records[C.LABEL].to_numpy()
    train, val = fold_rows(records[C.FOLD], fold)

    def fit(rows: np.ndarray):
        model = fit_kmer_model(config.model.kind, sequences[rows], y[rows], labels.num_classes,
                               k=config.model.kmer, seed=config.train.seed)
        return (lambda at: model.logits(sequences[at])), model.logits(rare[C.SEQUENCE].to_numpy())

    return _with_rare(_one_pass_fold(config, fold, records[C.ID].to_numpy(), y, train, val, fit), rare)


def probe_fold(config: Config, embeddings: np.ndarray, records: pd.DataFrame, labels: LabelSpace,
               fold: str, rare: pd.DataFrame, rare_embeddings: np.ndarray) -> FoldResult:
    """A probe head (`model.probe_head`) fitted on the fold's training records' cached embeddings."""
    y = records[C.LABEL].to_numpy()
    groups = records[C.GROUP].to_numpy() if C.GROUP in records else None
    train, val = fold_rows(records[C.FOLD], fold)

    def fit(rows: np.ndarray):
        probe = fit_probe(config.model.probe_head, embeddings[rows], y[rows], labels.num_classes,
                          seed=config.train.seed, groups=None if groups is None else groups[rows])
        return (lambda at: probe.logits(embeddings[at])), probe.logits(rare_embeddings)

    return _with_rare(_one_pass_fold(config, fold, records[C.ID].to_numpy(), y, train, val, fit), rare)


def transformer_fold(config: Config, tokens: pa.Table, labels: LabelSpace, fold: str, run_name: str,
                     rare: pd.DataFrame) -> FoldResult:
    """The transformer fine-tuned on the fold as one Ray Train run; its best epoch (by train.monitor) is kept."""
    score = functools.partial(score_logits, top_k=config.train.top_k)
    id2label = dict(enumerate(labels.species))
    run = fit_fold(config, tokens, fold, id2label, score, run_name)
    best = run.history[run.best_epoch - 1] if run.best_epoch >= 1 else run.history[-1]
    result = fold_result(fold, run.eval_ids, run.eval_labels, run.eval_logits, best, run.history,
                         config.train.monitor)
    result.checkpoint = run.checkpoint_path  # the fold's best adapter + head (Ray Train storage)
    if len(rare):
        model = build_model(config.model, config.lora, labels.num_classes, id2label, seed=config.train.seed)
        load_trainable_state(model, read_best_weights(run.checkpoint_path))
        result.rare_logits = fold_model_logits(model.eval(), config, rare[C.SEQUENCE].tolist())
    return _with_rare(result, rare)


def _device_and_autocast(config: Config) -> tuple[torch.device, torch.dtype | None]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, autocast_dtype_for(config.train.precision, device)


def fold_model_logits(model, config: Config, sequences: list[str]) -> np.ndarray:
    """A fold's classifier scoring cleaned sequences in this process (on the GPU when there is one)."""
    device, autocast = _device_and_autocast(config)
    tokenizer = load_tokenizer(config.model.backbone, config.model.revision, config.model.trust_remote_code)
    return sequence_logits(model.to(device), tokenizer, sequences, config.model.max_tokens,
                           config.predict.batch_size, device, autocast)


def backbone_embeddings(config: Config, sequences: list[str]) -> np.ndarray:
    """The frozen backbone's pooled embeddings of cleaned sequences in this process (the probe's inputs)."""
    device, autocast = _device_and_autocast(config)
    tokenizer = load_tokenizer(config.model.backbone, config.model.revision, config.model.trust_remote_code)
    return sequence_embeddings(load_backbone(config.model).to(device), tokenizer, sequences,
                               config.model.max_tokens, config.predict.batch_size, config.model.pooling, device,
                               autocast)


def _with_rare(result: FoldResult, rare: pd.DataFrame) -> FoldResult:
    result.rare_ids = rare[C.ID].to_numpy(dtype=object)
    if not len(rare):
        result.rare_logits = np.zeros((0, result.logits.shape[1]), dtype=np.float32)
    result.rare_logits = np.asarray(result.rare_logits, dtype=np.float32)
    return result
