"""Step 10d, scenarios: out-of-fold queries, with what each may not see, for fitting and judging the decision model.

The decision model must learn what "this species is not in the reference" looks like from data that leaks nothing.
Every query here is a real record of the reference, asked against the reference with something hidden:
- `known`: a kept record of cv fold k, with fold k's kept records hidden (its classifier scores are fold k's
  out-of-fold ones);
- `known_rare`: a record of a rare species (never a class of the classifier) with its own identical-sequence group
  hidden, so the species' other records remain: can the engine name a species the classifier has never seen?
- `novel_species`: a rare species' record with its whole species hidden: the answer is "a species not in the
  reference, of genus g" (or "a genus not in the reference" when no other species of g remains);
- `novel_genus`: the same with its whole genus hidden (leave-genus-out), for a share of the rare species;
- `thinned`: a kept record of fold k whose species is thinned to ONE record of another fold, with the species taken
  out of the classifiers' probabilities (its column dropped, the rest renormalised: the softmax of a model without
  that class): a species the reference barely holds and the classifiers never learned, as a rare one is, from the
  common species. These queries only teach the scorer (`judged` is false): they are never scored, and neither the
  temperature nor the thresholds are fitted on them.
Rare species are dealt to the cv folds (seeded), and a rare species' queries belong to its fold. The decision model
judged on fold k is fitted only on the other folds' queries, so no species scored in an open-set evaluation was used
to fit the model that scores it, and rare records are scored by the classifier of their own fold, which never had
their species as a class.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from idengine import layout as C

KNOWN, KNOWN_RARE, NOVEL_SPECIES, NOVEL_GENUS = "known", "known_rare", "novel_species", "novel_genus"
THINNED = "thinned"
KINDS = (KNOWN, KNOWN_RARE, NOVEL_SPECIES, NOVEL_GENUS, THINNED)
COLUMNS = ("query_id", "record", "scenario", "fold", "truth_species", "truth_genus", "answer_kind", "answer",
           "exclude_fold", "exclude_species", "exclude_genus", "exclude_group", "keep_record")
"""One row per query. `answer_kind`/`answer`: the option that is right (evidence.SPECIES + the species,
NOVEL_SPECIES + the genus, or NOVEL_GENUS + "")."""


def deal_rare_species(unknown: pd.DataFrame, folds: list[str], seed: int) -> pd.Series:
    """The cv fold of each rare species (seeded, round robin over a shuffled species list): species -> fold."""
    species = np.array(sorted(unknown[C.SPECIES].dropna().unique()), dtype=object)
    order = np.random.default_rng(seed).permutation(len(species))
    return pd.Series([folds[i % len(folds)] for i in range(len(species))], index=species[order], dtype=object)


def _genus(table: pd.DataFrame) -> pd.Series:
    return table["genus"].fillna("").astype(str) if "genus" in table.columns else pd.Series("", index=table.index)


def _rows(table: pd.DataFrame, scenario: str, fold: pd.Series, **exclude) -> pd.DataFrame:
    genus = _genus(table)
    out = pd.DataFrame({
        "record": table[C.ID].to_numpy(), "scenario": scenario, "fold": fold.to_numpy(),
        "truth_species": table[C.SPECIES].to_numpy(), "truth_genus": genus.to_numpy(),
        "exclude_fold": fold.to_numpy()})
    for level in ("species", "genus", "group"):
        out[f"exclude_{level}"] = exclude.get(level, pd.Series([None] * len(table))).to_numpy()
    out["keep_record"] = exclude.get("keep", pd.Series([None] * len(table))).to_numpy()
    return out


def judged(scenarios: pd.DataFrame) -> np.ndarray:
    """The queries that are scored and that fit temperatures and thresholds: all but the `thinned` ones."""
    return (scenarios["scenario"] != THINNED).to_numpy()


def thinned_rows(records: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """`thinned` queries (module docstring) for a seeded `share` of the kept records whose species has a record in
    another fold: each keeps one such record (seeded), with fold and species hidden."""
    rng = np.random.default_rng(seed + 2)
    picked = records[rng.random(len(records)) < share]
    by_species = records.groupby(C.SPECIES)
    keep = []
    for species, fold in zip(picked[C.SPECIES], picked[C.FOLD].astype(str)):
        rows = by_species.get_group(species)
        others = rows.loc[rows[C.FOLD].astype(str) != fold, C.ID].to_numpy()
        keep.append(others[rng.integers(len(others))] if len(others) else None)
    keep = pd.Series(keep, index=picked.index, dtype=object)
    picked, keep = picked[keep.notna()], keep[keep.notna()]
    return _rows(picked, THINNED, picked[C.FOLD].astype(str), species=picked[C.SPECIES], keep=keep)


def make_scenarios(records: pd.DataFrame, unknown: pd.DataFrame, novel_genus_share: float, seed: int,
                   rare_balance: float = 0.0) -> pd.DataFrame:
    """Every out-of-fold query of a prepared reference (see the module docstring), with its exclusions.

    Args:
        records: the kept non-test records (`fold` "0".."K-1", `group`, `species`, ranks).
        unknown: the set-aside rare species' records (`group`, `species`, ranks).
        novel_genus_share: share of the rare species (with a known genus) simulated as a novel genus.
        seed: deals the rare species to folds and picks the novel genera (and the thinned queries).
        rare_balance: `known_rare` + `thinned` queries per novel (novel-species and novel-genus) query: kept
            records (a seeded share, at most all) become `thinned` queries to make up what the rare species do not
            give (0: none).

    Returns:
        The scenarios table (COLUMNS, `answer*` not yet filled: see `fill_answers`).
    """
    folds = sorted(records[C.FOLD].unique(), key=int)
    parts = [_rows(records, KNOWN, records[C.FOLD].astype(str))]
    if len(unknown):
        rare_fold = unknown[C.SPECIES].map(deal_rare_species(unknown, folds, seed)).astype(object)
        genus = _genus(unknown)
        rng = np.random.default_rng(seed + 1)
        species = np.array(sorted(unknown.loc[genus != "", C.SPECIES].unique()), dtype=object)
        hidden_genus = set(species[rng.random(len(species)) < novel_genus_share])
        as_genus = unknown[C.SPECIES].isin(hidden_genus).to_numpy()
        groups_per_species = unknown.groupby(C.SPECIES)[C.GROUP].transform("nunique")
        multi = (groups_per_species > 1).to_numpy()
        parts.append(_rows(unknown[multi], KNOWN_RARE, rare_fold[multi], group=unknown.loc[multi, C.GROUP]))
        parts.append(_rows(unknown[~as_genus], NOVEL_SPECIES, rare_fold[~as_genus],
                           species=unknown.loc[~as_genus, C.SPECIES]))
        parts.append(_rows(unknown[as_genus], NOVEL_GENUS, rare_fold[as_genus], genus=genus[as_genus]))
    rare = len(parts[1]) if len(parts) > 1 else 0
    novel = sum(len(part) for part in parts[2:])
    thin_share = min(1.0, max(0.0, rare_balance * novel - rare) / max(len(records), 1))
    if thin_share > 0:
        parts.append(thinned_rows(records, thin_share, seed))
    table = pd.concat(parts, ignore_index=True)
    table.insert(0, "query_id", np.arange(len(table)))
    table["answer_kind"], table["answer"] = -1, ""
    return table[list(COLUMNS)]


class Visibility:
    """How many records of a species (and species of a genus) a query could see, given what it hides."""

    def __init__(self, reference: pd.DataFrame) -> None:
        ref = reference.assign(_genus=_genus(reference), _fold=reference.get(C.FOLD, pd.Series(
            [None] * len(reference), index=reference.index)).astype(object))
        self.total = ref[C.SPECIES].value_counts()
        self.by_fold = ref.groupby([C.SPECIES, "_fold"], dropna=False).size()
        self.group_size = ref.groupby(C.GROUP).size() if C.GROUP in ref else pd.Series(dtype=int)
        self.group_species = ref.drop_duplicates(C.GROUP).set_index(C.GROUP)[C.SPECIES] if C.GROUP in ref \
            else pd.Series(dtype=object)
        self.genus_of = ref.drop_duplicates(C.SPECIES).set_index(C.SPECIES)["_genus"]
        self.fold_species = ref.groupby(["_genus", "_fold"], dropna=False)[C.SPECIES].unique()
        self.rows = {"fold": ref["_fold"].to_numpy(dtype=object), "species": ref[C.SPECIES].to_numpy(dtype=object),
                     "id": ref[C.ID].to_numpy(dtype=object),
                     "genus": ref["_genus"].to_numpy(dtype=object),
                     "group": ref[C.GROUP].to_numpy(dtype=object) if C.GROUP in ref else
                     np.full(len(ref), None, dtype=object)}

    def rows_visible(self, scenarios: pd.DataFrame, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(len(q), M) bool: may scenario query q[i] see reference rows rows[i, :]? (what it hides, it cannot)."""
        part = scenarios.iloc[q]
        ok = np.ones(rows.shape, dtype=bool)
        for level in ("fold", "species", "genus", "group"):
            hidden = part[f"exclude_{level}"].to_numpy(dtype=object)[:, None]
            ok &= ~((self.rows[level][rows] == hidden) & pd.notna(hidden))
        keep = part["keep_record"].to_numpy(dtype=object)[:, None]
        return ok | ((self.rows["id"][rows] == keep) & pd.notna(keep))

    def records(self, scenarios: pd.DataFrame, q: np.ndarray, species: np.ndarray) -> np.ndarray:
        """Visible records of `species` for the scenario rows `q` (the evidence's `visible` callback)."""
        rows = scenarios.iloc[q]
        total = self.total.reindex(species).fillna(0).to_numpy(dtype=float)
        in_fold = self.by_fold.reindex(list(zip(species, rows["exclude_fold"]))).fillna(0).to_numpy(dtype=float)
        group = rows["exclude_group"].to_numpy()
        same = self.group_species.reindex(group).to_numpy() == species
        in_group = np.where(same, self.group_size.reindex(group).fillna(0).to_numpy(dtype=float), 0.0)
        hidden = (rows["exclude_species"].to_numpy() == species) | \
            ((rows["exclude_genus"].to_numpy() == self.genus_of.reindex(species).to_numpy()) &
             (rows["exclude_genus"].notna().to_numpy()))
        kept = np.where(rows["keep_record"].notna().to_numpy(), 1.0, 0.0)
        return np.where(hidden, kept, np.maximum(total - in_fold - in_group, 0.0))

    def genus_keeps_species(self, genus: str, fold: str, species: str) -> bool:
        """Does genus g keep a species other than `species` outside fold `fold` (any fold for rare ones)?"""
        if not genus:
            return False
        folds = self.fold_species.loc[genus] if genus in self.fold_species.index.get_level_values(0) else None
        if folds is None:
            return False
        others = {s for f, names in folds.items() if f != fold for s in names if s != species}
        return bool(others)


def fill_answers(scenarios: pd.DataFrame, visibility: Visibility) -> pd.DataFrame:
    """The right option of each query: its species, "novel species of its genus" when the genus keeps another
    visible species, else "novel genus" (also when the genus is unknown)."""
    from idengine.reference.evidence import NOVEL_GENUS as GENUS_OPTION, NOVEL_SPECIES as SPECIES_OPTION, SPECIES

    out = scenarios.copy()
    species_answer = out["scenario"].isin([KNOWN, KNOWN_RARE, THINNED]).to_numpy()
    out.loc[species_answer, "answer_kind"] = SPECIES
    out.loc[species_answer, "answer"] = out.loc[species_answer, "truth_species"]
    novel = out["scenario"] == NOVEL_SPECIES
    keeps = np.array([visibility.genus_keeps_species(g, f, s) for g, f, s in
                      out.loc[novel, ["truth_genus", "fold", "truth_species"]].itertuples(index=False)], dtype=bool)
    rows = np.flatnonzero(novel.to_numpy())
    out.loc[out.index[rows[keeps]], "answer_kind"] = SPECIES_OPTION
    out.loc[out.index[rows[keeps]], "answer"] = out.loc[out.index[rows[keeps]], "truth_genus"]
    genus_answer = (out["scenario"] == NOVEL_GENUS).to_numpy().copy()
    genus_answer[rows[~keeps]] = True
    out.loc[genus_answer, "answer_kind"], out.loc[genus_answer, "answer"] = GENUS_OPTION, ""
    return out
