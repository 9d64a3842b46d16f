"""Step 13, final (`idengine train`): calibrate on out-of-fold logits, train on all non-test data, test once, export.

1. Calibration and the species threshold are fitted on the cv run's out-of-fold logits, never on the test split.
2. The final model trains on every non-test record for the median of the folds' best epochs (no early stopping).
3. The test split is scored once: metrics before/after calibration, calls with rank fallback, coverage at threshold.
4. Open set: records of species set aside by the min-count filter (`unknown.parquet`) should not get species calls.
5. Everything lands in one artifact directory (see export.py) with metrics.json, reliability.png, final_report.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idengine import columns as C
from idengine.calibrate import (UNASSIGNED, Calibrator, ThresholdChoice, assign_calls, calibration_report,
                                choose_threshold, fit_calibrator, open_set_report, reliability_diagram)
from idengine.config import Config
from idengine.data.splits import LabelSpace
from idengine.metrics import classification_metrics, softmax

log = logging.getLogger(__name__)

RELIABILITY_PNG = "reliability.png"
REPORT_MD = "final_report.md"
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
    from idengine.cv import read_oof

    ids, _folds, y, logits = read_oof(cv_dir)
    if logits.shape[1] != labels.num_classes:
        raise ValueError(f"{cv_dir}: out-of-fold logits have {logits.shape[1]} classes, the prepared label map "
                         f"{labels.num_classes}; run cv on this prepared directory")
    leaked = test_ids.intersection(ids.tolist())
    if leaked:
        raise ValueError(f"{cv_dir}: {len(leaked)} out-of-fold records belong to the test split; rerun cv")
    calibrator = fit_calibrator(logits, y, config.calibrate.method)
    probs = calibrator.apply(logits)
    reliability_diagram(softmax(logits), probs, y, png)
    choice = choose_threshold(probs, y, config.calibrate.target_precision)
    report = calibration_report(logits, y, calibrator)
    log.info("calibration (%s) on %d OOF records: log loss %.4f -> %.4f; threshold %.4f", calibrator.method, y.size,
             report["before"]["log_loss"], report["after"]["log_loss"], choice.threshold)
    return calibrator, choice, report


def train_on_all(config: Config, prepared_dir: Path, labels: LabelSpace, run_name: str):
    """Train on every non-test record (fit_fold's fold "test"), then rebuild the trained model in this process.

    Returns (FoldRun whose val_* hold the test split's logits, the trained model in eval mode).
    """
    from idengine.data.ray_tokenize import tokenized_table
    from idengine.model import build_model, load_trainable_state
    from idengine.train.ray_train import fit_fold

    id2label = dict(enumerate(labels.species))
    tokens = tokenized_table(prepared_dir, config)
    run = fit_fold(config, tokens, C.TEST_FOLD, labels.num_classes, id2label, run_name)
    model = build_model(config.model, config.lora, labels.num_classes, id2label, seed=config.train.seed)
    load_trainable_state(model, read_checkpoint_weights(run.checkpoint_path))
    return run, model.eval()


def read_checkpoint_weights(checkpoint_path: str) -> dict:
    """`best.safetensors` of a Ray Train checkpoint directory, local or on s3:// / gs:// (pyarrow.fs; no pickle)."""
    from pyarrow import fs
    from safetensors.torch import load

    filesystem, path = fs.FileSystem.from_uri(checkpoint_path) if "://" in checkpoint_path else \
        (fs.LocalFileSystem(), checkpoint_path)
    with filesystem.open_input_stream(f"{path.rstrip('/')}/best.safetensors") as stream:
        return load(stream.read())


def align_to_test(run, test: pd.DataFrame) -> None:
    """Put the run's test logits in the order of the test records; RuntimeError when records or labels differ."""
    ids = np.asarray(run.val_ids).astype(str)
    if sorted(ids) != sorted(test[C.ID]):
        raise RuntimeError(f"the final run scored {len(ids)} records, the test split has {len(test)}")
    order = pd.Series(np.arange(len(ids)), index=ids).loc[test[C.ID]].to_numpy()
    run.val_ids, run.val_labels, run.val_logits = ids[order], np.asarray(run.val_labels)[order], run.val_logits[order]
    if not np.array_equal(run.val_labels, test[C.LABEL].to_numpy()):
        raise RuntimeError("the final run's test labels disagree with records.parquet: re-tokenize the prepared dir")


def calls_summary(calls: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Fraction of records called at each rank, and of those the fraction naming the true taxon at that rank.

    Args:
        calls: assign_calls output.
        truth: the true species and ranks of the same records (row-aligned columns `species`, genus, ...).
    """
    rank = calls["rank"].to_numpy()
    call = calls["call"].to_numpy()
    out: dict[str, Any] = {"n": int(len(calls)), "assigned": {}, "correct_at_rank": {}}
    right = np.zeros(len(calls), dtype=bool)
    for name in pd.unique(rank):
        at = rank == name
        out["assigned"][str(name)] = float(at.mean())
        if name != UNASSIGNED:
            column = C.SPECIES if name == "species" else name
            hit = call[at] == truth[column].to_numpy()[at]
            right[np.flatnonzero(at)[hit]] = True
            out["correct_at_rank"][str(name)] = float(hit.mean())
    out["correct_call_rate"] = float(right.mean()) if len(calls) else float("nan")
    out["wrong_call_rate"] = float(((rank != UNASSIGNED) & ~right).mean()) if len(calls) else float("nan")
    return out


def score_test(run, calibrator: Calibrator, labels: LabelSpace, threshold: float, config: Config) -> dict:
    """Test metrics (before/after calibration), calibration report and calls with rank fallback on the test split."""
    y, logits = np.asarray(run.val_labels, dtype=np.int64), np.asarray(run.val_logits, dtype=np.float64)
    probs = calibrator.apply(logits)
    k = config.train.top_k
    truth = labels.taxonomy_table().loc[y].reset_index(drop=True)
    calls = make_calls(probs, labels, threshold, config)
    return {"n": int(y.size), "before_calibration": classification_metrics(y, softmax(logits), k),
            "after_calibration": classification_metrics(y, probs, k),
            "calibration": calibration_report(logits, y, calibrator), "calls": calls_summary(calls, truth),
            "probs": probs}


def make_calls(probs: np.ndarray, labels: LabelSpace, threshold: float, config: Config) -> pd.DataFrame:
    """assign_calls with the label space's ranks, deepest first (none when rank fallback is off)."""
    ranks = list(reversed(labels.ranks)) if config.calibrate.rank_fallback else []
    return assign_calls(probs, labels.species, labels.taxonomy_table()[list(labels.ranks)], threshold, ranks=ranks)


def score_open_set(unknown: pd.DataFrame, probs: np.ndarray, labels: LabelSpace, threshold: float, config: Config,
                   test_probs: np.ndarray, test_y: np.ndarray) -> dict[str, Any]:
    """Over-classification of species absent from the reference, beside accuracy on the known test species."""
    calls = make_calls(probs, labels, threshold, config)
    truth = unknown.reindex(columns=[C.SPECIES, *labels.ranks]).reset_index(drop=True)
    report = open_set_report(probs, threshold, calls, test_probs, test_y, truth[list(labels.ranks)])
    report["unknown"]["calls"] = calls_summary(calls, truth)
    if "genus" in labels.ranks:
        known_genus = truth["genus"].isin({g for g in labels.taxonomy["genus"] if g}).to_numpy()
        genus_right = (calls["rank"].to_numpy() == "genus") & (calls["call"].to_numpy() == truth["genus"].to_numpy())
        report["unknown"]["genus_in_reference"] = float(known_genus.mean()) if len(truth) else float("nan")
        report["unknown"]["right_genus_call_when_genus_in_reference"] = \
            float(genus_right[known_genus].mean()) if known_genus.any() else float("nan")
    return report


def check_export(model_dir: Path, run, calibrator: Calibrator, sequences: list[str], config: Config,
                 use_ray: bool) -> dict[str, float]:
    """Score the test split with the EXPORTED model and compare with the trained model's own test logits."""
    from idengine.predict import score_logits

    exported = calibrator.apply(score_logits(model_dir, sequences, config.predict, use_ray))
    trained = calibrator.apply(np.asarray(run.val_logits, dtype=np.float64))
    check = {"max_abs_prob_diff": float(np.abs(exported - trained).max()) if len(sequences) else 0.0,
             "argmax_agreement": float(np.mean(exported.argmax(1) == trained.argmax(1))) if len(sequences) else 1.0}
    if check["argmax_agreement"] < 0.99:
        raise RuntimeError(f"the exported model in {model_dir} disagrees with the trained model on "
                           f"{1 - check['argmax_agreement']:.1%} of the test split: the export is broken")
    if check["max_abs_prob_diff"] > EXPORT_CHECK_TOLERANCE:
        log.warning("exported vs trained test probabilities differ by up to %.2g (mixed precision?)",
                    check["max_abs_prob_diff"])
    return check


def report_markdown(metrics: dict[str, Any]) -> str:
    """final_report.md: cv vs test, calibration before/after, threshold, calls and the open set, in a page."""
    cv, test, t = metrics["cv"]["mean"], metrics["test"], metrics["threshold"]
    lines = [f"# Final model: {metrics['model']}", "",
             f"Trained on all non-test records for {metrics['training']['epochs']} epochs (median best epoch of "
             f"the cv folds {metrics['training']['cv_best_epochs']}); the test split ({test['n']} records) was scored "
             "once.", "", "| metric | cv mean | cv sd | test (calibrated) |", "|---|---|---|---|"]
    for name, value in test["after_calibration"].items():
        if name in cv and name != "n":
            lines.append(f"| {name} | {_num(cv[name]['mean'], '.4f')} | {_num(cv[name]['sd'], '.4f')} "
                         f"| {_num(value, '.4f')} |")
    lines += ["", f"Calibration `{metrics['calibration']['method']}` fitted on {metrics['calibration']['oof']['n']} "
              "out-of-fold records (T = {}):".format(metrics["calibration"]["oof"]["temperature"]), "",
              "| data | log loss | Brier | ECE |", "|---|---|---|---|"]
    for where, rep in (("out-of-fold", metrics["calibration"]["oof"]), ("test", test["calibration"])):
        for when in ("before", "after"):
            s = rep[when]
            lines.append(f"| {where}, {when} | " + " | ".join(_num(s[k], ".4f") for k in ("log_loss", "brier", "ece"))
                         + " |")
    known = metrics["open_set"].get("known", {})
    reached = "reached" if t["reachable"] else "NOT reachable: no species calls; best precision"
    lines += ["", f"Species threshold {_num(t['threshold'])} for precision {t['target']} ({reached} on out-of-fold "
              f"data: {_num(t['achieved_precision'])}, coverage {_num(t['coverage'])}). On the test split: coverage "
              f"{_num(known.get('coverage'))}, precision of species calls {_num(known.get('accuracy_of_calls'))}; "
              f"calls by rank {_fractions(test['calls'])}."]
    unknown = metrics["open_set"].get("unknown", {})
    if unknown.get("n"):
        lines += ["", f"Open set: {unknown['n']} records of species absent from training. Over-classification "
                  f"(confident species calls) {_num(unknown['over_classification_rate'])}; calls by rank "
                  f"{_fractions(unknown['calls'])}; their genus is in the reference for "
                  f"{_num(unknown.get('genus_in_reference'))} of them."]
    return "\n".join(lines) + "\n\n![reliability](reliability.png)\n"


def _num(value: Any, spec: str = ".3f") -> str:
    """A number for the report; `n/a` for None or NaN (e.g. the precision of zero calls)."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fractions(calls: dict[str, Any]) -> str:
    parts = [f"{rank} {_num(share)} (right {_num(calls['correct_at_rank'].get(rank))})"
             if rank != UNASSIGNED else f"{rank} {_num(share)}" for rank, share in calls["assigned"].items()]
    return ", ".join(parts)


def train_final(config: Config, prepared_dir: str | Path, cv_dir: str | Path, out_dir: str | Path,
                merge: bool = False) -> Path:
    """`idengine train`: calibrate on OOF, train on all non-test data, test once, open-set check, export.

    Args:
        config: the resolved config (typically tune's best); train.epochs is replaced by the cv median best epoch.
        prepared_dir: output of `idengine prepare`.
        cv_dir: output of `idengine cv` with this config on that prepared directory (out-of-fold logits).
        out_dir: the artifact directory; replaced only once everything is written.
        merge: also export merged/ (the LoRA merged into a full model: gigabytes for the real backbone).

    Returns:
        out_dir as a Path. Raises ValueError for inconsistent inputs (no test split, OOF from other data).
    """
    if config.model.finetune == "probe" or config.model.is_baseline():
        raise ValueError(f"idengine train exports transformer models only; {config.model.backbone} / "
                         f"{config.model.finetune} is evaluated by `idengine cv` but cannot be exported yet")
    import ray

    from idengine.data.prepare import read_prepared, read_unknown
    from idengine.data.tokenize import load_tokenizer
    from idengine.export import export_artifact, replace_dir, update_artifact_files
    from idengine.predict import score_logits

    prepared_dir, cv_dir, out = Path(prepared_dir), Path(cv_dir), Path(out_dir)
    records, labels = read_prepared(prepared_dir)
    test = records[records[C.FOLD] == C.TEST_FOLD].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"{prepared_dir} has no test split: set data.test_fraction > 0 and run prepare again")
    cv_metrics = json.loads((cv_dir / "metrics.json").read_text(encoding="utf-8"))
    epochs, cv_best = final_epochs(cv_metrics)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs, patience=0))
    staging = out.with_name(f".{out.name}.final-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory(prefix="idengine-final-") as scratch:
        png = Path(scratch) / RELIABILITY_PNG
        calibrator, choice, oof_report = calibrate_on_oof(config, cv_dir, labels, set(test[C.ID]), png)
        start = time.time()
        run, model = train_on_all(config, prepared_dir, labels, f"{out.name}-final-{uuid.uuid4().hex[:6]}")
        align_to_test(run, test)
        tested = score_test(run, calibrator, labels, choice.threshold, config)
        metrics = {"model": f"{config.model.backbone} ({config.model.finetune})",
                   "cv": {"mean": cv_metrics["mean"], "monitor": cv_metrics.get("monitor"), "dir": str(cv_dir)},
                   "training": {"epochs": epochs, "cv_best_epochs": cv_best, "seconds": round(time.time() - start, 1),
                                "history": run.history},
                   "calibration": {"method": calibrator.method, "oof": oof_report},
                   "threshold": choice.to_dict()}
        tokenizer = load_tokenizer(config.model.backbone, config.model.revision, config.model.trust_remote_code)
        export_artifact(staging, model, tokenizer, labels, config, calibrator, choice.threshold, metrics,
                        merge=merge, extra_files={RELIABILITY_PNG: png})
    try:
        use_ray = ray.is_initialized()
        metrics["export_check"] = check_export(staging, run, calibrator, test[C.SEQUENCE].tolist(), config, use_ray)
        unknown = read_unknown(prepared_dir)
        unknown_probs = calibrator.apply(score_logits(staging, unknown[C.SEQUENCE].tolist(), config.predict, use_ray)
                                         if len(unknown) else np.zeros((0, labels.num_classes)))
        probs = tested.pop("probs")
        metrics["test"] = tested
        metrics["open_set"] = score_open_set(unknown, unknown_probs, labels, choice.threshold, config, probs,
                                             run.val_labels)
        update_artifact_files(staging, {"metrics.json": metrics, REPORT_MD: report_markdown(metrics)})
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("final model: test top1 %.4f, over-classification of unknown species %.3f -> %s",
             tested["after_calibration"]["top1_acc"], metrics["open_set"]["unknown"]["over_classification_rate"], out)
    return out
