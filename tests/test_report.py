"""Report: real-format run directories (written by the real prepare / cv / calibrate writers) -> HTML whose tables
hold exactly the run's numbers, whose images are embedded, and which headless Chromium renders."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idengine.data.splits import cv_folds
from idengine.evaluate import calibrate, calls
from idengine.evaluate.oof import fold_result, read_oof
from idengine.recipes.cv import write_cv
from idengine.report.markdown import final_markdown
from idengine import layout as C
from idengine.config import Config, DataConfig, ModelConfig, TrainConfig
from idengine.config_io import save_config
from idengine.data.prepared import read_prepared, read_unknown
from idengine.recipes.prepare import prepare_dataset
from idengine.evaluate.metrics import classification_metrics, softmax
from idengine.report.run import detect_run_kinds, write_report
from idengine.report.plots import micro_pr_curve

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "12s-fish-mini"
PREPARE_IDS = ["overview", "prepare-counts", "class-balance", "length-distribution", "fold-sizes"]
CV_IDS = ["overview", "fold-metrics", "learning-curves", "train-val-gap", "pr-curves", "reliability",
          "confused-pairs"]
TUNE_IDS = ["overview", "trials", "trial-parameters", "trial-folds"]
TRAIN_IDS = ["overview", "test-metrics", "calibration", "threshold-open-set", "train-files"]


class _Dom(HTMLParser):
    """Section ids, <img> sources and every table (by id) as rows of (text, attributes) cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections, self.images, self.tables = [], [], {}
        self._table, self._cell = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"anon{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ["", attrs]
            self._table[-1].append(self._cell)
        elif tag == "span" and self._cell is not None:
            self._cell[1].update(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def _fold_logits(rng, y: np.ndarray, num_classes: int, signal: float) -> np.ndarray:
    """Logits with a true-class boost and a systematic confusion of every label 1 with label 0."""
    logits = rng.normal(size=(y.size, num_classes))
    logits[np.arange(y.size), y] += signal
    logits[y == 1, 0] += signal + 1.0
    return logits


def _write_cv_dir(prepared: Path, out: Path, signals=(0.5, 2.0, 1.5), with_train: bool = True) -> Path:
    """Run cv's own writer on per-fold results (one epoch per signal strength), scored by the real metrics."""
    records, labels = read_prepared(prepared)
    config = Config(model=ModelConfig(backbone="tiny", finetune="full"), train=TrainConfig(top_k=3))
    rng = np.random.default_rng(1)
    results = []
    for fold in cv_folds(records[C.FOLD]):
        val = records[records[C.FOLD] == fold]
        y = val[C.LABEL].to_numpy()
        history, kept = [], []
        for epoch, signal in enumerate(signals, start=1):
            logits = _fold_logits(rng, y, labels.num_classes, signal)
            epoch_metrics = {**classification_metrics(y, softmax(logits), top_k=3), "epoch": epoch,
                             "loss": 2.0 / epoch}
            if with_train:
                train_y = rng.integers(0, labels.num_classes, 64)
                train_m = classification_metrics(
                    train_y, softmax(_fold_logits(rng, train_y, labels.num_classes, 4.0)), top_k=3)
                epoch_metrics.update({f"train_{k}": v for k, v in train_m.items()})
                epoch_metrics["gap_pr_auc_macro"] = train_m["pr_auc_macro"] - epoch_metrics["pr_auc_macro"]
            history.append(epoch_metrics)
            kept.append(logits)
        best = int(np.argmax([h["pr_auc_macro"] for h in history]))
        result = fold_result(fold, val[C.ID].to_numpy(), y, kept[best], history[best], history, "pr_auc_macro")
        result.seconds = 1.5 + int(fold)
        results.append(result)
    return write_cv(out, config, results, labels.num_classes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The bundled example prepared with the default config, and a cv run on its folds (siblings, as in runs/)."""
    if not (EXAMPLE / "labels.csv").exists():
        pytest.skip(f"{EXAMPLE} not found")
    root = tmp_path_factory.mktemp("runs")
    data = DataConfig(sequences=str(EXAMPLE / "sequences.fasta.gz"), labels=str(EXAMPLE / "labels.csv"))
    prepared = prepare_dataset(Config(data=data), root / "prepared")
    return {"prepared": prepared, "cv": _write_cv_dir(prepared, root / "cv"), "root": root}


@pytest.fixture(scope="module")
def cv_page(runs) -> tuple[Path, str, _Dom]:
    """The cv run's report, rendered once for the tests that read it."""
    page = write_report(runs["cv"])
    text = page.read_text(encoding="utf-8")
    return page, text, _Dom(text)


def _report(run_dir: Path, **kwargs) -> tuple[str, _Dom]:
    text = write_report(run_dir, **kwargs).read_text(encoding="utf-8")
    return text, _Dom(text)


def _value(cell) -> float:
    return float(cell[1]["data-value"])


def test_prepare_report_accounts_for_every_record(runs, caplog):
    report = json.loads((runs["prepared"] / C.REPORT_JSON).read_text())
    assert detect_run_kinds(runs["prepared"]) == ["prepare"]
    with caplog.at_level("INFO", logger="idengine.report"):
        _, dom = _report(runs["prepared"])
    assert any("prepare sections done in" in m for m in caplog.messages)  # progress, section by section
    assert dom.sections == PREPARE_IDS
    counts = {row[0][0]: _value(row[1]) for row in dom.tables["counts-table"][1:]}
    assert counts["records read"] == report["records_read"]
    assert counts["kept"] == report["kept"]
    assert counts["kept + set aside + dropped"] == report["records_read"]
    fold_rows = {row[0][0]: _value(row[1]) for row in dom.tables["folds-table"][1:]}
    assert fold_rows == {k: float(v) for k, v in report["folds"].items()}


def test_cv_fold_table_equals_metrics_json(runs, cv_page):
    metrics = json.loads((runs["cv"] / C.METRICS_FILE).read_text())
    assert detect_run_kinds(runs["cv"]) == ["cv"]
    _, _, dom = cv_page
    assert dom.sections == CV_IDS
    header, *rows = dom.tables["fold-table"]
    names = [c[0] for c in header]
    assert len(rows) == len(metrics["folds"]) + 1
    for row, fold in zip(rows, metrics["folds"]):
        assert row[0][0] == fold["fold"] and _value(row[1]) == fold["best_epoch"]
        for name, value in fold["val"].items():
            assert _value(row[names.index(name)]) == value
    for name, stats in metrics["mean"].items():
        cell = rows[-1][names.index(name)][1]
        assert (float(cell["data-mean"]), float(cell["data-sd"])) == (stats["mean"], stats["sd"])
    gap = {row[0][0]: _value(row[3]) for row in dom.tables["gap-table"][1:-1]}
    assert gap == {f["fold"]: pytest.approx(f["gap"]) for f in metrics["folds"]}  # monitor is PR-AUC here


def test_cv_confused_pairs_name_species_from_the_sibling_label_map(runs, cv_page):
    _, _, y, logits = read_oof(runs["cv"])
    pred = logits.argmax(axis=1)
    pairs = pd.Series(list(zip(y[y != pred], pred[y != pred]))).value_counts()
    labels = json.loads((runs["prepared"] / C.LABEL_MAP_FILE).read_text())["labels"]
    _, text, dom = cv_page
    first = dom.tables["confused-table"][1]
    true, predicted = pairs.index[0]
    assert (first[0][0], first[1][0], _value(first[2])) == (labels[true]["species"], labels[predicted]["species"],
                                                           pairs.iloc[0])
    assert (true, predicted) == (1, 0)  # the confusion built into the logits comes first
    assert first[5][0] == ("yes" if labels[1]["genus"] == labels[0]["genus"] else "no")
    assert len(dom.tables["confused-table"]) - 1 == min(15, len(pairs))
    assert f"Species names from {runs['prepared'] / C.LABEL_MAP_FILE}" in text
    assert "stay within the true genus" in text


def test_label_map_of_another_prepared_set_is_refused(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["prepared"], other)
    records = pd.read_parquet(other / C.RECORDS_FILE)
    records[C.LABEL] = (records[C.LABEL] + 1) % records[C.LABEL].nunique()  # same species count, other labels
    records.to_parquet(other / C.RECORDS_FILE)
    with pytest.raises(ValueError, match="not the prepared set this run used"):
        write_report(runs["cv"], out=tmp_path / "r.html", label_map=other)


def test_text_is_escaped_and_label_map_argument_is_used(runs, tmp_path):
    labels = json.loads((runs["prepared"] / C.LABEL_MAP_FILE).read_text())
    labels["labels"][0]["species"] = "<script>alert(1)</script> & co"
    (tmp_path / C.LABEL_MAP_FILE).write_text(json.dumps(labels))
    text, _ = _report(runs["cv"], out=tmp_path / "r.html", label_map=tmp_path)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text
    assert (tmp_path / "r_files" / "pr_curves.png").exists()  # named after the page: two pages keep their own


def test_images_are_embedded_and_written_beside_the_page(cv_page):
    page, _, dom = cv_page
    assert len(dom.images) == 4
    written = {p.read_bytes() for p in (page.parent / "report_files").glob("*.png")}
    for src in dom.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data in written


def test_micro_pr_matches_sklearn_and_truncation_stays_close():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 40, 500)
    probs = softmax(_fold_logits(rng, y, 40, 2.0))
    exact = average_precision_score((y[:, None] == np.arange(40)).ravel(), probs.ravel())
    _, recall, ap, cut = micro_pr_curve(y, probs)
    assert not cut and ap == pytest.approx(exact) and recall.max() == pytest.approx(1.0)
    _, recall, ap_cut, cut = micro_pr_curve(y, probs, max_pairs=500 * 10)  # each record keeps its top 10 of 40
    assert cut and recall.max() <= 1.0 and ap_cut <= ap + 1e-12 and ap_cut == pytest.approx(exact, abs=0.01)


def test_tune_trials_ranked_with_stopped_trials_last(tmp_path):
    rows = []
    for i, (lr, r, folds) in enumerate([(1e-4, 8, 3), (1e-3, 4, 3), (3e-5, 16, 2), (5e-4, 8, 3)]):
        scores = {f"pr_auc_macro_fold{k}": 0.5 + 0.1 * i - 0.02 * k for k in range(folds)}
        rows.append({"trial_id": f"t{i}", "status": "COMPLETE" if folds == 3 else "STOPPED_EARLY",
                     "mean_pr_auc_macro": float(np.mean(list(scores.values()))), "folds_done": folds,
                     "seconds": 10.0 * i, "config/train.lr": lr, "config/lora.r": r, **scores})
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    (tmp_path / "best.json").write_text(json.dumps({"config": {"train.lr": 5e-4, "lora.r": 8},
                                                    "mean_pr_auc_macro": rows[3]["mean_pr_auc_macro"]}))
    save_config(Config(), tmp_path / C.CONFIG_FILE)
    assert detect_run_kinds(tmp_path) == ["tune"]
    _, dom = _report(tmp_path)
    assert dom.sections == TUNE_IDS
    header, *table_rows = dom.tables["trials-table"]
    assert [row[1][0] for row in table_rows] == ["t3", "t1", "t0", "t2"]
    best = table_rows[0]
    assert _value(best[3]) == rows[3]["mean_pr_auc_macro"]
    assert _value(best[4]) == pytest.approx(np.std([0.8, 0.78, 0.76], ddof=1))
    assert [c[0] for c in header][3:5] == ["mean_pr_auc_macro", "sd over folds"]


def _write_train_dir(runs, out: Path) -> dict:
    """A train directory in final.py's / export.py's formats, filled by the real calibrate and final functions."""
    records, labels = read_prepared(runs["prepared"])
    _, _, y, logits = read_oof(runs["cv"])
    calibrator = calibrate.fit_calibrator(logits, y)
    choice = calibrate.choose_threshold(calibrator.apply(logits), y, 0.9)
    from idengine.report.plots import reliability_comparison_figure, save_png
    from idengine.evaluate.metrics import expected_calibration_error, reliability_bins

    before, after = softmax(logits), calibrator.apply(logits)
    save_png(reliability_comparison_figure(reliability_bins(y, before), reliability_bins(y, after),
                                           expected_calibration_error(y, before), expected_calibration_error(y, after),
                                           y.size), out / C.RELIABILITY_PNG)
    rng = np.random.default_rng(2)
    test_y = records.loc[records[C.FOLD] == C.TEST_FOLD, C.LABEL].to_numpy()
    test_logits = _fold_logits(rng, test_y, labels.num_classes, 2.0)
    probs = calibrator.apply(test_logits)
    truth = labels.taxonomy_table().loc[test_y].reset_index(drop=True)
    test_calls = calls.calls_for(probs, labels, choice.threshold, True)
    unknown = read_unknown(runs["prepared"])
    unknown_probs = calibrator.apply(rng.normal(size=(len(unknown), labels.num_classes)))
    cv_metrics = json.loads((runs["cv"] / C.METRICS_FILE).read_text())
    metrics = {
        "model": "tiny (full)", "cv": {"mean": cv_metrics["mean"], "monitor": "pr_auc_macro", "dir": str(runs["cv"])},
        "training": {"epochs": 2, "cv_best_epochs": [2, 2, 2], "seconds": 1.0, "history": []},
        "calibration": {"method": calibrator.method, "oof": calibrate.calibration_report(logits, y, calibrator)},
        "threshold": choice.to_dict(),
        "test": {"n": int(test_y.size), "before_calibration": classification_metrics(test_y, softmax(test_logits), 3),
                 "after_calibration": classification_metrics(test_y, probs, 3),
                 "calibration": calibrate.calibration_report(test_logits, test_y, calibrator),
                 "calls": calls.calls_summary(test_calls, truth)},
        "open_set": calls.open_set_report(calls.calls_for(unknown_probs, labels, choice.threshold, True),
                                          unknown.reindex(columns=[C.SPECIES, *labels.ranks]), test_calls, truth),
    }
    final_markdown(metrics)  # the train recipe's own reader accepts this metrics.json: the format is the real one
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "calibration.json").write_text(json.dumps({
        "calibrator": calibrator.to_dict(), "threshold": choice.threshold, "target_precision": 0.9,
        "rank_fallback": True, "ranks": list(labels.ranks)}))
    (out / "idengine.json").write_text(json.dumps({"format": "idengine-artifact", "versions": {"torch": "2.x"},
                                                   "num_labels": labels.num_classes}))
    labels.to_json(out / C.LABEL_MAP_FILE)
    return metrics


def test_train_report_puts_test_beside_cv_and_calibration_before_after(runs, tmp_path):
    metrics = _write_train_dir(runs, tmp_path)
    assert detect_run_kinds(tmp_path) == ["train"]
    text, dom = _report(tmp_path)
    assert dom.sections == TRAIN_IDS
    header, *rows = dom.tables["test-table"]
    assert [c[0] for c in header] == ["metric", "test before calibration", "test after calibration",
                                      "cv mean ± sd", "test after calibration - cv mean"]
    rows = {row[0][0]: row for row in rows}
    for name, value in metrics["test"]["after_calibration"].items():
        assert _value(rows[name][1]) == metrics["test"]["before_calibration"][name]
        assert _value(rows[name][2]) == value
        assert float(rows[name][3][1]["data-mean"]) == metrics["cv"]["mean"][name]["mean"]
    before_after = [t for t in dom.tables.values() if [c[0] for c in t[0]] == ["metric", "before", "after"]]
    assert "metrics.json: calibration.oof" in text and "metrics.json: test.calibration" in text
    for table, report in zip(before_after, (metrics["calibration"]["oof"], metrics["test"]["calibration"])):
        for row in table[1:]:
            assert (_value(row[1]), _value(row[2])) == (report["before"][row[0][0]], report["after"][row[0][0]])
    open_set = {row[0][0]: row[1] for row in dom.tables["open-set-table"][1:]}
    assert _value(open_set["metrics.json: open_set.unknown.over_classification_rate"]) == \
        metrics["open_set"]["unknown"]["over_classification_rate"]
    assert _value(open_set["calibration.json: threshold"]) == metrics["threshold"]["threshold"]
    assert any(src.startswith("data:image/png;base64,") for src in dom.images)


def test_one_epoch_run_without_train_metrics_and_an_empty_tune_still_render(runs, tmp_path):
    baseline = _write_cv_dir(runs["prepared"], tmp_path / "baseline", signals=(2.0,), with_train=False)
    text, dom = _report(baseline)
    assert dom.sections == CV_IDS
    assert "One epoch per fold" in text and "no training-set metrics" in text
    header = [c[0] for c in dom.tables["fold-table"][0]]
    assert _value(dom.tables["fold-table"][1][header.index("epochs run")]) == 1
    empty = tmp_path / "tune"
    empty.mkdir()
    pd.DataFrame(columns=["trial_id", "status", "mean_pr_auc_macro", "folds_done", "seconds"]).to_csv(
        empty / "trials.csv", index=False)
    assert _report(empty)[1].sections == TUNE_IDS


def test_unknown_and_missing_directories_fail_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a run directory.*prepare_report\.json.*trials\.csv.*notes\.txt"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        write_report(tmp_path / "absent")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return found


@pytest.mark.browser
def test_headless_chromium_renders_every_section(runs, tmp_path):
    browser = _chromium()
    combined = runs["root"] / "combined"  # a prepared dir that also holds a cv run: both kinds in one page
    shutil.copytree(runs["prepared"], combined)
    for name in ("metrics.json", "oof.parquet", "folds"):
        src = runs["cv"] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, combined / name)
    page = write_report(combined)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Dom(dom.stdout)
    assert parsed.sections == PREPARE_IDS + CV_IDS[1:]
    assert parsed.images and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
