"""What the reference lets any caller achieve (issue #12, part 6): how often the evidence can single out the true
species at all, and the engine's own trade-off between known-species calls and over-classification.

    python bench/engine_ceiling.py runs/bench/12s-fish/cv/kmer-nb --out bench/results/engine_ceiling.json

Reads an `idengine cv` directory's engine outputs (engine/scenarios.parquet, engine/options.parquet: every query's
out-of-fold options with their features and the nested decision models' scores), runs nothing, and writes:

1. **Resolvability** per scenario (known, known_rare): the share of queries whose true species is the one species at
   the best identity (the index can single it out), is tied there with others, or is not at the best identity; and
   the share that match two or more species at 100 % identity (identical sequences under different names: no
   sequence evidence can separate them). These bound what a species call at high precision can cover.
2. **The trade-off curve** of the engine's out-of-fold species probability: for a range of one pooled species
   threshold, the precision of species calls over every query, the known-species call share and its precision,
   the known-rare call share and precision, and over-classification of the novel queries. The engine's own
   threshold is chosen per fold from the other folds (`recipes/engine.judge_fold`); this curve pools all folds, so
   it shows the shape of the trade-off, not a second tuning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from run_bench import git_commit  # noqa: E402
from idengine.recipes.engine import read_engine  # noqa: E402
from idengine.reference.evidence import FEATURES, SPECIES  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95, 0.98)
NOVEL = ("novel_species", "novel_genus")
EXACT = 1e-9


def best_identity_species(options) -> pd.DataFrame:
    """Per species option: query, species, divergence (1 - best identity), and whether it is at its query's best."""
    col = {name: i for i, name in enumerate(FEATURES)}
    sp = options.kind == SPECIES
    table = pd.DataFrame({"query": options.query[sp], "species": options.name[sp],
                          "div": options.features[sp, col["sp_div"]],
                          "has_hit": options.features[sp, col["sp_has_hit"]] > 0})
    table = table[table["has_hit"]]
    best = table.groupby("query")["div"].transform("min")
    return table.assign(at_best=table["div"] <= best + EXACT)


def resolvability(scenarios: pd.DataFrame, species: pd.DataFrame, kind: str) -> dict:
    """Shares of one scenario's queries: truth alone at the best identity, tied there, elsewhere; exact multi-matches."""
    queries = scenarios.index[scenarios["scenario"] == kind]
    top = species[species["at_best"] & species["query"].isin(queries)]
    n_best = top.groupby("query").size().reindex(queries, fill_value=0)
    truth = scenarios["truth_species"].reindex(top["query"]).to_numpy()
    truth_at_best = pd.Series(top["species"].to_numpy() == truth).groupby(top["query"].to_numpy()).any()
    truth_at_best = truth_at_best.reindex(queries, fill_value=False)
    exact = species[(species["div"] <= EXACT) & species["query"].isin(queries)].groupby("query").size()
    exact = exact.reindex(queries, fill_value=0)
    return {"queries": int(len(queries)),
            "truth_alone_at_best_identity": _share(truth_at_best & (n_best == 1)),
            "truth_tied_at_best_identity": _share(truth_at_best & (n_best > 1)),
            "truth_not_at_best_identity": _share(~truth_at_best),
            "identical_to_two_or_more_species": _share(exact >= 2)}


def tradeoff(scenarios: pd.DataFrame) -> list[dict]:
    """One row per pooled species threshold (see the module docstring, 2)."""
    kind, prob = scenarios["scenario"].to_numpy(), scenarios["species_prob"].to_numpy()
    right = (scenarios["species"] == scenarios["truth_species"]).to_numpy() & ~np.isin(kind, NOVEL)
    known, rare, novel = kind == "known", kind == "known_rare", np.isin(kind, NOVEL)
    rows = []
    for t in THRESHOLDS:
        call = prob >= t
        rows.append({"threshold": t, "precision_all_queries": _share(right[call]),
                     "known_called": _share(call[known]), "known_precision": _share(right[call & known]),
                     "known_rare_called": _share(call[rare]), "known_rare_precision": _share(right[call & rare]),
                     "over_classification": _share(call[novel])})
    return rows


def _share(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return round(float(values.mean()), 4) if values.size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv", type=Path, help="an `idengine cv` output directory with engine/")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine_ceiling.json")
    args = parser.parse_args()
    scenarios, options, _ = read_engine(args.cv)
    species = best_identity_species(options)
    engine_metrics = json.loads((args.cv / "metrics.json").read_text()).get("engine", {}).get("engine", {})
    report = {"command": " ".join(["python", "bench/engine_ceiling.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
              "cv": str(args.cv), "queries": scenarios["scenario"].value_counts().to_dict(),
              "resolvability": {k: resolvability(scenarios, species, k) for k in ("known", "known_rare")},
              "tradeoff_pooled": tradeoff(scenarios),
              "engine_per_fold_thresholds": {k: engine_metrics.get(k) for k in
                                             ("known_called_species", "over_classification", "top1_acc")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["resolvability"], indent=1))
    for row in report["tradeoff_pooled"]:
        print(row)


if __name__ == "__main__":
    main()
