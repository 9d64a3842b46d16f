"""Recipe `idengine cv`: every fold of a prepared directory with one config -> metrics, out-of-fold logits.

1. Read the prepared records and their folds (computed once by prepare, never recomputed here).
2. Build the model kind's inputs once: the token table (transformer) or the embeddings (probe), both cached.
3. For each fold: train on the other folds, score the validation fold (`recipes/folds.py`), log, yield the result.
4. With `engine.enabled` (the default), the engine's out-of-fold step (`recipes/engine.py`): the folds' models also
   scored the rare species dealt to them, and the reference index + decision model are judged fold by fold.
5. Write metrics.json, oof.parquet, folds/<k>.json (per-epoch history), engine/, config.yaml and summary.md, in a
   staging directory that replaces the output only when complete.

Transformer folds are Ray Train runs named `<out name>-<key>-fold<k>`, where the key hashes the resolved config and
the prepared records: the same command started again finds its runs in `train.storage_path` and resumes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml

from idengine import layout as C
from idengine.config import KMER_KINDS, Config
from idengine.config_io import config_to_dict, save_config
from idengine.data.prepared import read_prepared, read_unknown
from idengine.data.splits import cv_folds
from idengine.evaluate.metrics import summarise_folds
from idengine.evaluate.oof import FoldResult, cv_metrics, write_oof
from idengine.features.embeddings import record_embeddings
from idengine.features.tokens import tokenized_table
from idengine.recipes.engine import EngineRun, engine_cv, rare_folds
from idengine.recipes.folds import backbone_embeddings, kmer_fold, probe_fold, transformer_fold
from idengine.report.markdown import cv_markdown
from idengine.storage import building, file_sha256, write_json, write_text

logger = logging.getLogger(__name__)


def run_key(config: Config, prepared_dir: str | Path) -> str:
    """A short hash of the resolved config and the prepared records: equal inputs give equal run names."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=True)
    digest = hashlib.sha256(f"{text}|{file_sha256(Path(prepared_dir) / C.RECORDS_FILE)}".encode())
    return digest.hexdigest()[:10]


def iter_folds(config: Config, prepared_dir: str | Path, out_dir: str | Path, with_rare: bool = False
               ) -> Iterator[FoldResult]:
    """Train and score every cv fold of a prepared directory, one at a time (Tune reports after each).

    Args:
        config: The resolved config; `model.kind` picks the transformer, the probe or a k-mer model.
        prepared_dir: Output of `idengine prepare`.
        out_dir: The cv output directory; its name starts the transformer folds' run names.
        with_rare: each fold's model also scores the rare species' records dealt to its fold (the engine's
            novelty evidence; `recipes/engine.py`).

    Yields:
        Each fold's FoldResult, in fold order.
    """
    records, labels = read_prepared(prepared_dir)
    folds = cv_folds(records[C.FOLD])
    unknown = read_unknown(prepared_dir) if with_rare else read_unknown(prepared_dir).iloc[:0]
    rare_fold = rare_folds(unknown, folds, config.engine.seed).to_numpy()
    kind = config.model.kind
    if kind == "transformer":
        tokens = tokenized_table(prepared_dir, config)
        stem = f"{Path(out_dir).name}-{run_key(config, prepared_dir)}"
    elif kind == "probe":
        embeddings = record_embeddings(prepared_dir, config, records)
        rare_embeddings = backbone_embeddings(config, unknown[C.SEQUENCE].tolist()) if len(unknown) else None
    for i, fold in enumerate(folds):
        logger.info("fold %s (%d/%d): %d validation records; per-epoch lines follow", fold, i + 1, len(folds),
                    int((records[C.FOLD] == fold).sum()))
        start, rare = time.time(), unknown[rare_fold == fold]
        if kind in KMER_KINDS:
            result = kmer_fold(config, records, labels, fold, rare)
        elif kind == "probe":
            x = rare_embeddings[rare_fold == fold] if rare_embeddings is not None else np.zeros((0, 1), np.float32)
            result = probe_fold(config, embeddings, records, labels, fold, rare, x)
        else:
            result = transformer_fold(config, tokens, labels, fold, f"{stem}-fold{fold}", rare)
        result.seconds = round(time.time() - start, 2)
        logger.info("fold %s (%d/%d) done in %.0f s: val %s=%.4f top1=%.4f, train-val gap %.4f", fold, i + 1,
                    len(folds), result.seconds, config.train.monitor, result.val[config.train.monitor],
                    result.val["top1_acc"], result.gap)
        yield result


def write_cv(out_dir: str | Path, config: Config, results: list[FoldResult], num_classes: int,
             engine: EngineRun | None = None) -> Path:
    """Write the cv directory of finished folds (replacing out_dir only once everything is written)."""
    out_dir = Path(out_dir)
    metrics = cv_metrics(config, results, num_classes)
    if engine is not None:
        metrics["engine"] = engine.metrics
    with building(out_dir) as tmp:
        if engine is not None:
            engine.write(tmp)
        write_json(tmp / C.METRICS_FILE, metrics)
        (tmp / C.FOLD_HISTORY_DIR).mkdir()
        for r in results:
            (tmp / C.FOLD_HISTORY_DIR / f"{r.fold}.json").write_text(json.dumps(r.history, indent=1))
        write_oof(tmp / C.OOF_FILE, results)
        save_config(config, tmp / C.CONFIG_FILE)
        write_text(tmp / C.SUMMARY_FILE, cv_markdown(metrics))
    monitor = config.train.monitor
    logger.info("cv done: mean val %s %.4f +- %.4f -> %s", monitor, metrics["mean"][monitor]["mean"],
                metrics["mean"][monitor]["sd"], out_dir)
    return out_dir


def run_cv(config: Config, prepared_dir: str | Path, out_dir: str | Path) -> Path:
    """`idengine cv`: every fold, then (engine.enabled) the engine's out-of-fold step, then the cv directory.

    Returns:
        The output directory.
    """
    records, labels = read_prepared(prepared_dir)
    enabled = config.engine.enabled
    results = list(iter_folds(config, prepared_dir, out_dir, with_rare=enabled))
    engine = engine_cv(config, records, read_unknown(prepared_dir), labels, results) if enabled else None
    return write_cv(out_dir, config, results, labels.num_classes, engine)


def running_summary(results: list[FoldResult]) -> dict:
    """Mean and sd of each validation metric over the folds finished so far."""
    return summarise_folds([r.val for r in results])
