"""Step 10e, the engine's answer space: every reference species, "a species not in the reference" of every genus, and
"a genus not in the reference", as the columns of one sparse probability matrix, and the calls made from it.

Column layout: [0, S) the reference species (sorted), [S, S + G) a novel species of each known genus, S + G a novel
genus. Summed up the taxonomy (a novel species of genus g counts toward g, its family, ...), the call is the deepest
rank whose probability reaches that rank's threshold (`evaluate/calls.assign_calls`), each rank's threshold chosen
for `calibrate.target_precision` on out-of-fold outputs (`rank_thresholds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from idengine import layout as C
from idengine.evaluate.calibrate import ThresholdChoice, choose_threshold_for
from idengine.evaluate.calls import NOVEL, UNASSIGNED, assign_calls, rank_index
from idengine.reference.evidence import NOVEL_GENUS, NOVEL_SPECIES, SPECIES, Options

CHUNK = 2048
"""Queries whose calls are made at once (the taxon sums are dense per chunk)."""


@dataclass
class OptionSpace:
    """The engine's columns and the taxonomy of each (see the module docstring)."""

    species: np.ndarray
    genera: np.ndarray
    rank_table: pd.DataFrame
    """(S + G + 1) rows indexed 0.., one column per rank present in the reference (None where unknown)."""

    @classmethod
    def from_taxonomy(cls, taxonomy: pd.DataFrame) -> OptionSpace:
        """From one row per reference record (or species): `species` and the rank columns present."""
        ranks = [r for r in C.RANKS if r in taxonomy.columns]
        per_species = taxonomy.drop_duplicates(C.SPECIES).sort_values(C.SPECIES).reset_index(drop=True)
        genera = np.array([], dtype=object)
        genus_rows = pd.DataFrame(columns=ranks)
        if "genus" in ranks:
            known = per_species[per_species["genus"].notna() & (per_species["genus"].astype(str) != "")]
            genus_rows = known.drop_duplicates("genus").sort_values("genus")[ranks].reset_index(drop=True)
            genera = genus_rows["genus"].to_numpy(dtype=object)
        novel_genus = pd.DataFrame([{r: None for r in ranks}])
        table = pd.concat([per_species[ranks], genus_rows, novel_genus], ignore_index=True)
        return cls(per_species[C.SPECIES].to_numpy(dtype=object), genera, table.astype(object))

    @property
    def width(self) -> int:
        return len(self.species) + len(self.genera) + 1

    def names(self) -> list[str | None]:
        """Column names for `assign_calls`: species names, None for the novel columns."""
        return [*self.species, *([None] * (len(self.genera) + 1))]

    def columns(self, options: Options) -> np.ndarray:
        """The column of each option (-1 for a species or genus this space does not know)."""
        out = np.full(len(options.kind), -1, dtype=np.int64)
        sp = options.kind == SPECIES
        out[sp] = pd.Index(self.species).get_indexer(pd.Index(options.name[sp]))
        gen = options.kind == NOVEL_SPECIES
        at = pd.Index(self.genera).get_indexer(pd.Index(options.name[gen]))
        out[gen] = np.where(at >= 0, len(self.species) + at, -1)
        out[options.kind == NOVEL_GENUS] = self.width - 1
        return out

    def matrix(self, options: Options, probs: np.ndarray) -> sparse.csr_array:
        """(n_queries, width) sparse probabilities of the options (mass of unknown columns is dropped)."""
        col = self.columns(options)
        ok = col >= 0
        return sparse.csr_array((probs[ok], (options.query[ok], col[ok])), shape=(options.n_queries, self.width))

    def call_ranks(self) -> list[str]:
        """The ranks a call may fall back to, deepest first (genus, family, ...), then `novel`."""
        return [r for r in reversed(self.rank_table.columns)]


def engine_calls(space: OptionSpace, p: sparse.csr_array, thresholds: dict[str, float],
                 no_hit: np.ndarray | None = None) -> pd.DataFrame:
    """Calls (call, call_rank, call_prob) and the query-level probabilities the user sees: the top species and its
    probability, p_novel_species (not in the reference) and p_novel_genus, in query order.

    A query that aligned to nothing (`no_hit`) is `unassigned`: with no reference record behind it, the engine has
    no evidence of what it is, only the classifiers' guesses.
    """
    ranks = space.call_ranks()
    parts = [assign_calls(p[i:i + CHUNK], space.names(), space.rank_table, thresholds, ranks)
             for i in range(0, p.shape[0], CHUNK)]
    calls = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["call", "call_rank",
                                                                                   "call_prob"])
    if no_hit is not None and len(calls):
        calls.loc[no_hit, ["call", "call_rank"]] = UNASSIGNED
    n_species = len(space.species)
    species_part = p[:, :n_species]
    best = np.asarray(species_part.argmax(axis=1)).ravel() if p.shape[0] else np.zeros(0, int)
    calls["species"] = space.species[best] if n_species else None
    calls["species_prob"] = np.asarray(species_part[np.arange(p.shape[0]), best]).ravel() if p.shape[0] else []
    calls["p_novel_species"] = np.asarray(p[:, n_species:].sum(axis=1)).ravel()
    calls["p_novel_genus"] = np.asarray(p[:, [space.width - 1]].sum(axis=1)).ravel()
    return calls


def best_per_rank(space: OptionSpace, p: sparse.csr_array, rank: str) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the most probable taxon at `rank` (species, a rank, or `novel`) and its summed probability."""
    if rank == C.SPECIES:
        n = len(space.species)
        best = np.asarray(p[:, :n].argmax(axis=1)).ravel()
        return space.species[best], np.asarray(p[:, :n][np.arange(p.shape[0]), best]).ravel()
    if rank == NOVEL:
        mass = np.asarray(p[:, len(space.species):].sum(axis=1)).ravel()
        return np.full(p.shape[0], NOVEL, dtype=object), np.minimum(mass, 1.0)
    names, member = rank_index(space.rank_table, rank, space.width)
    sums = (p @ member).toarray()
    best = sums.argmax(axis=1)
    return names[best], np.minimum(sums[np.arange(p.shape[0]), best], 1.0)


def rank_thresholds(space: OptionSpace, p: sparse.csr_array, truth: pd.DataFrame, target: float
                    ) -> dict[str, ThresholdChoice]:
    """Each rank's lowest threshold whose calls at that rank reach `target` precision on these (out-of-fold) queries.

    The ranks are taken as `engine_calls` takes them, deepest first, and each rank's threshold is chosen on the
    queries that reach it (not called at a deeper rank): so the calls a user sees at a rank, genus say, are right at
    the target rate, not only all queries' best genera pooled (most of those are species calls, nearly always right).
    A rank at which the whole reference is one taxon gets a threshold but calls nothing (`assign_calls` skips it).

    Args:
        truth: per query, `species` (None for a species not in the reference), each rank's true taxon, and
            `is_novel` (the species is not in the reference).
    """
    out, pending = {}, np.ones(p.shape[0], dtype=bool)
    for rank in [C.SPECIES, *space.call_ranks(), NOVEL]:
        taxon, prob = best_per_rank(space, p, rank)
        right = truth["is_novel"].to_numpy(dtype=bool) if rank == NOVEL else \
            (taxon == truth[rank].to_numpy(dtype=object)) & truth[rank].notna().to_numpy()
        out[rank] = choose_threshold_for(prob[pending], right[pending], target, f"rank {rank}")
        if rank in (C.SPECIES, NOVEL) or rank_index(space.rank_table, rank, space.width)[0].size > 1:
            pending &= ~(prob >= out[rank].threshold)
    return out
