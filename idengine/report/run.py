"""Report: any run directory (prepare, cv, tune, train) -> one self-contained HTML page, its PNGs beside it.

The kind of run is read from the files present (a directory may be several kinds at once). Tables show the numbers
the run wrote; PR curves, reliability and confusions are derived from its out-of-fold logits. Every section is a
<section id=...> with an <h2>; the figures come from `plots.py`, the HTML pieces from `html.py`.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idengine import layout as C
from idengine.evaluate.metrics import expected_calibration_error, per_class_average_precision, reliability_bins, \
    softmax
from idengine.evaluate.oof import read_oof
from idengine.report import plots as rp
from idengine.report.html import Page, before_after_pairs, details, flatten, fmt, mean_sd, para, table
from idengine.storage import read_json, write_text

logger = logging.getLogger(__name__)

FILES_SUFFIX = "_files"
"""The PNGs go to <page stem>_files/ beside the page (report.html -> report_files/), as a browser saves a page."""
TOP_CONFUSED = 15
"""Most confused (true, predicted) species pairs listed."""
EXPECTED = ("prepare_report.json (prepare), metrics.json with per-fold results (cv), trials.csv (tune), "
            "idengine.json / calibration.json / metrics.json with test metrics (train)")


def _config_block(run_dir: Path) -> str:
    path = run_dir / C.CONFIG_FILE
    return details(f"resolved config ({path.name})", path.read_text(encoding="utf-8")) if path.exists() else ""


def detect_run_kinds(run_dir: str | Path) -> list[str]:
    """Which steps wrote this directory, judged from the files present: any of prepare, cv, tune, train."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / C.METRICS_FILE) if (run_dir / C.METRICS_FILE).exists() else {}
    metrics = metrics if isinstance(metrics, dict) else {}
    kinds = ["prepare"] if (run_dir / C.REPORT_JSON).exists() else []
    if isinstance(metrics.get("folds"), list):
        kinds.append("cv")
    if (run_dir / C.TRIALS_CSV).exists():
        kinds.append("tune")
    if (run_dir / C.MANIFEST).exists() or (run_dir / C.CALIBRATION).exists() or \
            any("test" in str(k) for k in metrics):
        kinds.append("train")
    return kinds


def _prepare_sections(page: Page, run_dir: Path, **_: Any) -> None:
    r = read_json(run_dir / C.REPORT_JSON)
    records = pd.read_parquet(run_dir / C.RECORDS_FILE, columns=[C.SEQUENCE, C.SPECIES, C.FOLD]) \
        if (run_dir / C.RECORDS_FILE).exists() else pd.DataFrame(columns=[C.SEQUENCE, C.SPECIES, C.FOLD])
    rows = [("records read", r.get("records_read")), ("kept", r.get("kept")),
            ("set aside: rare species (unknown.parquet)", r.get("set_aside_rare_species"))]
    rows += [(f"dropped: {reason}", n) for reason, n in r.get("dropped", {}).items() if n]
    accounted = sum(v for _, v in rows[1:] if isinstance(v, int))
    rows.append(("kept + set aside + dropped", accounted))
    conflicts = r.get("label_conflicts", {})
    check = "adds up to" if accounted == r.get("records_read") else "DOES NOT add up to"
    page.add("prepare-counts", "Record accounting", table(("", "records"), rows, "counts-table", True),
             para(f"kept + set aside + dropped {check} the records read. Label conflicts (identical sequences under "
                  f"several species): {conflicts.get('sequences', 0)} sequences, {conflicts.get('records', 0)} "
                  f"records, policy {conflicts.get('policy', '?')}."), _config_block(run_dir))
    sizes, per_species = records[C.SPECIES].value_counts(), r.get("records_per_species_after", {})
    before, after = r.get("buckets_before", {}), r.get("buckets_after", {})
    fig = rp.class_balance_figure(sizes.to_numpy(), before, after)
    page.add("class-balance", "Class balance",
             para(f"Species: {r.get('species_before')} before cleaning, {r.get('species_after')} kept, "
                  f"{r.get('species_set_aside')} set aside as rare. Records per kept species: min "
                  f"{per_species.get('min')}, median {per_species.get('median')}, max {per_species.get('max')}; "
                  f"imbalance ratio (max/min) {fmt(r.get('imbalance_ratio', float('nan')))}."),
             page.figure(fig, "class_balance", "Records per species (log-log), rank-size curve, size buckets."),
             table(("records per species", "species before", "species kept"), [(b, n, after.get(b)) for b, n in
                                                                                before.items()]),
             table(("largest species", "records"), list(sizes.head(10).items())))
    lengths = {str(f): g[C.SEQUENCE].str.len().to_numpy() for f, g in records.groupby(C.FOLD, sort=True)}
    page.add("length-distribution", "Length distribution",
             page.figure(rp.length_figure(lengths), "lengths", "Cleaned sequence lengths, all kept and per split."),
             table(("kept length (bp)", "value"), list(r.get("length_bp", {}).items())))
    folds, missing = r.get("folds", {}), r.get("species_missing_from_training", {})
    species = records.groupby(C.FOLD)[C.SPECIES].nunique().to_dict()
    page.add("fold-sizes", "Fold sizes",
             page.figure(rp.fold_sizes_figure(folds, species), "fold_sizes", "Records and species per split."),
             table(("split", "records", "species", "species absent from its training part"),
                   [(f, n, species.get(f, 0), missing.get(f, "")) for f, n in folds.items()], "folds-table"),
             para(f"Fold source: {r.get('fold_source', 'unknown')}."))


def _labels_agree(prepared: Path, ids: np.ndarray, y: np.ndarray) -> bool:
    """True when the prepared records beside a label map give the out-of-fold ids the same labels (or none exist)."""
    path = prepared / C.RECORDS_FILE
    if not path.is_file():
        return True
    records = pd.read_parquet(path, columns=[C.ID, C.LABEL]).drop_duplicates(C.ID).set_index(C.ID)[C.LABEL]
    found = records.reindex(ids[:2000].astype(str))  # a sample is enough to tell two prepared sets apart
    return bool(found.notna().all() and (found.to_numpy() == y[:2000]).all())


def _find_label_map(run_dir: Path, ids: np.ndarray, y: np.ndarray, num_classes: int,
                    explicit: str | Path | None) -> tuple[list[dict], str]:
    """The label map naming a cv run's classes and where it came from; else ([], why label ids are shown).

    A candidate must have num_classes labels and, where its records.parquet is beside it, give the run's
    out-of-fold ids the same labels: a label map of another prepared set would name the wrong species.
    """
    if explicit is not None:
        candidates = [Path(explicit) / C.LABEL_MAP_FILE if Path(explicit).is_dir() else Path(explicit)]
        if not candidates[0].is_file():
            raise FileNotFoundError(f"{candidates[0]}: no label map there (label_map= takes a prepared directory)")
    else:
        candidates = [run_dir / C.LABEL_MAP_FILE, run_dir.parent / C.LABEL_MAP_FILE,
                      *sorted(run_dir.parent.glob(f"*/{C.LABEL_MAP_FILE}"))]
    for path in candidates:
        if not path.is_file():
            continue
        entries = sorted(read_json(path).get("labels", []), key=lambda e: e["label"])
        if len(entries) == num_classes and _labels_agree(path.parent, ids, y):
            return entries, f"Species names from {path}"
        if explicit is not None:
            raise ValueError(f"{path}: {len(entries)} labels, or records whose labels differ from the cv run's "
                             f"({num_classes} classes): not the prepared set this run used")
    return [], "No label_map.json of this run's prepared set beside it: label ids shown (pass label_map=...)"


def _cv_table_section(page: Page, run_dir: Path, m: dict) -> None:
    folds = m["folds"]
    names = list(dict.fromkeys(k for f in folds for k in f.get("val", {})))
    rows = [[f["fold"], f.get("best_epoch"), f.get("epochs_run"), *[f["val"].get(k, np.nan) for k in names],
             f.get("seconds", np.nan)] for f in folds]
    rows.append(["mean ± sd", "", "", *[mean_sd(m.get("mean", {}).get(k)) for k in names], m.get("seconds")])
    page.add("fold-metrics", "Per-fold validation metrics",
             para(f"Model {m.get('model', m.get('backbone'))}, {m.get('num_classes')} species, "
                  f"{len(folds)} folds; each fold's row is its best epoch by {m.get('monitor')}. The last row is "
                  "the mean ± sample sd over folds (the seconds cell: total)."),
             table(("fold", "best epoch", "epochs run", *names, "seconds"), rows, "fold-table", True),
             _config_block(run_dir))


def _cv_curves_sections(page: Page, run_dir: Path, m: dict) -> None:
    monitor = m.get("monitor", "pr_auc_macro")
    histories = {p.stem: read_json(p) for p in sorted((run_dir / C.FOLD_HISTORY_DIR).glob("*.json"), key=lambda p: p.stem)}
    best = {str(f["fold"]): f.get("best_epoch") for f in m["folds"]}
    single = all(len(h) <= 1 for h in histories.values())
    if histories:
        page.add("learning-curves", "Learning curves",
                 para("One epoch per fold (a baseline fitted in one pass): no curve to show." if single else
                      "Validation should level off where the star marks the kept epoch; a train curve that keeps "
                      "rising while validation falls is over-fitting."),
                 page.figure(rp.learning_curves_figure(histories, monitor, best), "learning_curves",
                             f"Per-fold loss and {monitor} per epoch."))
    metric = "pr_auc_macro" if all("pr_auc_macro" in f.get("train", {}) for f in m["folds"]) else monitor
    folds = [str(f["fold"]) for f in m["folds"]]
    train = [f.get("train", {}).get(metric, np.nan) for f in m["folds"]]
    val = [f["val"].get(metric, np.nan) for f in m["folds"]]
    gaps = [t - v for t, v in zip(train, val)]
    if not np.isfinite(gaps).any():
        page.add("train-val-gap", "Train vs validation gap", para("This run recorded no training-set metrics."))
        return
    rows = [*zip(folds, train, val, gaps), ("mean ± sd", *[mean_sd(
        {"mean": np.nanmean(x), "sd": np.nanstd(x, ddof=1) if len(x) > 1 else 0.0}) for x in (train, val, gaps)])]
    page.add("train-val-gap", f"Train vs validation {metric} gap",
             para(f"Train {metric} is scored on a sample of the fold's training records at the kept epoch."),
             page.figure(rp.gap_figure(folds, train, val, metric), "gap", f"Train and validation {metric} per fold."),
             table(("fold", f"train {metric}", f"validation {metric}", "gap"), rows, "gap-table", True))


def _cv_oof_sections(page: Page, run_dir: Path, m: dict, label_map: str | Path | None) -> None:
    ids, fold_of, y, logits = read_oof(run_dir)
    y = y.astype(np.int64)  # pyarrow gives int32; metrics and bincount want a plain integer array
    names = _find_label_map(run_dir, ids, y, int(m.get("num_classes", logits.shape[1])), label_map)
    probs = softmax(logits)
    logger.info("report: PR curves over %d out-of-fold records x %d species ...", *probs.shape)
    curves, truncated = {}, False
    for name, rows in [("all folds", np.ones(y.size, bool))] + [(f"fold {f}", fold_of == f) for f in
                                                                 sorted(set(fold_of), key=lambda f: (len(f), f))]:
        # each fold gets its share of the pair budget, so all folds together cost as much as the pooled curve
        precision, recall, ap, cut = rp.micro_pr_curve(y[rows], probs[rows], rp.MAX_PR_PAIRS * rows.mean())
        curves[name], truncated = (precision, recall, ap), truncated or cut
    logger.info("report: per-species average precision ...")
    classes, ap = per_class_average_precision(y, probs)
    note = " Each record's top-scoring species only (too many pairs to score all); recall is over all records." \
        if truncated else ""
    page.add("pr-curves", "Precision-recall curves",
             page.figure(rp.pr_figure(curves, ap, np.bincount(y)[classes]), "pr_curves",
                         "Micro-averaged PR of the out-of-fold probabilities (pooled and per fold), per-species "
                         "average precision and its dependence on the species' record count." + note),
             table(("", "value"), [("micro-averaged AP (all folds)", curves["all folds"][2]),
                                   ("macro AP over species present", float(ap.mean()) if ap.size else np.nan),
                                   ("species with AP < 0.5", int((ap < 0.5).sum()))]))
    bins, ece = reliability_bins(y, probs), expected_calibration_error(y, probs)
    page.add("reliability", "Reliability (out-of-fold, before calibration)",
             page.figure(rp.reliability_figure(bins, ece, y.size, "Out-of-fold top-label reliability"),
                         "reliability", "Bars above the diagonal: under-confident; below: over-confident."),
             table(("bin", "records", "mean confidence", "accuracy"),
                   [(f"{lo:.2f}-{hi:.2f}", int(n), c, a) for lo, hi, n, c, a in
                    zip(bins["edges"][:-1], bins["edges"][1:], bins["count"], bins["confidence"], bins["accuracy"])
                    if n]))
    _confused_section(page, y, probs.argmax(axis=1), *names)


def _confused_section(page: Page, y: np.ndarray, pred: np.ndarray, entries: list[dict], source: str) -> None:
    num_classes = max(len(entries), int(max(y.max(), pred.max()) + 1))
    names = [e["species"] for e in entries] or [f"label {i}" for i in range(num_classes)]
    genus = [e.get("genus") for e in entries] or [None] * num_classes
    wrong = y != pred
    pairs, counts = np.unique(np.stack([y[wrong], pred[wrong]], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:TOP_CONFUSED]
    lookup = {(int(a), int(b)): int(n) for (a, b), n in zip(pairs, counts)}
    support = np.bincount(y, minlength=num_classes)
    rows = []
    for t, p, n in zip(pairs[order, 0], pairs[order, 1], counts[order]):
        same = "?" if genus[t] is None or genus[p] is None else ("yes" if genus[t] == genus[p] else "no")
        rows.append((names[t], names[p], int(n), n / support[t], lookup.get((int(p), int(t)), 0), same))
    known = [genus[t] is not None and genus[p] is not None for t, p in zip(y[wrong], pred[wrong])]
    within = [genus[t] == genus[p] for t, p, k in zip(y[wrong], pred[wrong], known) if k]
    genus_note = f" {np.mean(within):.1%} of the miscalls with known genera stay within the true genus." \
        if within else ""
    page.add("confused-pairs", "Most confused species pairs",
             para(f"The {TOP_CONFUSED} most frequent (true, predicted) pairs of the out-of-fold argmax calls: "
                  f"{int(wrong.sum())} of {y.size} records are miscalled.{genus_note} {source}."),
             table(("true species", "predicted species", "records", "share of the true species", "reverse count",
                    "same genus"), rows, "confused-table"))


def _cv_sections(page: Page, run_dir: Path, label_map: str | Path | None = None, **_: Any) -> None:
    m = read_json(run_dir / C.METRICS_FILE)
    _cv_table_section(page, run_dir, m)
    _cv_curves_sections(page, run_dir, m)
    if (run_dir / C.OOF_FILE).exists():
        _cv_oof_sections(page, run_dir, m, label_map)


def _tune_sections(page: Page, run_dir: Path, **_: Any) -> None:
    trials = pd.read_csv(run_dir / C.TRIALS_CSV)
    metric = next((c for c in trials.columns if c.startswith("mean_")), None)
    if metric is None:
        raise ValueError(f"{run_dir / 'trials.csv'}: no mean_<metric> column; was it written by `idengine tune`?")
    params = [c for c in trials.columns if c.startswith("config/")]
    fold_cols = sorted((c for c in trials.columns if re.fullmatch(rf"{re.escape(metric[5:])}_fold\w+", c)),
                       key=lambda c: (len(c), c))
    trials = trials.sort_values(["folds_done", metric], ascending=False, na_position="last", kind="stable")
    trials["sd over folds"] = trials[fold_cols].std(axis=1, ddof=1) if fold_cols else np.nan
    shown = [c for c in ("trial_id", "status", metric, "sd over folds", "folds_done", "seconds", *params, *fold_cols)
             if c in trials.columns]
    rows = [[i + 1, *[None if pd.isna(v) else v for v in row]] for i, row in
            enumerate(trials[shown].itertuples(index=False))]
    best = read_json(run_dir / C.BEST_JSON) if (run_dir / C.BEST_JSON).exists() else {}
    page.add("trials", "Trials, ranked",
             para(f"{len(trials)} trials ranked by folds completed, then {metric} (the mean over folds). Trials "
                  "stopped early by ASHA have a mean over fewer folds and cannot be best."),
             table(("rank", *[c.removeprefix("config/") for c in shown]), rows, "trials-table"),
             table(("best.json", "value"), flatten(best)) if best else "", _config_block(run_dir))
    complete = (trials["status"] == "COMPLETE").to_numpy() if "status" in trials else np.ones(len(trials), bool)
    values = {c.removeprefix("config/"): trials[c].tolist() for c in params}
    page.add("trial-parameters", "Mean metric against each searched parameter",
             page.figure(rp.trial_params_figure(values, trials[metric].tolist(), complete, metric), "trial_params",
                         f"{metric} of each trial against its sampled value (hollow: stopped early)."))
    per_trial = {str(r["trial_id"]): {c.rsplit("_fold", 1)[1]: r[c] for c in fold_cols if pd.notna(r[c])}
                 for _, r in trials.iterrows()}
    page.add("trial-folds", "Per-fold metric of each trial",
             page.figure(rp.trial_folds_figure(per_trial, metric[5:]), "trial_folds",
                         "A trial ahead on one fold only is not reliably better: compare with the fold spread."))


TRAIN_DOCS = ("metrics.json", "calibration.json", "idengine.json")
METRIC_KEYS = {"top1_acc", "f1_macro", "log_loss", "brier", "pr_auc_macro", "ece"}
OPEN_SET_KEYS = re.compile(r"threshold|target_precision|rank_fallback|open_set|unknown|over_classif|coverage|calls|"
                           r"assigned|reject", re.I)


def _cv_summary(docs: dict[str, Any]) -> dict:
    """{metric: {mean, sd}} of the cross-validation the final model came from, wherever the train run recorded it."""
    for doc in docs.values():
        found = next((doc[k] for k in ("cv", "cv_mean", "cv_metrics") if k in doc), None)
        if isinstance(found, str) and (Path(found) / "metrics.json").exists():
            found = read_json(Path(found) / "metrics.json")
        if isinstance(found, dict):
            found = found.get("mean", found)
            return {k: v for k, v in found.items() if isinstance(v, dict) and "mean" in v}
    metrics = docs.get("metrics.json", {})
    return metrics.get("mean", {}) if isinstance(metrics.get("folds"), list) else {}


def _train_test_section(page: Page, metrics: dict, cv: dict) -> None:
    test = next((v for k, v in metrics.items() if "test" in str(k) and isinstance(v, dict)), {})
    known = METRIC_KEYS | set(cv)
    columns = [(f"test {k}".replace("_", " ").strip(), d) for k, d in [("", test), *test.items()]
               if isinstance(d, dict) and len(known & set(d)) >= 2]
    if not columns:
        return
    names = list(dict.fromkeys(k for _, d in columns for k, v in d.items() if isinstance(v, (int, float))))
    last = columns[-1]
    rows = [(k, *[d.get(k, np.nan) for _, d in columns], mean_sd(cv.get(k)),
             last[1][k] - cv[k]["mean"] if k in cv and k != "n" and isinstance(last[1].get(k), float) else "")
            for k in names]
    page.add("test-metrics", "Held-out test metrics beside cross-validation",
             para("The test split is scored once, by the final model; cv is the mean ± sd over folds. A test score "
                  "far outside the fold spread means the test split (or the final training) differs from the folds."),
             table(("metric", *[n for n, _ in columns], "cv mean ± sd", f"{last[0]} - cv mean"), rows, "test-table"))


def _train_sections(page: Page, run_dir: Path, **_: Any) -> None:
    docs = {n: read_json(run_dir / n) for n in TRAIN_DOCS if (run_dir / n).exists()}
    docs = {n: d for n, d in docs.items() if isinstance(d, dict)}
    _train_test_section(page, docs.get("metrics.json", {}), _cv_summary(docs))
    pngs = sorted(run_dir.glob("*.png"))
    is_calibration = [bool(re.search("reliab|calib", p.stem)) for p in pngs]
    figures = [page.png(p.read_bytes(), f"train_{p.stem}", p.name) for p, c in zip(pngs, is_calibration) if c]
    pairs = [(f"{name}: {where or '(top level)'}", b, a) for name, doc in docs.items()
             for where, b, a in before_after_pairs(doc)]
    settings = [(k, v) for k, v in flatten(docs.get("calibration.json", {})) if not OPEN_SET_KEYS.search(k)]
    tables = [para(where) + table(("metric", "before", "after"), [(k, v, after.get(k, np.nan)) for k, v in
                                                                  before.items()]) for where, before, after in pairs]
    if tables or settings or figures:
        page.add("calibration", "Calibration before and after", *tables,
                 table(("calibration.json", "value"), settings) if settings else "", *figures)
    rows = [(f"{name}: {k}", v) for name, doc in docs.items() for k, v in flatten(doc) if OPEN_SET_KEYS.search(k)]
    if rows:
        page.add("threshold-open-set", "Threshold and open-set (over-classification)",
                 para("Over-classification rate: share of queries from species absent from the reference that still "
                      "get a species call; coverage: share of known-species records called at the threshold; "
                      "calls: share of records called at each rank by the rank fallback, and how many are right."),
                 table(("quantity", "value"), rows, "open-set-table"))
    dumps = {n: json.dumps(d, indent=1, default=str) for n, d in docs.items()}
    cut = {n: t if len(t) < 50_000 else t[:50_000] + "\n... (cut; see the file)" for n, t in dumps.items()}
    page.add("train-files", "Everything the train run recorded", _config_block(run_dir),
             *[details(n, t) for n, t in cut.items()],
             *[page.png(p.read_bytes(), f"train_{p.stem}", p.name) for p, c in zip(pngs, is_calibration) if not c])


SECTION_BUILDERS = {"prepare": _prepare_sections, "cv": _cv_sections, "tune": _tune_sections,
                    "train": _train_sections}


def write_report(run_dir: str | Path, out: str | Path | None = None, label_map: str | Path | None = None) -> Path:
    """Turn a prepare / cv / tune / train output directory into one self-contained HTML page.

    Args:
        run_dir: A directory written by `idengine prepare`, `cv`, `tune` or `train` (or several of them).
        out: The HTML file; default run_dir/report.html. The PNGs are also written to
            <stem>_files/ beside it (report_files/ for report.html), so two pages in one folder keep theirs.
        label_map: label_map.json (or the prepared directory holding it) naming a cv run's species; by default
            one with the right number of labels is looked for in run_dir, its parents and their subdirectories.

    Returns:
        The HTML file.

    Raises:
        FileNotFoundError: run_dir does not exist.
        ValueError: run_dir holds none of the files a run writes, or one of them is unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    kinds = detect_run_kinds(run_dir)
    if not kinds:
        found = sorted(p.name for p in run_dir.iterdir())[:12] or "nothing"
        raise ValueError(f"{run_dir}: not a run directory: expected {EXPECTED}; found {found}")
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    page = Page(out.with_name(out.stem + FILES_SUFFIX))
    files = sorted(p.name for p in run_dir.iterdir() if p.name not in (out.name, page.files_dir.name))
    page.add("overview", "Overview", table(("", ""), [
        ("run directory", str(run_dir.resolve())), ("kind", ", ".join(kinds)),
        ("written", datetime.datetime.now().isoformat(timespec="seconds")), ("files", ", ".join(files))]))
    for kind in kinds:
        start = time.perf_counter()
        logger.info("report: %s sections of %s ...", kind, run_dir)
        SECTION_BUILDERS[kind](page, run_dir, label_map=label_map)
        logger.info("report: %s sections done in %.1f s", kind, time.perf_counter() - start)
    write_text(out, page.render(f"idengine {' + '.join(kinds)} report: {run_dir.name}"))
    logger.info("report: %s (%d figures, also in %s)", out, len(page.images), page.files_dir)
    return out
