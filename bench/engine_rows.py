"""The engine's rows of the bench table (issue #12 part 5): the engine ("idengine") beside its parts.

A kmer or probe model's cv in `run_bench.py` also runs the engine's out-of-fold step (`recipes/engine.engine_cv`,
exactly as `idengine cv` does), so three rows come from one run on the same folds:

- **the classifier alone**: the model's own cv row (its calls: calibrated p >= the 95%-precision threshold);
- **the index alone**: the reference index's top hit at identity >= 0.97 (VSEARCH's call; the index gives the same
  best species as VSEARCH for 99.3% of queries, bench/results/index_check.md), on the engine's queries;
- **the engine**: the decision model's call, each fold judged by a model and thresholds fitted without it.

The engine's queries per fold are the fold's kept validation records (the classifier's cv queries: the closed-set
columns are comparable) plus the rare species dealt to the fold, queried with their own species hidden (novel
species) or their whole genus hidden (novel genus). The three open-world columns are measured on those queries:

- `known: species calls`: share of known-species queries called at species level at the chosen thresholds;
- `over-classified`: share of novel-species and novel-genus queries still called at species level;
- `novel sp.: genus right`: the most probable genus is the true one, for novel species whose genus is in the
  reference (the index: its top hit's genus, as VSEARCH's top hit).
"""

from __future__ import annotations

from typing import Any

KNOWN_CALLED = "known: species calls"
OVER_CLASSIFIED = "open set: overclassified"
GENUS_RIGHT = "novel sp.: genus right"


def run_engine(config, prepared, results: list, cv_out) -> dict[str, Any]:
    """Run the engine's cv step over finished folds and write the cv directory with its engine/ outputs."""
    from idengine.data.prepared import read_prepared, read_unknown
    from idengine.recipes.cv import write_cv
    from idengine.recipes.engine import engine_cv

    records, labels = read_prepared(prepared)
    engine = engine_cv(config, records, read_unknown(prepared), labels, results)
    write_cv(cv_out, config, results, labels.num_classes, engine)
    return engine.metrics


def _mean_sd(block: dict[str, Any], key: str) -> Any:
    value = block.get(key)
    return value if isinstance(value, dict) else None


def engine_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The engine's row and the index-alone row derived from one idengine model's result (none without engine)."""
    engine = row.get("engine")
    if not engine:
        return []
    e, index = engine["engine"], engine["index"]
    queries = engine["queries"]
    n = sum(queries.values())
    per_query = (engine["seconds_search"] + engine["seconds_evidence"]) / max(n, 1)
    note = (f"engine over the {row['name']} classifier; {n} out-of-fold queries ({queries}); each fold judged by a "
            f"decision model and thresholds fitted without it; classify seqs/s = index search + evidence of the cv "
            f"queries on 2 cores ({engine['seconds_search']:.0f} s + {engine['seconds_evidence']:.0f} s; the decision "
            "model's scoring is not included, it is a small MLP)")
    engine_row = {"name": f"idengine engine (classifier {row['name']})", "kind": "engine", "status": "ok",
                  "note": note, "metrics": {k: e.get(k) for k in ("top1_acc", "f1_macro", "top5_acc", "pr_auc_macro",
                                                                 "log_loss", "ece")},
                  "open_world": {KNOWN_CALLED: _mean_sd(e, "known_called_species"),
                                 OVER_CLASSIFIED: _mean_sd(e, "over_classification"),
                                 GENUS_RIGHT: _mean_sd(e, "novel_genus_accuracy_top")},
                  "extra": {k: e.get(k) for k in ("known_species_call_precision", "known_rare_called_species",
                                                  "known_rare_called_right", "novel_genus_called_right")},
                  "classify_seqs_per_s": round(1.0 / per_query, 1) if per_query else None}
    index_row = {"name": f"index alone (top hit >= 0.97, same queries as the {row['name']} engine)", "kind": "index",
                 "status": "ok", "note": "top-1 = right species at identity >= 0.97 (no call counts as wrong)",
                 "metrics": {"top1_acc": index.get("top1_acc")},
                 "open_world": {KNOWN_CALLED: _mean_sd(index, "known_called_species"),
                                OVER_CLASSIFIED: _mean_sd(index, "over_classification"),
                                GENUS_RIGHT: _mean_sd(index, "novel_genus_accuracy_top")},
                 "extra": {"known_rare_top1": index.get("known_rare_top1")}}
    return [engine_row, index_row]


def classifier_open_world(row: dict[str, Any]) -> dict[str, Any]:
    """The open-world cells of a classifier row: its OOF species-call share at its threshold, its open set."""
    open_set = row.get("open_set", {})
    return {KNOWN_CALLED: open_set.get("oof_coverage_at_threshold"), OVER_CLASSIFIED: open_set.get("overclassified"),
            GENUS_RIGHT: None}
