"""Report Markdown: the short summaries each step writes beside its outputs (prepare_report.md, summary.md,
trials.md, final_report.md). Dicts and tables in, Markdown text out.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from idengine.evaluate.calls import UNASSIGNED


def md_table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> list[str]:
    """Lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def prepare_markdown(report: dict[str, Any]) -> str:
    """prepare_report.md: the accounting and the warnings first, then species, lengths, conflicts and folds."""
    r = report
    warnings = r.get("warnings", [])
    lines = [
        "# Prepare report",
        "",
        f"{r['records_read']} records read = {r['kept']} kept + {r['set_aside_rare_species']} set aside "
        f"(rare species, unknown.parquet) + {r['dropped_total']} dropped (dropped.csv).",
        "",
        *([f"## Warnings ({len(warnings)})", "", *[f"- {w}" for w in warnings], ""] if warnings else []),
        "## Dropped, by reason (in step order)",
        "",
        *md_table([(k, v) for k, v in r["dropped"].items()], ("reason", "records")),
        "",
        "## Species",
        "",
        f"Species before: {r['species_before']}; after cleaning: {r['species_after_cleaning']}; "
        f"kept: {r['species_after']}; set aside: {r['species_set_aside']}. "
        f"Imbalance (max/min records per kept species): {r['imbalance_ratio']:.1f}.",
        "",
        *md_table(
            [(b, r["buckets_before"][b], r["buckets_after"][b]) for b in r["buckets_before"]],
            ("records per species", "species before", "species kept"),
        ),
        "",
        "## Sequences",
        "",
        *md_table([(k, v) for k, v in r["length_bp"].items()], ("kept length (bp)", "value")),
        "",
        f"Label conflicts (identical sequences under several species): {r['label_conflicts']['sequences']} sequences, "
        f"{r['label_conflicts']['records']} records; policy `{r['label_conflicts']['policy']}` dropped "
        f"{r['label_conflicts']['dropped']}. Records sharing their sequence with another: "
        f"{r['records_in_shared_sequences']}; kept groups: {r['groups_kept']}.",
        "",
        *md_table([(k, v) for k, v in r["normalised"].items()], ("normalisation", "records (files for gzip/bom/crlf)")),
        "",
        *_folds_section(r),
        "## Steps",
        "",
        *[f"{i}. {step}" for i, step in enumerate(r["steps"], start=1)],
        "",
    ]
    return "\n".join(lines)


def _folds_section(r: dict[str, Any]) -> list[str]:
    """The Folds part of prepare_report.md: where the folds came from, what adapted to the data, their sizes."""
    split = r.get("split", {})
    kept_out = split.get("species_kept_out_of_test", [])
    decided = [f"Folds: {split.get('n_folds', '?')} (data.n_folds={split.get('n_folds_requested', '?')})."]
    if "test_splits" in split:
        decided.append(f"Test split: {r.get('folds', {}).get('test', 0)} records of {r.get('species_in_test', 0)} "
                       f"species; {len(kept_out)} species too small for a test share stay in training.")
    return [
        "## Folds",
        "",
        f"Source: {r.get('fold_source', '')}",
        "",
        " ".join(decided) + f" Species in every validation fold: {r.get('species_in_every_fold', '?')}.",
        "",
        *md_table([(k, v) for k, v in r.get("folds", {}).items()], ("fold", "records")),
        "",
        "Species absent from the training part of a fold: "
        + ", ".join(f"fold {k}: {v}" for k, v in r.get("species_missing_from_training", {}).items()),
        "",
    ]


def cv_markdown(metrics: dict) -> str:
    """summary.md: a short human summary of a cv run's metrics.json."""
    lines = [f"# Cross-validation: {metrics['model']}", "",
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


def trials_markdown(table: pd.DataFrame) -> str:
    """trials.md: the ranked trials as a Markdown table (floats to 4 significant digits)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def final_markdown(metrics: dict[str, Any]) -> str:
    """final_report.md: the engine's call first (test, then the cv's nested open set), then the classifier alone."""
    lines = [f"# Final model: {metrics['model']}", ""]
    if "engine" in metrics:
        lines += _engine_lines(metrics["engine"]) + [""]
    return "\n".join(lines + _classifier_lines(metrics)) + "\n\n![reliability](reliability.png)\n"


def _engine_lines(engine: dict[str, Any]) -> list[str]:
    test, cv = engine["test"], engine.get("cv", {}).get("engine", {})
    thresholds = ", ".join(f"{rank} {_num(c['threshold'])}" + ("" if c["reachable"] else " (unreachable)")
                           for rank, c in engine["thresholds"].items())
    lines = ["## The engine's call", "",
             f"Test split (the reference holds every non-test record, not the test ones): top-1 "
             f"{_num(test['top1_acc'])}, macro F1 {_num(test['f1_macro'])}, macro PR-AUC "
             f"{_num(test['pr_auc_macro'])}, ECE {_num(test['ece'])}; {_num(test['called_species'])} of the records "
             f"called at species level, {_num(test['species_call_precision'])} of those right; calls by rank "
             f"{_fractions(test['calls'])}.", "",
             f"Thresholds per rank (out-of-fold, target precision): {thresholds}; decision temperature "
             f"{_num(engine['temperature'])}."]
    if cv:
        lines += ["", "Cross-validation, nested (fold k judged by decision models and thresholds fitted without "
                  f"fold k): known-species records called at species level {_num(_mean(cv, 'known_called_species'))}"
                  f"; species not in the reference still called at species level (over-classification) "
                  f"{_num(_mean(cv, 'over_classification'))}; right genus for unknown species of a known genus "
                  f"{_num(_mean(cv, 'novel_genus_accuracy_top'))} (called at genus level and right: "
                  f"{_num(_mean(cv, 'novel_genus_called_right'))})."]
    return lines


def _classifier_lines(metrics: dict[str, Any]) -> list[str]:
    cv, test, t = metrics["cv"]["mean"], metrics["test"], metrics["threshold"]
    lines = ["## The classifier alone", "",
             f"Trained on all non-test records ({metrics['training']['epochs']} epochs for a transformer: the median "
             f"best epoch of the cv folds {metrics['training']['cv_best_epochs']}); the test split ({test['n']} "
             "records) was scored once.", "", "| metric | cv mean | cv sd | test (calibrated) |", "|---|---|---|---|"]
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
    reached = "reached" if t["reachable"] else "NOT reachable: no species calls; best precision"
    lines += ["", f"Its species threshold {_num(t['threshold'])} for precision {t['target']} ({reached} on "
              f"out-of-fold data: {_num(t['achieved_precision'])}, coverage {_num(t['coverage'])}); its test calls by "
              f"rank {_fractions(test['calls'])}."]
    unknown = metrics.get("open_set", {}).get("unknown", {})
    if unknown.get("n"):
        lines += ["", f"Open set: {unknown['n']} records of the set-aside rare species (never its classes). "
                  f"Over-classification (its species calls) {_num(unknown['over_classification_rate'])}; calls by "
                  f"rank {_fractions(unknown['calls'])}; their genus is in the reference for "
                  f"{_num(unknown.get('genus_in_reference'))} of them."]
    return lines


def _mean(block: dict[str, Any], key: str) -> Any:
    value = block.get(key)
    return value.get("mean") if isinstance(value, dict) else value


def _num(value: Any, spec: str = ".3f") -> str:
    """A number for the report; `n/a` for None or NaN (e.g. the precision of zero calls)."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fractions(calls: dict[str, Any]) -> str:
    parts = [f"{rank} {_num(share)} (right {_num(calls['correct_at_rank'].get(rank))})"
             if rank != UNASSIGNED else f"{rank} {_num(share)}" for rank, share in calls["assigned"].items()]
    return ", ".join(parts)
