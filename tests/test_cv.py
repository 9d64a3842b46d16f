"""cv: every fold of a prepared directory -> metrics.json, oof.parquet, summary; baselines and the tiny transformer."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_test_config

from idengine import layout as C
from idengine.evaluate.oof import read_oof
from idengine.recipes.cv import run_cv
from idengine.evaluate.metrics import classification_metrics, softmax

CV_FILES = {"metrics.json", "oof.parquet", "config.yaml", "summary.md", "folds", "engine"}


def _check_cv_dir(out, prepared, n_epochs_max):
    records = pd.read_parquet(prepared / C.RECORDS_FILE)
    assert {p.name for p in out.iterdir()} == CV_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    ids, folds, labels, logits = read_oof(out)
    non_test = records[records[C.FOLD] != C.TEST_FOLD]
    # Every non-test record is scored exactly once, in its own fold; no test record leaks in.
    assert sorted(ids) == sorted(non_test[C.ID])
    assert dict(zip(ids, folds)) == dict(zip(non_test[C.ID], non_test[C.FOLD]))
    assert dict(zip(ids, labels)) == dict(zip(non_test[C.ID], non_test[C.LABEL]))
    assert logits.shape == (len(ids), metrics["num_classes"])
    # The saved logits are the ones the fold's metrics were computed on.
    for fold in metrics["folds"]:
        rows = folds == fold["fold"]
        again = classification_metrics(labels[rows], softmax(logits[rows]), top_k=5)
        assert again["pr_auc_macro"] == pytest.approx(fold["val"]["pr_auc_macro"], abs=1e-5)
        assert again["top1_acc"] == pytest.approx(fold["val"]["top1_acc"], abs=1e-6)
        assert 1 <= fold["best_epoch"] <= fold["epochs_run"] <= n_epochs_max
        assert fold["gap"] == pytest.approx(fold["train"]["pr_auc_macro"] - fold["val"]["pr_auc_macro"])
    per_fold = [f["val"]["pr_auc_macro"] for f in metrics["folds"]]
    assert metrics["mean"]["pr_auc_macro"]["mean"] == pytest.approx(np.mean(per_fold))
    assert metrics["mean"]["pr_auc_macro"]["sd"] == pytest.approx(np.std(per_fold, ddof=1))
    assert set(metrics["mean"]) >= {"top1_acc", "top5_acc", "f1_macro", "f1_weighted", "log_loss", "brier",
                                    "pr_auc_macro", "pr_auc_weighted", "ece"}
    return metrics


@pytest.mark.parametrize("kind", ["kmer-nb", "kmer-linear"])
def test_kmer_cv_on_the_bundled_example(prepared_example, tmp_path, kind):
    config = tiny_test_config(tmp_path, f"model.kind={kind}")
    out = run_cv(config, prepared_example, tmp_path / "cv")
    metrics = _check_cv_dir(out, prepared_example, 1)
    # 8-mer models separate these 32 species well: far above chance (1/32).
    assert metrics["mean"]["top1_acc"]["mean"] > 0.6


@pytest.mark.integration
def test_transformer_cv_local_mode(ray_session, prepared_example, tmp_path):
    from idengine.recipes.cv import iter_folds, running_summary

    config = tiny_test_config(tmp_path, "train.epochs=2")
    out = run_cv(config, prepared_example, tmp_path / "cv")
    metrics = _check_cv_dir(out, prepared_example, 2)
    # The folds run under deterministic names: iterating again (as a restarted Tune trial does) trains nothing new
    # and gives the same folds back.
    again = list(iter_folds(config, prepared_example, tmp_path / "cv"))
    assert [r.fold for r in again] == ["0", "1", "2", "3", "4"]
    assert running_summary(again)["pr_auc_macro"]["mean"] == pytest.approx(metrics["mean"]["pr_auc_macro"]["mean"])
    history = json.loads((out / "folds" / "0.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert not list(tmp_path.glob(".cv.*"))  # nothing half-written left behind


@pytest.mark.integration
def test_probe_cv_through_run_cv(ray_session, prepared_example, tmp_path):
    config = tiny_test_config(tmp_path, "model.kind=probe")
    out = run_cv(config, prepared_example, tmp_path / "cv")
    metrics = _check_cv_dir(out, prepared_example, 1)
    assert metrics["kind"] == "probe" and metrics["model"].startswith("probe tiny")
    assert metrics["mean"]["top1_acc"]["mean"] > 3 / 32  # the frozen random backbone's embeddings still carry signal
