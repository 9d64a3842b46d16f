"""Step 10: cross-validation: every fold of a prepared directory with one config -> metrics, out-of-fold logits.

The transformer's folds each run as one Ray Train run (`train/ray_train.py`); the k-mer baselines run in-process on
the same folds and are scored by the same metrics module, so their rows sit beside the transformer's.
Outputs (written to a temporary directory, renamed when complete): metrics.json, oof.parquet, config.yaml,
summary.md and folds/<k>.json (per-epoch history).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from idengine import columns as C
from idengine.config import BASELINE_BACKBONES, Config, save_config

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
OOF_FILE = "oof.parquet"
SUMMARY_FILE = "summary.md"


def cv_folds(records) -> list[str]:
    """The validation folds of a prepared table, in order ("0", "1", ...)."""
    folds = sorted({f for f in records[C.FOLD].unique() if f != C.TEST_FOLD}, key=int)
    if len(folds) < 2:
        raise ValueError(f"need at least 2 cross-validation folds, found {folds}")
    return folds


def run_cv(config: Config, prepared_dir: str | Path, out_dir: str | Path,
           on_fold: Callable[[int, dict], None] | None = None) -> Path:
    """Run every fold and write the cv directory.

    Args:
        config: The resolved config; `model.backbone` picks the transformer or a k-mer baseline.
        prepared_dir: Output of `idengine prepare` (its folds are read, never recomputed).
        out_dir: Where the cv outputs go; replaced only once everything is written.
        on_fold: Called after each fold with (folds done, running summary); Tune uses it to report.

    Returns:
        The output directory.
    """
    from idengine.data.prepare import read_prepared
    from idengine.metrics import summarise_folds

    records, labels = read_prepared(prepared_dir)
    folds = cv_folds(records)
    out_dir = Path(out_dir)
    if config.model.is_baseline():
        fit = _baseline_fold_fn(config, records, labels)
    elif config.model.finetune == "probe":
        from idengine.probe import probe_fold_fn

        fit = probe_fold_fn(config, prepared_dir, records, labels)
    else:
        fit = _transformer_fold_fn(config, prepared_dir, labels, out_dir)
    results = []
    for i, fold in enumerate(folds):
        start = time.time()
        logger.info("fold %s (%d/%d): %d validation records; per-epoch lines follow", fold, i + 1, len(folds),
                    int((records[C.FOLD] == fold).sum()))
        result = fit(fold)
        result["seconds"] = round(time.time() - start, 2)
        results.append(result)
        running = summarise_folds([r["val"] for r in results])
        logger.info("fold %s (%d/%d) done in %.0f s: val %s=%.4f top1=%.4f, train-val gap %.4f",
                    fold, i + 1, len(folds), result["seconds"], config.train.monitor,
                    result["val"][config.train.monitor], result["val"]["top1_acc"], result["gap"])
        if on_fold is not None:
            on_fold(i + 1, {"fold": fold, "val": result["val"], "running": running})
    return _write_cv(out_dir, config, results, labels.num_classes)


def _transformer_fold_fn(config: Config, prepared_dir, labels, out_dir: Path):
    from idengine.data.ray_tokenize import tokenized_table
    from idengine.train.ray_train import fit_fold

    tokens = tokenized_table(prepared_dir, config)
    id2label = dict(enumerate(labels.species))
    stamp = f"{out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def fit(fold: str) -> dict:
        run = fit_fold(config, tokens, fold, labels.num_classes, id2label, run_name=f"{stamp}-fold{fold}")
        best = run.history[run.best_epoch - 1] if run.best_epoch >= 1 else run.history[-1]
        result = _fold_result(fold, run.val_ids, run.val_labels, run.val_logits, best, run.history, config)
        return {**result, "checkpoint": run.checkpoint_path}  # the fold's best adapter + head (Ray Train storage)

    return fit


def _baseline_fold_fn(config: Config, records, labels):
    from idengine.baselines import fit_baseline
    from idengine.metrics import classification_metrics, softmax

    def fit(fold: str) -> dict:
        train = records[(records[C.FOLD] != fold) & (records[C.FOLD] != C.TEST_FOLD)]
        val = records[records[C.FOLD] == fold]
        start = time.time()
        model = fit_baseline(config.model.backbone, train[C.SEQUENCE].to_numpy(), train[C.LABEL].to_numpy(),
                             labels.num_classes, k=config.model.kmer, seed=config.train.seed)
        fit_s = time.time() - start
        sample = train.sample(n=min(config.train.train_eval_size, len(train)), random_state=config.train.seed)
        start = time.time()
        val_logits = model.logits(val[C.SEQUENCE].to_numpy())
        predict_s = time.time() - start
        train_logits = model.logits(sample[C.SEQUENCE].to_numpy())
        k = config.train.top_k
        val_m = classification_metrics(val[C.LABEL].to_numpy(), softmax(val_logits), top_k=k)
        train_m = classification_metrics(sample[C.LABEL].to_numpy(), softmax(train_logits), top_k=k)
        epoch = {**val_m, **{f"train_{m}": v for m, v in train_m.items()}, "epoch": 1, "fit_s": round(fit_s, 2),
                 "predict_seqs_per_s": round(len(val) / max(predict_s, 1e-9), 1)}
        epoch[f"gap_{config.train.monitor}"] = train_m[config.train.monitor] - val_m[config.train.monitor]
        return _fold_result(fold, val[C.ID].to_numpy(), val[C.LABEL].to_numpy(), val_logits, epoch, [epoch], config)

    return fit


# Per-epoch bookkeeping that sits beside the metrics in a history entry.
NOT_METRICS = ("epoch", "loss", "seconds", "tokens_per_s", "best_epoch", "best_score", "fit_s", "predict_seqs_per_s")


def _fold_result(fold, ids, y, logits, best: dict, history: list[dict], config: Config) -> dict:
    metric_names = [k for k in best if not k.startswith(("train_", "gap_")) and k not in NOT_METRICS]
    val = {k: float(best[k]) for k in metric_names if isinstance(best[k], (int, float))}
    train = {k[len("train_"):]: float(v) for k, v in best.items() if k.startswith("train_")}
    gap = float(train.get(config.train.monitor, np.nan) - val.get(config.train.monitor, np.nan))
    return {"fold": fold, "best_epoch": int(best.get("epoch", len(history))), "epochs_run": len(history),
            "val": val, "train": train, "gap": gap, "history": history,
            "ids": np.asarray(ids), "labels": np.asarray(y), "logits": np.asarray(logits, dtype=np.float32)}


def _write_cv(out_dir: Path, config: Config, results: list[dict], num_classes: int) -> Path:
    from idengine.metrics import summarise_folds

    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
    (tmp / "folds").mkdir(parents=True)
    monitor = config.train.monitor
    per_fold = [{k: r[k] for k in ("fold", "best_epoch", "epochs_run", "val", "train", "gap", "seconds", "checkpoint")
                 if k in r} for r in results]
    metrics = {
        "backbone": config.model.backbone,
        "finetune": config.model.finetune,
        "monitor": monitor,
        "num_classes": num_classes,
        "folds": per_fold,
        "mean": summarise_folds([r["val"] for r in results]),
        "train_mean": summarise_folds([r["train"] for r in results]) if results[0]["train"] else {},
        "gap": summarise_folds([{monitor: r["gap"]} for r in results]),
        "seconds": round(sum(r["seconds"] for r in results), 2),
    }
    (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    for r in results:
        (tmp / "folds" / f"{r['fold']}.json").write_text(json.dumps(r["history"], indent=1))
    _write_oof(tmp / OOF_FILE, results)
    save_config(config, tmp / C.CONFIG_FILE)
    (tmp / SUMMARY_FILE).write_text(summary_markdown(metrics))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    logger.info("cv done: mean val %s %.4f +- %.4f -> %s", monitor, metrics["mean"][monitor]["mean"],
                metrics["mean"][monitor]["sd"], out_dir)
    return out_dir


def _write_oof(path: Path, results: list[dict]) -> None:
    ids = np.concatenate([r["ids"] for r in results]).astype(str)
    logits = np.concatenate([r["logits"] for r in results])
    table = pa.table({
        C.ID: ids,
        C.FOLD: np.concatenate([[r["fold"]] * len(r["ids"]) for r in results]).astype(str),
        C.LABEL: np.concatenate([r["labels"] for r in results]).astype(np.int32),
        "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), logits.shape[1]),
    })
    pq.write_table(table, path)


def read_oof(cv_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold (ids, folds, labels, logits) of a cv directory, for calibration."""
    table = pq.read_table(Path(cv_dir) / OOF_FILE)
    n = table.num_rows
    logits = np.asarray(table.column("logits").combine_chunks().flatten(), dtype=np.float32).reshape(n, -1)
    return (np.asarray(table.column(C.ID).to_pylist()), np.asarray(table.column(C.FOLD).to_pylist()),
            np.asarray(table.column(C.LABEL)), logits)


def summary_markdown(metrics: dict) -> str:
    """A short human summary of metrics.json."""
    mode = "" if metrics["backbone"] in BASELINE_BACKBONES else f" ({metrics['finetune']})"
    lines = [f"# Cross-validation: {metrics['backbone']}{mode}", "",
             f"{len(metrics['folds'])} folds, {metrics['num_classes']} species, {metrics['seconds']:.0f} s.", "",
             "| metric | mean | sd |", "|---|---|---|"]
    for name, value in metrics["mean"].items():
        if name != "n":
            lines.append(f"| {name} | {value['mean']:.4f} | {value['sd']:.4f} |")
    lines += ["", f"| fold | best epoch | val {metrics['monitor']} | train {metrics['monitor']} | gap |",
              "|---|---|---|---|---|"]
    for f in metrics["folds"]:
        train = f["train"].get(metrics["monitor"], float("nan"))
        lines.append(f"| {f['fold']} | {f['best_epoch']} | {f['val'][metrics['monitor']]:.4f} | {train:.4f} "
                     f"| {f['gap']:.4f} |")
    return "\n".join(lines) + "\n"
