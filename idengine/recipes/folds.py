"""One cv fold of each model kind, trained on the fold's training part and scored on its validation fold.

Every kind ends in the same `FoldResult` (`evaluate/oof.py`), on the same rows: the split is `data.splits.fold_rows`
and the training sample of the train-vs-validation gap is `data.splits.train_eval_sample`.
- k-mer models and the probe fit in this process in one pass ("one epoch"); the probe on cached embeddings;
- the transformer trains as a Ray Train run (`train/ray_train.fit_fold`) with early stopping.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from idengine import layout as C
from idengine.config import Config
from idengine.data.labels import LabelSpace
from idengine.data.splits import fold_rows, train_eval_sample
from idengine.evaluate.metrics import classification_metrics, score_logits, softmax
from idengine.evaluate.oof import FoldResult, fold_result
from idengine.models.kmer import fit_kmer_model
from idengine.models.probe import fit_probe
from idengine.train.ray_train import fit_fold


def _one_pass_fold(config: Config, fold: str, ids: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                   fit: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]) -> FoldResult:
    """A model fitted in one pass: fit on the training rows, score the validation rows and the training sample.

    Args:
        fit: training row positions -> a function from row positions to logits.
    """
    start = time.time()
    logits_of = fit(train)
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
    return fold_result(fold, ids[val], y[val], val_logits, epoch, [epoch], monitor)


def kmer_fold(config: Config, records: pd.DataFrame, labels: LabelSpace, fold: str) -> FoldResult:
    """A k-mer model (`model.kind` kmer-nb or kmer-linear) fitted on the fold's training records."""
    sequences, y = records[C.SEQUENCE].to_numpy(), records[C.LABEL].to_numpy()
    train, val = fold_rows(records[C.FOLD], fold)

    def fit(rows: np.ndarray):
        model = fit_kmer_model(config.model.kind, sequences[rows], y[rows], labels.num_classes,
                               k=config.model.kmer, seed=config.train.seed)
        return lambda at: model.logits(sequences[at])

    return _one_pass_fold(config, fold, records[C.ID].to_numpy(), y, train, val, fit)


def probe_fold(config: Config, embeddings: np.ndarray, records: pd.DataFrame, labels: LabelSpace,
               fold: str) -> FoldResult:
    """A probe head (`model.probe_head`) fitted on the fold's training records' cached embeddings."""
    y = records[C.LABEL].to_numpy()
    groups = records[C.GROUP].to_numpy() if C.GROUP in records else None
    train, val = fold_rows(records[C.FOLD], fold)

    def fit(rows: np.ndarray):
        probe = fit_probe(config.model.probe_head, embeddings[rows], y[rows], labels.num_classes,
                          seed=config.train.seed, groups=None if groups is None else groups[rows])
        return lambda at: probe.logits(embeddings[at])

    return _one_pass_fold(config, fold, records[C.ID].to_numpy(), y, train, val, fit)


def transformer_fold(config: Config, tokens: pa.Table, labels: LabelSpace, fold: str, run_name: str) -> FoldResult:
    """The transformer fine-tuned on the fold as one Ray Train run; its best epoch (by train.monitor) is kept."""
    score = functools.partial(score_logits, top_k=config.train.top_k)
    run = fit_fold(config, tokens, fold, dict(enumerate(labels.species)), score, run_name)
    best = run.history[run.best_epoch - 1] if run.best_epoch >= 1 else run.history[-1]
    result = fold_result(fold, run.eval_ids, run.eval_labels, run.eval_logits, best, run.history,
                         config.train.monitor)
    result.checkpoint = run.checkpoint_path  # the fold's best adapter + head (Ray Train storage)
    return result
