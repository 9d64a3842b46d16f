"""Step 9d, out-of-fold: one fold's result, whatever the model kind, and the cv run's metrics and logits tables.

Every model kind (transformer, probe, k-mer models) ends a fold as a `FoldResult` built by `fold_result`: its best
epoch's validation metrics, the same metrics on the fixed training sample, the gap between them, and the validation
logits. `cv_metrics` turns the folds into metrics.json; `write_oof` / `read_oof` store the logits (oof.parquet),
which calibration and the decision step are fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from idengine import layout as C
from idengine.config import Config
from idengine.evaluate.metrics import summarise_folds

NOT_METRICS = ("epoch", "loss", "seconds", "tokens_per_s", "best_epoch", "best_score", "fit_s", "predict_seqs_per_s")
"""Per-epoch bookkeeping that sits beside the metrics in a history entry."""


@dataclass
class FoldResult:
    """One validation fold, scored: the kept epoch's metrics and logits, and the epochs that led to it."""

    fold: str
    best_epoch: int
    epochs_run: int
    val: dict[str, float]
    """Validation metrics of the kept epoch."""
    train: dict[str, float]
    """The same metrics on the fold's fixed training sample (`data.splits.train_eval_sample`)."""
    gap: float
    """train - validation of train.monitor: the over-fitting signal."""
    history: list[dict]
    ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    seconds: float = 0.0
    checkpoint: str = ""
    """Transformers: the kept epoch's adapter + head in Ray Train storage."""
    rare_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    """Records of rare species (never classes) dealt to this fold, scored by this fold's model for the engine."""
    rare_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The fold's entry in metrics.json."""
        out = {"fold": self.fold, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "val": self.val,
               "train": self.train, "gap": self.gap, "seconds": self.seconds, **self.extra}
        return {**out, "checkpoint": self.checkpoint} if self.checkpoint else out


def fold_result(fold: str, ids, labels, logits, best: dict, history: list[dict], monitor: str) -> FoldResult:
    """A FoldResult from the kept epoch's history entry (`val` metrics, `train_` metrics) and its logits."""
    names = [k for k in best if not k.startswith(("train_", "gap_")) and k not in NOT_METRICS]
    val = {k: float(best[k]) for k in names if isinstance(best[k], (int, float))}
    train = {k[len("train_"):]: float(v) for k, v in best.items() if k.startswith("train_")}
    gap = float(train.get(monitor, np.nan) - val.get(monitor, np.nan))
    return FoldResult(fold, int(best.get("epoch", len(history))), len(history), val, train, gap, history,
                      np.asarray(ids), np.asarray(labels), np.asarray(logits, dtype=np.float32))


def cv_metrics(config: Config, results: list[FoldResult], num_classes: int) -> dict[str, Any]:
    """metrics.json of a cv run: per fold, mean and sd over folds, the train-vs-validation gap, seconds."""
    monitor = config.train.monitor
    return {
        "model": config.model.describe(),
        "kind": config.model.kind,
        "monitor": monitor,
        "num_classes": num_classes,
        "folds": [r.summary() for r in results],
        "mean": summarise_folds([r.val for r in results]),
        "train_mean": summarise_folds([r.train for r in results]) if results[0].train else {},
        "gap": summarise_folds([{monitor: r.gap} for r in results]),
        "seconds": round(sum(r.seconds for r in results), 2),
    }


def write_oof(path: Path, results: list[FoldResult]) -> None:
    """oof.parquet: id, fold, label and the logits row of every validation record."""
    ids = np.concatenate([r.ids for r in results]).astype(str)
    logits = np.concatenate([r.logits for r in results])
    table = pa.table({
        C.ID: ids,
        C.FOLD: np.concatenate([[r.fold] * len(r.ids) for r in results]).astype(str),
        C.LABEL: np.concatenate([r.labels for r in results]).astype(np.int32),
        C.LOGITS: pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1]),
    })
    pq.write_table(table, path)


def read_oof(cv_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold (ids, folds, labels, logits) of a cv directory."""
    table = pq.read_table(Path(cv_dir) / C.OOF_FILE)
    n = table.num_rows
    logits = np.asarray(table.column(C.LOGITS).combine_chunks().flatten(), dtype=np.float32).reshape(n, -1)
    return (np.asarray(table.column(C.ID).to_pylist()), np.asarray(table.column(C.FOLD).to_pylist()),
            np.asarray(table.column(C.LABEL)).astype(np.int64), logits)
