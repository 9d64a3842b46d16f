"""Final model: epochs from cv, calibration only on out-of-fold data, calls summaries, and `idengine train` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idengine import layout as C
from idengine.evaluate.calls import assign_calls
from idengine.config_io import load_config
from idengine.data.labels import LabelSpace
from idengine.evaluate.calls import calls_summary
from idengine.recipes.train import final_epochs

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "12s-fish-mini"


def test_final_epochs_is_the_median_best_epoch_rounded_half_up():
    assert final_epochs({"folds": [{"best_epoch": 3}, {"best_epoch": 6}, {"best_epoch": 4}]}) == (4, [3, 6, 4])
    assert final_epochs({"folds": [{"best_epoch": 3}, {"best_epoch": 4}]})[0] == 4
    assert final_epochs({"folds": [{"best_epoch": 1}, {"best_epoch": -1}]})[0] == 1  # a fold with none is ignored
    with pytest.raises(ValueError, match="best_epoch"):
        final_epochs({"folds": [{"best_epoch": -1}]})


def real_labels() -> LabelSpace:
    labels = pd.read_csv(EXAMPLE / "labels.csv")
    return LabelSpace.from_records(labels, ("family", "genus"))


def test_calls_summary_scores_each_call_at_its_own_rank():
    labels = real_labels()
    table = labels.taxonomy_table()
    genus = table["genus"].to_numpy()
    shared = pd.Series(genus).value_counts().index[0]  # a genus with several species in the reference
    members = np.flatnonzero(genus == shared)
    probs = np.full((4, labels.num_classes), 1e-6)
    probs[0, members[0]] = 1.0                      # confident species call, right
    probs[1, members] = 1.0 / len(members)          # split inside the genus: genus call, right
    probs[2, :] = 1.0                               # flat: unassigned
    probs[3, members[1]] = 1.0                      # confident species call, wrong (truth is members[0])
    probs /= probs.sum(axis=1, keepdims=True)
    calls = assign_calls(probs, labels.species, table[["family", "genus"]], 0.9, ranks=["genus", "family"])
    truth = table.loc[[members[0], members[0], members[0], members[0]]].reset_index(drop=True)
    summary = calls_summary(calls, truth)
    assert summary["assigned"] == {"species": 0.5, "genus": 0.25, "unassigned": 0.25}
    assert summary["correct_at_rank"] == {"species": 0.5, "genus": 1.0}
    assert summary["correct_call_rate"] == 0.5 and summary["wrong_call_rate"] == 0.25


@pytest.fixture(scope="module")
def final_run(ray_session, tmp_path_factory):
    """prepare -> cv -> train on the bundled real example with the tiny model (2 folds, 2 epochs)."""
    from idengine.recipes.cv import run_cv
    from idengine.recipes.prepare import prepare_dataset
    from idengine.recipes.train import train_final

    work = tmp_path_factory.mktemp("final")
    config = load_config(None, [
        f"data.sequences={EXAMPLE / 'sequences.fasta.gz'}", f"data.labels={EXAMPLE / 'labels.csv'}",
        "data.n_folds=2", "model.backbone=tiny", "model.max_tokens=160", "train.epochs=2", "train.lr=1e-3",
        "train.num_workers=1", "train.cpus_per_worker=0.5", "train.patience=1", f"train.storage_path={work / 'ray'}",
        "predict.num_actors=1", "calibrate.target_precision=0.6"])
    prepared = prepare_dataset(config, work / "prepared")
    cv_dir = run_cv(config, prepared, work / "cv")
    out = train_final(config, prepared, cv_dir, work / "model")
    return config, prepared, cv_dir, out


@pytest.mark.integration
def test_train_final_exports_a_verified_artifact_with_test_and_open_set_metrics(final_run):
    from idengine.evaluate.oof import read_oof
    from idengine.data.prepared import read_prepared, read_unknown
    from idengine.deploy.artifact import load_artifact, verify_artifact

    config, prepared, cv_dir, out = final_run
    manifest = verify_artifact(out)
    assert {"adapter_model.safetensors", "reliability.png", "final_report.md", "metrics.json"} <= set(manifest["files"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging dir left
    metrics = json.loads((out / "metrics.json").read_text())
    records, labels = read_prepared(prepared)
    test = records[records[C.FOLD] == C.TEST_FOLD]
    cv = json.loads((cv_dir / "metrics.json").read_text())
    assert metrics["training"]["epochs"] == final_epochs(cv)[0]
    assert metrics["cv"]["mean"] == cv["mean"]  # the test metrics sit beside the cross-validated ones
    assert metrics["test"]["n"] == len(test) and metrics["test"]["after_calibration"]["n"] == len(test)
    assert metrics["test"]["before_calibration"]["top1_acc"] == metrics["test"]["after_calibration"]["top1_acc"]
    assert metrics["export_check"]["argmax_agreement"] == 1.0
    oof_ids = set(read_oof(cv_dir)[0])
    assert metrics["calibration"]["oof"]["n"] == len(oof_ids) and not oof_ids & set(test[C.ID])
    unknown = read_unknown(prepared)
    open_set = metrics["open_set"]
    assert open_set["unknown"]["n"] == len(unknown) > 0
    assert sum(open_set["unknown"]["calls"]["assigned"].values()) == pytest.approx(1.0)
    assert 0.0 <= open_set["unknown"]["over_classification_rate"] <= 1.0
    assert open_set["known"]["n"] == len(test)
    artifact = load_artifact(out)
    assert artifact.threshold == metrics["threshold"]["threshold"]
    assert artifact.config.train.epochs == metrics["training"]["epochs"] and artifact.config.train.patience == 0
    probs = artifact.probabilities(test[C.SEQUENCE].tolist())
    top1 = float(np.mean(probs.argmax(axis=1) == test[C.LABEL].to_numpy()))
    assert top1 == pytest.approx(metrics["test"]["after_calibration"]["top1_acc"])
    report = (out / "final_report.md").read_text()
    assert "Over-classification" in report and "| top1_acc |" in report
