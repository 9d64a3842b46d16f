"""Step 10f, assessment: what the engine's out-of-fold answers are worth, beside its parts.

- closed-set: on known-species queries, the engine's species probabilities restricted to the classifier's label
  space and renormalised (how every other model of the bench answers), scored by `evaluate/metrics.py`;
- open-world, at the chosen thresholds: the share of known-species queries called at species level, the share of
  queries of species NOT in the reference still called at species level (over-classification), and the genus
  accuracy on unknown species whose genus is in the reference;
- the index alone (the top hit's species, as VSEARCH calls it: identity >= 0.97) on the same queries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from idengine import layout as C
from idengine.evaluate.metrics import classification_metrics
from idengine.reference.evidence import NOVEL_GENUS, NOVEL_SPECIES, Options
from idengine.reference.scenarios import KNOWN, KNOWN_RARE, NOVEL_GENUS as NOVEL_GENUS_SCENARIO
from idengine.reference.scenarios import NOVEL_SPECIES as NOVEL_SPECIES_SCENARIO
from idengine.reference.space import OptionSpace

INDEX_IDENTITY = 0.97
"""The index alone calls the top hit's species at this identity, as BLAST/VSEARCH users do."""
PROB_FLOOR = 1e-9


def target_slots(options: Options, answer_kind: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """Per query, the position of its right option among its rows (-1 when the right option is not offered)."""
    first = np.searchsorted(options.query, np.arange(options.n_queries))
    want_kind, want_name = np.asarray(answer_kind)[options.query], np.asarray(answer, dtype=object)[options.query]
    match = (options.kind == want_kind) & ((options.name == want_name) | (options.kind == NOVEL_GENUS))
    slots = np.full(options.n_queries, -1, dtype=np.int64)
    rows = np.flatnonzero(match)
    slots[options.query[rows[::-1]]] = (rows - first[options.query[rows]])[::-1]  # the first match wins
    return slots


def truth_table(scenarios: pd.DataFrame, taxonomy: pd.DataFrame) -> pd.DataFrame:
    """Per query: its true species (None when the scenario hides it), its true taxa at each rank, is_novel."""
    ranks = [r for r in C.RANKS if r in taxonomy.columns]
    per_species = taxonomy.drop_duplicates(C.SPECIES).set_index(C.SPECIES)
    novel = scenarios["scenario"].isin([NOVEL_SPECIES_SCENARIO, NOVEL_GENUS_SCENARIO]).to_numpy()
    out = pd.DataFrame({C.SPECIES: np.where(novel, None, scenarios["truth_species"].to_numpy())}, dtype=object)
    for rank in ranks:
        values = per_species[rank].reindex(scenarios["truth_species"]).to_numpy(dtype=object)
        if rank == "genus":
            hidden = (scenarios["scenario"] == NOVEL_GENUS_SCENARIO).to_numpy()
            values = np.where(hidden | (scenarios["answer_kind"].to_numpy() == NOVEL_GENUS) & novel, None, values)
        out[rank] = values
    out["is_novel"] = novel
    return out


def closed_set_probs(space: OptionSpace, p: sparse.csr_array, label_species: np.ndarray) -> np.ndarray:
    """(n, C) the engine's species probabilities over a classifier's label space, renormalised per row.

    A species the engine gives nothing gets exactly PROB_FLOOR in every row (the rest is scaled to 1 - C x floor), so
    such species tie exactly across queries: ranked by float noise instead, PR-AUC moved by +-0.004 between runs.
    A row with nothing on the label space is uniform."""
    col = pd.Index(space.species).get_indexer(pd.Index(label_species))
    dense = np.zeros((p.shape[0], len(label_species)))
    present = col >= 0
    dense[:, present] = p[:, col[present]].toarray()
    total = dense.sum(axis=1, keepdims=True)
    share = np.where(total > 0, dense / np.where(total > 0, total, 1.0), 1.0 / max(len(label_species), 1))
    floor = min(PROB_FLOOR, 0.5 / max(len(label_species), 1))
    return (1.0 - len(label_species) * floor) * share + floor


def open_world(calls: pd.DataFrame, scenarios: pd.DataFrame, genus_probs: tuple[np.ndarray, np.ndarray]
               ) -> dict[str, float]:
    """Species-call share of known-species queries, over-classification of novel ones, genus accuracy."""
    kind = scenarios["scenario"].to_numpy()
    species_call = calls["call_rank"].to_numpy() == "species"
    right_species = calls["call"].to_numpy() == scenarios["truth_species"].to_numpy()
    known, rare = kind == KNOWN, kind == KNOWN_RARE
    novel = np.isin(kind, [NOVEL_SPECIES_SCENARIO, NOVEL_GENUS_SCENARIO])
    genus_kept = (kind == NOVEL_SPECIES_SCENARIO) & (scenarios["answer_kind"].to_numpy() == NOVEL_SPECIES)
    top_genus, _ = genus_probs
    right_genus_call = (calls["call_rank"].to_numpy() == "genus") & \
        (calls["call"].to_numpy() == scenarios["truth_genus"].to_numpy())
    return {
        "known_called_species": _mean(species_call[known]),
        "known_species_call_precision": _mean(right_species[known & species_call]),
        "known_rare_called_species": _mean(species_call[rare]),
        "known_rare_called_right": _mean((species_call & right_species)[rare]),
        "over_classification": _mean(species_call[novel]),
        "novel_genus_accuracy_top": _mean(top_genus[genus_kept] == scenarios["truth_genus"].to_numpy()[genus_kept]),
        "novel_genus_called_right": _mean(right_genus_call[genus_kept]),
        "n_known": int(known.sum()), "n_known_rare": int(rare.sum()), "n_novel": int(novel.sum()), "n_novel_genus_known": int(genus_kept.sum()),
    }


def index_alone(hits_species: np.ndarray, hits_genus: np.ndarray, hits_identity: np.ndarray,
                scenarios: pd.DataFrame) -> dict[str, float]:
    """The top hit's species at identity >= 0.97 (VSEARCH's call), on the same queries as the engine."""
    kind = scenarios["scenario"].to_numpy()
    called = np.nan_to_num(hits_identity, nan=0.0) >= INDEX_IDENTITY
    known = kind == KNOWN
    novel = np.isin(kind, [NOVEL_SPECIES_SCENARIO, NOVEL_GENUS_SCENARIO])
    genus_kept = (kind == NOVEL_SPECIES_SCENARIO) & (scenarios["answer_kind"].to_numpy() == NOVEL_SPECIES)
    right = called & (hits_species == scenarios["truth_species"].to_numpy())
    return {"top1_acc": _mean(right[known]), "known_rare_top1": _mean(right[kind == KNOWN_RARE]),
            "known_called_species": _mean(called[known]), "over_classification": _mean(called[novel]),
            "novel_genus_accuracy_top": _mean(hits_genus[genus_kept] == scenarios["truth_genus"].to_numpy()[
                genus_kept])}


def closed_set_metrics(space: OptionSpace, p: sparse.csr_array, scenarios: pd.DataFrame, label_species: np.ndarray,
                       top_k: int) -> dict[str, Any]:
    """classification_metrics of the known-species queries over the classifier's label space (see the docstring)."""
    known = (scenarios["scenario"] == KNOWN).to_numpy()
    labels = pd.Index(label_species).get_indexer(pd.Index(scenarios.loc[known, "truth_species"]))
    probs = closed_set_probs(space, p[np.flatnonzero(known)], label_species)
    return classification_metrics(labels, probs, top_k=top_k)


def _mean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.mean()) if values.size else float("nan")

