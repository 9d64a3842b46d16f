"""Recipe `idengine train`: calibrate on out-of-fold logits, train on all non-test data, test once, export.

1. Calibration and the species threshold are fitted on the cv run's out-of-fold logits, never on the test split.
2. The final model trains on every non-test record for the median of the folds' best epochs (no early stopping).
3. The test split is scored once: metrics before/after calibration and calls with rank fallback.
4. The artifact is written (deploy/export.py) and checked: the exported model scores the test split through the
   same Ray Data path as `idengine predict`, and must agree with the trained model.
5. Open set: records of species set aside by the min-count filter (`unknown.parquet`) are called by the exported
   artifact; every species call there is wrong (over-classification).
6. Everything lands in one artifact directory with metrics.json, reliability.png and final_report.md, which
   replaces the output only when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idengine import layout as C
from idengine.config import Config
from idengine.data.labels import LabelSpace
from idengine.data.prepared import read_prepared, read_unknown
from idengine.data.tokenize import load_tokenizer
from idengine.deploy.export import update_artifact_files, write_artifact
from idengine.deploy.predict import predict_table
from idengine.evaluate.calibrate import Calibrator, ThresholdChoice, calibration_report, choose_threshold, \
    fit_calibrator
from idengine.evaluate.calls import calls_for, calls_summary, open_set_report
from idengine.evaluate.metrics import classification_metrics, reliability_bins, expected_calibration_error, \
    score_logits, softmax
from idengine.evaluate.oof import read_oof
from idengine.features.tokens import tokenized_table
from idengine.models.transformer import build_model, load_trainable_state
from idengine.recipes.cv import run_key
from idengine.report.markdown import final_markdown
from idengine.report.plots import reliability_comparison_figure, save_png
from idengine.storage import building, read_json
from idengine.train.checkpoint import read_best_weights
from idengine.train.ray_train import TrainRun, fit_final

log = logging.getLogger(__name__)

EXPORT_CHECK_TOLERANCE = 1e-3  # exported vs trained test probabilities; mixed precision may exceed it (a warning)


def final_epochs(cv_metrics: dict[str, Any]) -> tuple[int, list[int]]:
    """The epochs of the final run: the median of the folds' best epochs, rounded half up (at least 1)."""
    best = [int(f["best_epoch"]) for f in cv_metrics["folds"] if int(f.get("best_epoch", -1)) >= 1]
    if not best:
        raise ValueError("the cv metrics.json has no fold with a best_epoch; run `idengine cv` to the end")
    return max(1, math.floor(float(np.median(best)) + 0.5)), best


def calibrate_on_oof(config: Config, cv_dir: Path, labels: LabelSpace, test_ids: set[str],
                     png: Path) -> tuple[Calibrator, ThresholdChoice, dict[str, Any]]:
    """Fit the calibrator and choose the threshold on out-of-fold logits; draw the reliability diagram.

    Raises:
        ValueError: the OOF logits have another number of classes, or hold test records.
    """
    ids, _folds, y, logits = read_oof(cv_dir)
    if logits.shape[1] != labels.num_classes:
        raise ValueError(f"{cv_dir}: out-of-fold logits have {logits.shape[1]} classes, the prepared label map "
                         f"{labels.num_classes}; run cv on this prepared directory")
    leaked = test_ids.intersection(ids.tolist())
    if leaked:
        raise ValueError(f"{cv_dir}: {len(leaked)} out-of-fold records belong to the test split; rerun cv")
    calibrator = fit_calibrator(logits, y, config.calibrate.method)
    before, after = softmax(logits), calibrator.apply(logits)
    save_png(reliability_comparison_figure(reliability_bins(y, before), reliability_bins(y, after),
                                           expected_calibration_error(y, before),
                                           expected_calibration_error(y, after), y.size), png, dpi=110)
    choice = choose_threshold(after, y, config.calibrate.target_precision)
    report = calibration_report(logits, y, calibrator)
    log.info("calibration (%s) on %d OOF records: log loss %.4f -> %.4f; threshold %.4f", calibrator.method, y.size,
             report["before"]["log_loss"], report["after"]["log_loss"], choice.threshold)
    return calibrator, choice, report


def train_on_all(config: Config, prepared_dir: Path, labels: LabelSpace, run_name: str):
    """Train on every non-test record (`fit_final`), then rebuild the trained model in this process.

    Returns (TrainRun whose eval_* hold the test split's logits, the trained model in eval mode).
    """
    id2label = dict(enumerate(labels.species))
    score = functools.partial(score_logits, top_k=config.train.top_k)
    run = fit_final(config, tokenized_table(prepared_dir, config), id2label, score, run_name)
    model = build_model(config.model, config.lora, labels.num_classes, id2label, seed=config.train.seed)
    load_trainable_state(model, read_best_weights(run.checkpoint_path))
    return run, model.eval()


def align_to_test(run: TrainRun, test: pd.DataFrame) -> None:
    """Put the run's test logits in the order of the test records; RuntimeError when records or labels differ."""
    ids = np.asarray(run.eval_ids).astype(str)
    if sorted(ids) != sorted(test[C.ID]):
        raise RuntimeError(f"the final run scored {len(ids)} records, the test split has {len(test)}")
    order = pd.Series(np.arange(len(ids)), index=ids).loc[test[C.ID]].to_numpy()
    run.eval_ids, run.eval_labels, run.eval_logits = ids[order], np.asarray(run.eval_labels)[order], \
        run.eval_logits[order]
    if not np.array_equal(run.eval_labels, test[C.LABEL].to_numpy()):
        raise RuntimeError("the final run's test labels disagree with records.parquet: re-tokenize the prepared dir")


def score_test(run: TrainRun, calibrator: Calibrator, labels: LabelSpace, threshold: float, config: Config) -> dict:
    """Test metrics (before/after calibration), calibration report and calls with rank fallback on the test split."""
    y, logits = np.asarray(run.eval_labels, dtype=np.int64), np.asarray(run.eval_logits, dtype=np.float64)
    probs = calibrator.apply(logits)
    k = config.train.top_k
    truth = labels.taxonomy_table().loc[y].reset_index(drop=True)
    calls = calls_for(probs, labels, threshold, config.calibrate.rank_fallback)
    return {"n": int(y.size), "before_calibration": classification_metrics(y, softmax(logits), k),
            "after_calibration": classification_metrics(y, probs, k),
            "calibration": calibration_report(logits, y, calibrator), "calls": calls_summary(calls, truth),
            "probs": probs}


def check_export(exported: pd.DataFrame, trained_probs: np.ndarray, labels: LabelSpace) -> dict[str, float]:
    """Compare the EXPORTED artifact's test calls with the trained model's own calibrated test probabilities."""
    if exported.empty:
        return {"max_abs_prob_diff": 0.0, "argmax_agreement": 1.0}
    species = np.asarray(labels.species, dtype=object)
    check = {"max_abs_prob_diff": float(np.abs(exported["top1_prob"].to_numpy() - trained_probs.max(axis=1)).max()),
             "argmax_agreement": float(np.mean(exported["top1_species"].to_numpy() ==
                                               species[trained_probs.argmax(axis=1)]))}
    if check["argmax_agreement"] < 0.99:
        raise RuntimeError(f"the exported model disagrees with the trained model on "
                           f"{1 - check['argmax_agreement']:.1%} of the test split: the export is broken")
    if check["max_abs_prob_diff"] > EXPORT_CHECK_TOLERANCE:
        log.warning("exported vs trained test probabilities differ by up to %.2g (mixed precision?)",
                    check["max_abs_prob_diff"])
    return check


def _inputs(config: Config, prepared_dir: Path, cv_dir: Path):
    """The prepared records and labels, the test split and the config of the final run (epochs from cv)."""
    records, labels = read_prepared(prepared_dir)
    test = records[records[C.FOLD] == C.TEST_FOLD].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"{prepared_dir} has no test split: set data.test_fraction > 0 and run prepare again")
    cv_metrics = read_json(cv_dir / C.METRICS_FILE)
    epochs, cv_best = final_epochs(cv_metrics)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs, patience=0))
    return records, labels, test, cv_metrics, (epochs, cv_best), config


def _check_and_open_set(tmp: Path, config: Config, labels: LabelSpace, test: pd.DataFrame, tested: dict,
                        prepared_dir: Path, use_ray: bool) -> tuple[dict, dict]:
    """Score the test split and the set-aside rare species with the artifact in `tmp`, as `idengine predict` does."""
    exported = predict_table(tmp, test[C.ID].tolist(), test[C.SEQUENCE].tolist(), config.predict, use_ray)
    check = check_export(exported, tested["probs"], labels)
    unknown = read_unknown(prepared_dir)
    unknown_calls = predict_table(tmp, unknown[C.ID].tolist(), unknown[C.SEQUENCE].tolist(), config.predict, use_ray)
    truth = unknown.reindex(columns=[C.SPECIES, *labels.ranks]).reset_index(drop=True)
    genera = {g for g in labels.taxonomy.get("genus", ()) if g}
    test_truth = test.reindex(columns=[C.SPECIES, *labels.ranks]).reset_index(drop=True)
    return check, open_set_report(unknown_calls, truth, exported, test_truth, genera if genera else None)


def train_final(config: Config, prepared_dir: str | Path, cv_dir: str | Path, out_dir: str | Path,
                merge: bool = False) -> Path:
    """`idengine train`: calibrate on OOF, train on all non-test data, test once, export, check, open set.

    Args:
        config: the resolved config (typically tune's best); train.epochs is replaced by the cv median best epoch.
        prepared_dir: output of `idengine prepare`.
        cv_dir: output of `idengine cv` with this config on that prepared directory (out-of-fold logits).
        out_dir: the artifact directory; replaced only once everything is written.
        merge: also export merged/ (the LoRA merged into a full model: gigabytes for the real backbone).

    Returns:
        out_dir as a Path. Raises ValueError for inconsistent inputs (no test split, OOF from other data).
    """
    if config.model.kind != "transformer":
        raise ValueError(f"idengine train exports transformer models only; {config.model.describe()} is "
                         "evaluated by `idengine cv` but cannot be exported yet")
    import ray

    prepared_dir, cv_dir, out = Path(prepared_dir), Path(cv_dir), Path(out_dir)
    records, labels, test, cv_metrics, (epochs, cv_best), config = _inputs(config, prepared_dir, cv_dir)
    with building(out) as tmp:
        png = tmp / C.RELIABILITY_PNG
        calibrator, choice, oof_report = calibrate_on_oof(config, cv_dir, labels, set(test[C.ID]), png)
        start = time.time()
        run, model = train_on_all(config, prepared_dir, labels, f"{out.name}-{run_key(config, prepared_dir)}-final")
        align_to_test(run, test)
        tested = score_test(run, calibrator, labels, choice.threshold, config)
        metrics = {"model": config.model.describe(),
                   "cv": {"mean": cv_metrics["mean"], "monitor": cv_metrics.get("monitor"), "dir": str(cv_dir)},
                   "training": {"epochs": epochs, "cv_best_epochs": cv_best, "seconds": round(time.time() - start, 1),
                                "history": run.history},
                   "calibration": {"method": calibrator.method, "oof": oof_report}, "threshold": choice.to_dict()}
        tokenizer = load_tokenizer(config.model.backbone, config.model.revision, config.model.trust_remote_code)
        # reliability.png is already in tmp, so the manifest lists it with the artifact's own files
        write_artifact(tmp, model, tokenizer, labels, config, calibrator, choice.threshold, metrics, merge=merge)
        metrics["export_check"], metrics["open_set"] = _check_and_open_set(
            tmp, config, labels, test, tested, prepared_dir, ray.is_initialized())
        tested.pop("probs")
        metrics["test"] = tested
        update_artifact_files(tmp, {C.METRICS_FILE: metrics, C.FINAL_REPORT_MD: final_markdown(metrics)})
    log.info("final model: test top1 %.4f, over-classification of unknown species %.3f -> %s",
             tested["after_calibration"]["top1_acc"], metrics["open_set"]["unknown"]["over_classification_rate"], out)
    return out
