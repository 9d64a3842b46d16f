"""Recipe `idengine train`: the final classifier and engine, tested once, exported, for every model kind.

1. The classifier's calibration and species threshold are fitted on the cv run's out-of-fold logits.
2. The final classifier trains on every non-test record (a transformer for the median of the folds' best epochs, no
   early stopping; a k-mer model or a probe in one pass).
3. The final decision model is fitted on ALL the cv run's out-of-fold evidence (`recipes/engine.py`); its temperature
   and each rank's threshold come from the out-of-fold outputs of the per-fold decision models.
4. The test split is scored once: the classifier (before/after calibration) and the engine, against a reference of
   every non-test record (the test records are not in it, as a user's new sample is not).
5. The artifact's engine searches EVERY record of the reference (test and rare species included). The open-set
   numbers reported are the cv run's nested ones: no species scored there was used to fit what scored it.
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
from idengine.config import KMER_KINDS, Config
from idengine.data.labels import LabelSpace
from idengine.data.prepared import read_prepared, read_unknown
from idengine.data.tokenize import load_tokenizer
from idengine.deploy.artifact import load_artifact
from idengine.deploy.classifiers import KmerClassifier, ProbeClassifier, TransformerClassifier
from idengine.deploy.export import update_artifact_files, write_artifact
from idengine.evaluate.calibrate import Calibrator, ThresholdChoice, calibration_report, choose_threshold, \
    fit_calibrator
from idengine.evaluate.calls import calls_for, calls_summary, open_set_report
from idengine.evaluate.metrics import classification_metrics, expected_calibration_error, reliability_bins, \
    score_logits, softmax
from idengine.evaluate.oof import read_oof
from idengine.features.embeddings import record_embeddings
from idengine.features.tokens import tokenized_table
from idengine.models.kmer import fit_kmer_model
from idengine.models.probe import fit_probe
from idengine.models.transformer import build_model, load_backbone, load_trainable_state
from idengine.recipes.cv import run_key
from idengine.recipes.engine import ENGINE_DIR, fold_probabilities, neighbours_of, read_engine, \
    reference_table
from idengine.reference import assess
from idengine.reference.decision import fit_decision
from idengine.reference.engine import Engine, reference_index
from idengine.reference.neighbours import load_neighbours
from idengine.reference.scenarios import judged
from idengine.reference.space import OptionSpace, engine_calls, rank_thresholds
from idengine.report.markdown import final_markdown
from idengine.report.plots import reliability_comparison_figure, save_png
from idengine.storage import building, read_json
from idengine.train.checkpoint import read_best_weights
from idengine.train.ray_train import fit_final

log = logging.getLogger(__name__)

EXPORT_CHECK_RECORDS = 64  # test records the exported classifier re-scores in this process
EXPORT_CHECK_TOLERANCE = 1e-3  # exported vs trained test probabilities; mixed precision may exceed it (a warning)


def final_epochs(cv_metrics: dict[str, Any]) -> tuple[int, list[int]]:
    """The epochs of the final run: the median of the folds' best epochs, rounded half up (at least 1)."""
    best = [int(f["best_epoch"]) for f in cv_metrics["folds"] if int(f.get("best_epoch", -1)) >= 1]
    if not best:
        raise ValueError("the cv metrics.json has no fold with a best_epoch; run `idengine cv` to the end")
    return max(1, math.floor(float(np.median(best)) + 0.5)), best


def calibrate_on_oof(config: Config, cv_dir: Path, labels: LabelSpace, test_ids: set[str],
                     png: Path) -> tuple[Calibrator, ThresholdChoice, dict[str, Any]]:
    """Fit the classifier's calibrator and threshold on out-of-fold logits; draw the reliability diagram.

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


def _transformer(config: Config, prepared_dir: Path, labels: LabelSpace, test: pd.DataFrame, run_name: str):
    """fit_final on every non-test record, rebuilt in this process; its test logits in the test split's order."""
    id2label = dict(enumerate(labels.species))
    score = functools.partial(score_logits, top_k=config.train.top_k)
    run = fit_final(config, tokenized_table(prepared_dir, config), id2label, score, run_name)
    model = build_model(config.model, config.lora, labels.num_classes, id2label, seed=config.train.seed)
    load_trainable_state(model, read_best_weights(run.checkpoint_path))
    order = pd.Series(np.arange(len(run.eval_ids)), index=np.asarray(run.eval_ids).astype(str))
    if sorted(order.index) != sorted(test[C.ID]):
        raise RuntimeError(f"the final run scored {len(order)} records, the test split has {len(test)}")
    tokenizer = load_tokenizer(config.model.backbone, config.model.revision, config.model.trust_remote_code)
    classifier = TransformerClassifier(model.eval(), tokenizer, config.model.max_tokens)
    return classifier, run.eval_logits[order.loc[test[C.ID]].to_numpy()], run.history


def train_classifier(config: Config, prepared_dir: Path, records: pd.DataFrame, labels: LabelSpace,
                     test: pd.DataFrame, run_name: str):
    """The final classifier of `model.kind` on every non-test record: (classifier, test logits, history)."""
    train = records[records[C.FOLD] != C.TEST_FOLD]
    kind = config.model.kind
    if kind == "transformer":
        return _transformer(config, prepared_dir, labels, test, run_name)
    if kind in KMER_KINDS:
        model = fit_kmer_model(kind, train[C.SEQUENCE].to_numpy(), train[C.LABEL].to_numpy(), labels.num_classes,
                               k=config.model.kmer, seed=config.train.seed)
        return KmerClassifier(model), model.logits(test[C.SEQUENCE].to_numpy()), []
    x = record_embeddings(prepared_dir, config, records)
    is_train = (records[C.FOLD] != C.TEST_FOLD).to_numpy()
    probe = fit_probe(config.model.probe_head, x[is_train], train[C.LABEL].to_numpy(), labels.num_classes,
                      seed=config.train.seed, groups=train[C.GROUP].to_numpy())
    tokenizer = load_tokenizer(config.model.backbone, config.model.revision, config.model.trust_remote_code)
    classifier = ProbeClassifier(probe, load_backbone(config.model), tokenizer, config.model.max_tokens,
                                 config.model.pooling)
    test_rows = pd.Index(records[C.ID]).get_indexer(test[C.ID])
    return classifier, probe.logits(x[test_rows]), []


def final_decision(config: Config, cv_dir: Path, space: OptionSpace, reference: pd.DataFrame):
    """The decision model fitted on every out-of-fold query, its temperature and each rank's threshold."""
    if not (Path(cv_dir) / "engine").is_dir():
        raise ValueError(f"{cv_dir} has no engine/ outputs (engine.enabled was off, or it is a tune trial's cv): "
                         "run `idengine cv` with this config first, or set engine.enabled=false")
    scenarios, options, oof_scores = read_engine(Path(cv_dir))
    targets = assess.target_slots(options, scenarios["answer_kind"].to_numpy(), scenarios["answer"].to_numpy())
    decision = fit_decision(options, targets, scenarios["truth_species"].to_numpy(), config.engine.hidden,
                            config.engine.seed)
    scored = judged(scenarios)  # `thinned` queries fit the scorer only, never the temperature or the thresholds
    p, temperature = fold_probabilities(space, options, oof_scores, targets, scored)  # as cv judges each fold
    truth = assess.truth_table(scenarios, reference)[scored].reset_index(drop=True)
    choices = rank_thresholds(space, p[np.flatnonzero(scored)], truth, config.calibrate.target_precision)
    decision.temperature = temperature
    return decision, {rank: c.threshold for rank, c in choices.items()}, {r: c.to_dict() for r, c in choices.items()}


def engine_test(engine: Engine, test: pd.DataFrame, probs: np.ndarray, labels: LabelSpace, config: Config
                ) -> dict[str, Any]:
    """The engine on the held-out test split (its reference holds no test record): closed-set metrics over the
    label space, the share called at species level and the precision of those calls, calls by rank."""
    p, hits = engine.answer(test[C.SEQUENCE].tolist(), probs, np.asarray(labels.species, dtype=object))
    calls = engine_calls(engine.space, p, engine.thresholds, no_hit=hits.ref[:, 0] < 0)
    y = test[C.LABEL].to_numpy()
    closed = classification_metrics(y, assess.closed_set_probs(engine.space, p, np.asarray(labels.species)),
                                    config.train.top_k)
    species_call = calls["call_rank"].to_numpy() == "species"
    right = calls["call"].to_numpy() == test[C.SPECIES].to_numpy()
    truth = test.reindex(columns=[C.SPECIES, *labels.ranks]).reset_index(drop=True)
    return {**closed, "called_species": float(species_call.mean()),
            "species_call_precision": float(right[species_call].mean()) if species_call.any() else None,
            "calls": calls_summary(calls, truth)}


def build_engines(config: Config, cv_dir: Path, records: pd.DataFrame, unknown: pd.DataFrame, labels: LabelSpace):
    """The engine for the test split (reference: every non-test record) and the one exported (every record)."""
    cv_reference = reference_table(records, unknown)
    space = OptionSpace.from_taxonomy(cv_reference)
    decision, thresholds, choices = final_decision(config, cv_dir, space, cv_reference)
    kmer = None
    if config.model.kind != config.engine.kmer_model:
        train = records[records[C.FOLD] != C.TEST_FOLD]
        kmer = fit_kmer_model(config.engine.kmer_model, train[C.SEQUENCE].to_numpy(), train[C.LABEL].to_numpy(),
                              labels.num_classes, k=config.model.kmer, seed=config.train.seed)
    everything = pd.concat([records.drop(columns=[C.LABEL, C.FOLD]), unknown], ignore_index=True)
    # The test engine's reference is the cv's, whose neighbours cv already found; the exported one adds the test split.
    test_engine = Engine(reference_index(cv_reference, config.engine), decision, thresholds, config.engine,
                         load_neighbours(Path(cv_dir) / ENGINE_DIR), kmer)
    index = reference_index(everything, config.engine)
    export_engine = Engine(index, decision, thresholds, config.engine, neighbours_of(index, config), kmer)
    return test_engine, export_engine, choices


def classifier_test(logits: np.ndarray, test: pd.DataFrame, calibrator: Calibrator, labels: LabelSpace,
                    threshold: float, config: Config) -> dict[str, Any]:
    """The classifier on the test split: metrics before/after calibration, calibration report, its own calls."""
    y, z = test[C.LABEL].to_numpy(), np.asarray(logits, dtype=np.float64)
    probs = calibrator.apply(z)
    truth = labels.taxonomy_table().loc[y].reset_index(drop=True)
    calls = calls_for(probs, labels, threshold, config.calibrate.rank_fallback)
    k = config.train.top_k
    return {"n": int(y.size), "before_calibration": classification_metrics(y, softmax(z), k),
            "after_calibration": classification_metrics(y, probs, k),
            "calibration": calibration_report(z, y, calibrator), "calls": calls_summary(calls, truth)}


def classifier_open_set(classifier, calibrator: Calibrator, test_logits: np.ndarray, test: pd.DataFrame,
                        unknown: pd.DataFrame, labels: LabelSpace, threshold: float, config: Config) -> dict[str, Any]:
    """The classifier's own calls on the set-aside rare species (never its classes, so novel to it) beside the test
    split: its over-classification at the threshold chosen on OOF. The engine's open set is cv's (engine/)."""
    unknown_logits = classifier.logits(unknown[C.SEQUENCE].tolist()) if len(unknown) else \
        np.zeros((0, labels.num_classes))
    fallback = config.calibrate.rank_fallback
    unknown_calls = calls_for(calibrator.apply(unknown_logits), labels, threshold, fallback)
    test_calls = calls_for(calibrator.apply(test_logits), labels, threshold, fallback)
    genera = {g for g in labels.taxonomy.get("genus", ()) if g}
    return open_set_report(unknown_calls, unknown.reindex(columns=[C.SPECIES, *labels.ranks]).reset_index(drop=True),
                           test_calls, test.reindex(columns=[C.SPECIES, *labels.ranks]).reset_index(drop=True),
                           genera or None)


def check_export(directory: Path, test: pd.DataFrame, trained_probs: np.ndarray) -> dict[str, float]:
    """Reload the EXPORTED artifact and compare its classifier's test probabilities with the trained model's."""
    rows = np.arange(min(EXPORT_CHECK_RECORDS, len(test)))
    if not len(rows):
        return {"records": 0, "max_abs_prob_diff": 0.0, "argmax_agreement": 1.0}
    exported = load_artifact(directory, verify=True).probabilities(test[C.SEQUENCE].iloc[rows].tolist())
    trained = trained_probs[rows]
    check = {"records": int(len(rows)), "max_abs_prob_diff": float(np.abs(exported - trained).max()),
             "argmax_agreement": float(np.mean(exported.argmax(1) == trained.argmax(1)))}
    if check["argmax_agreement"] < 0.99:
        raise RuntimeError(f"the exported model disagrees with the trained model on "
                           f"{1 - check['argmax_agreement']:.1%} of the test records checked: the export is broken")
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


def train_final(config: Config, prepared_dir: str | Path, cv_dir: str | Path, out_dir: str | Path,
                merge: bool = False) -> Path:
    """`idengine train`: calibrate on OOF, train on all non-test data, the final engine, test once, export, check.

    Args:
        config: the resolved config (typically tune's best); train.epochs is replaced by the cv median best epoch.
        prepared_dir: output of `idengine prepare`.
        cv_dir: output of `idengine cv` with this config on that prepared directory (out-of-fold logits, engine/).
        out_dir: the artifact directory; replaced only once everything is written.
        merge: also export merged/ (a LoRA transformer merged into a full model: gigabytes for the real backbone).

    Returns:
        out_dir as a Path. Raises ValueError for inconsistent inputs (no test split, OOF from other data).
    """
    prepared_dir, cv_dir, out = Path(prepared_dir), Path(cv_dir), Path(out_dir)
    records, labels, test, cv_metrics, (epochs, cv_best), config = _inputs(config, prepared_dir, cv_dir)
    unknown = read_unknown(prepared_dir)
    with building(out) as tmp:
        calibrator, choice, oof_report = calibrate_on_oof(config, cv_dir, labels, set(test[C.ID]),
                                                          tmp / C.RELIABILITY_PNG)
        start = time.time()
        classifier, test_logits, history = train_classifier(config, prepared_dir, records, labels, test,
                                                            f"{out.name}-{run_key(config, prepared_dir)}-final")
        tested = classifier_test(test_logits, test, calibrator, labels, choice.threshold, config)
        open_set = classifier_open_set(classifier, calibrator, test_logits, test, unknown, labels, choice.threshold,
                                       config)
        metrics = {"model": config.model.describe(),
                   "cv": {"mean": cv_metrics["mean"], "monitor": cv_metrics.get("monitor"), "dir": str(cv_dir)},
                   "training": {"epochs": epochs, "cv_best_epochs": cv_best, "seconds": round(time.time() - start, 1),
                                "history": history},
                   "calibration": {"method": calibrator.method, "oof": oof_report}, "threshold": choice.to_dict(),
                   "test": tested, "open_set": open_set}
        engine = None
        if config.engine.enabled:
            test_engine, engine, choices = build_engines(config, cv_dir, records, unknown, labels)
            metrics["engine"] = {"test": engine_test(test_engine, test, calibrator.apply(test_logits), labels,
                                                     config),
                                 "thresholds": choices, "temperature": engine.decision.temperature,
                                 "cv": cv_metrics.get("engine", {})}
        # reliability.png is already in tmp, so the manifest lists it with the artifact's own files
        write_artifact(tmp, classifier, labels, config, calibrator, choice.threshold, metrics, engine, merge=merge)
        metrics["export_check"] = check_export(tmp, test, calibrator.apply(test_logits))
        update_artifact_files(tmp, {C.METRICS_FILE: metrics, C.FINAL_REPORT_MD: final_markdown(metrics)})
    log.info("final model: test top1 %.4f (classifier) -> %s", tested["after_calibration"]["top1_acc"], out)
    return out
