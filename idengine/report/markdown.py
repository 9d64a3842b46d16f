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
    """prepare_report.md: the accounting first, then species, lengths, conflicts and folds."""
    r = report
    lines = [
        "# Prepare report",
        "",
        f"{r['records_read']} records read = {r['kept']} kept + {r['set_aside_rare_species']} set aside "
        f"(rare species, unknown.parquet) + {r['dropped_total']} dropped (dropped.csv).",
        "",
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
        "## Folds",
        "",
        f"Source: {r.get('fold_source', '')}",
        "",
        *md_table([(k, v) for k, v in r.get("folds", {}).items()], ("fold", "records")),
        "",
        "Species absent from the training part of a fold: "
        + ", ".join(f"fold {k}: {v}" for k, v in r.get("species_missing_from_training", {}).items()),
        "",
        "## Steps",
        "",
        *[f"{i}. {step}" for i, step in enumerate(r["steps"], start=1)],
        "",
    ]
    return "\n".join(lines)



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
