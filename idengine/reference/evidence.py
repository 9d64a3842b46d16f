"""Step 10b, evidence: what each query's candidate answers have for them, as one feature row per (query, option).

The options of a query are its candidate species (the species of its aligned hits, best first, and the classifier's
and the k-mer model's most probable species), one "a species not in the reference, of genus g" per candidate genus,
and one "a genus not in the reference". Every option gets the same feature vector layout (FEATURES), zeros where a
block does not apply, so one scorer (`decision.py`) ranks them all:

- species: best and second-best identity to the species, the margins to the best other species and to the best
  other genus, coverage, how many reference records the species has and how many of the hits are its, the barcode
  gap (the best hit's identity minus that record's identity to its nearest other species, `neighbours.py`), the
  classifier's and the k-mer model's log-probability (with a flag where the species is not one of their classes);
- novel species of genus g: the best identity to the genus, its margin to other genera, coverage, the species the
  genus has, the classifiers' summed probability of the genus;
- novel genus: the best identity to anything, its coverage, the classifiers' top probability;
- and, on every option, the query's own context (best identity, distinct species among the hits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

SPECIES, NOVEL_SPECIES, NOVEL_GENUS = 0, 1, 2
"""Option kinds: a reference species, a species not in the reference (of a named genus), a genus not in it."""
FEATURES = (
    "is_species", "is_novel_species", "is_novel_genus",
    "sp_has_hit", "sp_div", "sp_log_div", "sp_div2", "sp_margin_species", "sp_margin_genus", "sp_coverage",
    "sp_log_records", "sp_cls_in", "sp_cls_logp", "sp_kmer_in", "sp_kmer_logp", "sp_is_top",
    "sp_hit_share", "sp_gap", "sp_nn_div",
    "g_has_hit", "g_div", "g_log_div", "g_margin", "g_coverage", "g_log_species", "g_cls_logp", "g_kmer_logp",
    "g_is_top",
    "n_div", "n_log_div", "n_coverage", "n_cls_logmax", "n_kmer_logmax",
    "ctx_div", "ctx_log_div", "ctx_log_species", "ctx_has_hit",
)
LOG_FLOOR = 1e-6
"""Probabilities below this are read as this before the log: a classifier's 'impossible' is not infinitely so."""
DIV_FLOOR = 2e-3
"""Divergence (1 - identity) offset inside the log: one mismatch in 500 bp already counts."""
_F = {name: i for i, name in enumerate(FEATURES)}


@dataclass
class ReferenceTaxa:
    """What the evidence needs to know of the reference: species and genus of every row, and their sizes."""

    row_species: np.ndarray
    """(n_ref,) species name of each reference row."""
    row_genus: np.ndarray
    """(n_ref,) genus name of each row, "" where unknown (or no genus column)."""
    species_genus: dict[str, str]
    """species -> its genus ("" unknown)."""
    species_records: pd.Series
    """records per species in the reference (all rows)."""
    genus_species: pd.Series
    """distinct species per genus in the reference."""

    @classmethod
    def from_rows(cls, species: np.ndarray, genus: np.ndarray | None) -> ReferenceTaxa:
        species = np.asarray(species, dtype=object)
        genus = np.full(len(species), "", dtype=object) if genus is None else \
            np.asarray(pd.Series(genus, dtype=object).fillna(""), dtype=object)
        frame = pd.DataFrame({"s": species, "g": genus})
        mapping = frame.drop_duplicates("s").set_index("s")["g"].to_dict()
        per_genus = frame[frame["g"] != ""].drop_duplicates("s")["g"].value_counts()
        return cls(species, genus, mapping, frame["s"].value_counts(), per_genus)


@dataclass
class ClassifierView:
    """One classifier's probabilities over its label space, as evidence: (n_queries, C) and the C species names.

    `blind`: per query, a species the classifier is to know nothing of (None: none). Its column is dropped and the
    row renormalised (the softmax of the same logits without that class), and it counts as not one of the classes.
    """

    probs: np.ndarray
    species: np.ndarray
    blind: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.blind is None:
            return
        col = self.column_of(np.asarray(self.blind, dtype=object))
        rows = np.flatnonzero(col >= 0)
        if len(rows):
            self.probs = np.array(self.probs, dtype=np.float64, copy=True)
            self.probs[rows, col[rows]] = 0.0
            self.probs[rows] /= np.maximum(self.probs[rows].sum(axis=1, keepdims=True), 1e-300)

    def column_of(self, names: np.ndarray) -> np.ndarray:
        """Column of each species name in probs, -1 where the species is not one of the classifier's classes."""
        index = pd.Index(self.species)
        return index.get_indexer(pd.Index(names))

    def genus_probs(self, genus_of: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """(n_queries, G) summed probability per genus of the label space, and the G genus names."""
        genus = np.array([genus_of.get(s, "") for s in self.species], dtype=object)
        codes, names = pd.factorize(genus)
        matrix = sparse.csr_array((np.ones(len(codes)), (np.arange(len(codes)), codes)),
                                  shape=(len(codes), len(names)))
        return np.asarray(self.probs @ matrix), np.asarray(names, dtype=object)


@dataclass
class Options:
    """The options of a batch of queries, long format: one row per (query, option), queries in order."""

    query: np.ndarray
    kind: np.ndarray
    name: np.ndarray
    """Species name (kind SPECIES), genus name (NOVEL_SPECIES), or "" (NOVEL_GENUS)."""
    genus: np.ndarray
    """Genus of the option ("" unknown; the genus itself for NOVEL_SPECIES)."""
    features: np.ndarray
    """(rows, len(FEATURES)) float32."""
    n_queries: int

    def take(self, rows: np.ndarray) -> Options:
        return Options(self.query[rows], self.kind[rows], self.name[rows], self.genus[rows], self.features[rows],
                       self.n_queries)


def hit_table(ref: np.ndarray, identity: np.ndarray, coverage: np.ndarray, taxa: ReferenceTaxa) -> pd.DataFrame:
    """The non-empty hits of a batch as rows: query, ref, identity, coverage, species, genus (best first per query)."""
    q, slot = np.nonzero(np.asarray(ref) >= 0)
    rows = np.asarray(ref)[q, slot]
    return pd.DataFrame({"query": q, "slot": slot, "ref": rows, "identity": np.asarray(identity)[q, slot],
                         "coverage": np.asarray(coverage)[q, slot], "species": taxa.row_species[rows],
                         "genus": taxa.row_genus[rows]})


def _best_two(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per (query, key): best identity and its coverage, second-best identity, hit count (best first)."""
    ordered = table.sort_values(["query", "identity", "slot"], ascending=[True, False, True])
    grouped = ordered.groupby(["query", key], sort=False)
    out = grouped.agg(id1=("identity", "first"), cov1=("coverage", "first"), ref1=("ref", "first"),
                      n_hits=("identity", "size"))
    second = ordered[grouped.cumcount().to_numpy() == 1].set_index(["query", key])["identity"]
    out["id2"] = second.reindex(out.index).to_numpy()
    return out.reset_index()


def _top_two_per_query(best: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per query: the best and second-best `key` (species or genus) by identity, and their identities."""
    ranked = best.sort_values(["query", "id1"], ascending=[True, False], kind="stable")
    grouped = ranked.groupby("query", sort=False)
    top = grouped.agg(top=(key, "first"), top_id=("id1", "first"))
    second = ranked[grouped.cumcount().to_numpy() == 1].set_index("query")["id1"]
    top["second_id"] = second.reindex(top.index).fillna(0.0).to_numpy()
    return top


def _margin(ids: np.ndarray, names: np.ndarray, top: pd.Series, top_id: pd.Series, second: pd.Series,
            queries: np.ndarray) -> np.ndarray:
    """Identity minus the best identity of any OTHER species/genus of the same query (0 when there is none)."""
    other = np.where(names == top.reindex(queries).to_numpy(), second.reindex(queries).to_numpy(),
                     top_id.reindex(queries).to_numpy())
    return ids - np.nan_to_num(other.astype(float), nan=0.0)


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, LOG_FLOOR))


def _div(identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = 1.0 - np.nan_to_num(identity.astype(float), nan=0.0)
    return d, np.log(d + DIV_FLOOR)


def _species_rows(hits: pd.DataFrame, n_queries: int, views: list[ClassifierView | None], max_species: int,
                  classifier_top: int) -> pd.DataFrame:
    """Candidate species per query: the best `max_species` species of the hits, then each classifier's top ones."""
    best = _best_two(hits, "species")
    best = best[best.groupby("query").cumcount() < max_species] if len(best) else best
    frames = [best.assign(has_hit=1.0)]
    for view in views:
        if view is None or classifier_top <= 0:
            continue
        k = min(classifier_top, view.probs.shape[1])
        top = np.argsort(-view.probs, axis=1, kind="stable")[:, :k]
        frames.append(pd.DataFrame({"query": np.repeat(np.arange(n_queries), k),
                                    "species": view.species[top.ravel()]}))
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(["query", "species"], keep="first")
    rows["has_hit"] = rows["has_hit"].fillna(0.0)
    return rows.sort_values(["query", "has_hit"], ascending=[True, False], kind="stable").reset_index(drop=True)


def _classifier_columns(rows: pd.DataFrame, view: ClassifierView | None, prefix: str, out: np.ndarray) -> None:
    """Write `<prefix>_in` and `<prefix>_logp` of species rows from one classifier's probabilities."""
    if view is None:
        return
    col = view.column_of(rows["species"].to_numpy())
    inside = col >= 0
    if view.blind is not None:
        inside &= rows["species"].to_numpy() != np.asarray(view.blind, dtype=object)[rows["query"].to_numpy()]
    out[:, _F[f"{prefix}_in"]] = inside
    logp = np.zeros(len(rows))
    logp[inside] = _log(view.probs[rows["query"].to_numpy()[inside], col[inside]])
    out[:, _F[f"{prefix}_logp"]] = logp



def _species_features(rows: pd.DataFrame, hits: pd.DataFrame, views: tuple, visible, nearest,
                      out: np.ndarray) -> None:
    """Fill the species block of the species rows (hit statistics, margins, sizes, gap, classifier evidence)."""
    q = rows["query"].to_numpy()
    ids = rows["id1"].fillna(0.0).to_numpy(dtype=float)
    slots = max(int(hits["slot"].max()) + 1, 1) if len(hits) else 1
    out[:, _F["sp_hit_share"]] = rows["n_hits"].fillna(0).to_numpy(dtype=float) / slots
    if nearest is not None:
        other = nearest(q, rows["ref1"].fillna(-1).to_numpy(dtype=np.int64))
        has = rows["has_hit"].to_numpy() > 0
        out[:, _F["sp_gap"]] = np.where(has, 10 * (ids - other), 0.0)
        out[:, _F["sp_nn_div"]] = np.where(has, 1.0 - other, 0.0)
    out[:, _F["is_species"]] = 1.0
    out[:, _F["sp_has_hit"]] = rows["has_hit"].to_numpy()
    out[:, _F["sp_div"]], out[:, _F["sp_log_div"]] = _div(ids)
    out[:, _F["sp_div2"]] = 1.0 - rows["id2"].fillna(0.0).to_numpy(dtype=float)
    out[:, _F["sp_coverage"]] = rows["cov1"].fillna(0.0).to_numpy(dtype=float)
    if len(hits):
        by_species = _top_two_per_query(_best_two(hits, "species"), "species")
        by_genus = _top_two_per_query(_best_two(hits[hits["genus"] != ""], "genus"), "genus")
        out[:, _F["sp_margin_species"]] = 10 * _margin(ids, rows["species"].to_numpy(), by_species["top"],
                                                       by_species["top_id"], by_species["second_id"], q)
        out[:, _F["sp_is_top"]] = rows["species"].to_numpy() == by_species["top"].reindex(q).to_numpy()
        genus = rows["genus"].to_numpy()
        margin = _margin(ids, genus, by_genus["top"], by_genus["top_id"], by_genus["second_id"], q)
        out[:, _F["sp_margin_genus"]] = 10 * np.where(genus == "", out[:, _F["sp_margin_species"]] / 10, margin)
    out[:, _F["sp_log_records"]] = np.log1p(visible(q, rows["species"].to_numpy()))
    _classifier_columns(rows, views[0], "sp_cls", out)
    _classifier_columns(rows, views[1], "sp_kmer", out)


def _genus_rows(species_rows: pd.DataFrame, hits: pd.DataFrame, taxa: ReferenceTaxa, views: tuple) -> pd.DataFrame:
    """One "novel species of genus g" option per known genus among a query's candidate species, with its features."""
    rows = species_rows.loc[species_rows["genus"] != "", ["query", "genus"]].drop_duplicates()
    if rows.empty:  # no genus known (or no genus column at all): no "novel species of genus g" options
        return rows.assign(features=[])
    known = hits[hits["genus"] != ""]
    best = _best_two(known, "genus") if len(known) else pd.DataFrame(columns=["query", "genus", "id1", "cov1"])
    rows = rows.merge(best[["query", "genus", "id1", "cov1"]], on=["query", "genus"], how="left")
    top = _top_two_per_query(best, "genus") if len(best) else None
    ids = rows["id1"].fillna(0.0).to_numpy(dtype=float)
    feats = np.zeros((len(rows), len(FEATURES)), dtype=np.float32)
    feats[:, _F["is_novel_species"]] = 1.0
    feats[:, _F["g_has_hit"]] = rows["id1"].notna().to_numpy()
    feats[:, _F["g_div"]], feats[:, _F["g_log_div"]] = _div(ids)
    feats[:, _F["g_coverage"]] = rows["cov1"].fillna(0.0).to_numpy(dtype=float)
    if top is not None:
        q, g = rows["query"].to_numpy(), rows["genus"].to_numpy()
        feats[:, _F["g_margin"]] = 10 * _margin(ids, g, top["top"], top["top_id"], top["second_id"], q)
        feats[:, _F["g_is_top"]] = g == top["top"].reindex(q).to_numpy()
    feats[:, _F["g_log_species"]] = np.log1p(taxa.genus_species.reindex(rows["genus"]).fillna(0).to_numpy())
    for view, name in zip(views, ("g_cls_logp", "g_kmer_logp")):
        if view is not None:
            probs, genera = view.genus_probs(taxa.species_genus)
            col = pd.Index(genera).get_indexer(pd.Index(rows["genus"]))
            feats[:, _F[name]] = np.where(col >= 0, _log(probs[rows["query"].to_numpy(), np.maximum(col, 0)]),
                                          np.log(LOG_FLOOR))
    rows["features"] = list(feats)
    return rows


def _context(hits: pd.DataFrame, n_queries: int) -> np.ndarray:
    """(n_queries, 4) query-level context: divergence and log divergence of the best hit, species hit, any hit."""
    top = np.zeros(n_queries)
    n_species = np.zeros(n_queries)
    if len(hits):
        grouped = hits.groupby("query")
        best = grouped["identity"].max()
        top[best.index.to_numpy()] = best.to_numpy()
        counts = grouped["species"].nunique()
        n_species[counts.index.to_numpy()] = counts.to_numpy()
    d, log_d = _div(top)
    return np.stack([d, log_d, np.log1p(n_species), (top > 0).astype(float)], axis=1)


def _novel_genus_features(context: np.ndarray, hits: pd.DataFrame, views: tuple) -> np.ndarray:
    """The one "genus not in the reference" option per query."""
    n = context.shape[0]
    feats = np.zeros((n, len(FEATURES)), dtype=np.float32)
    feats[:, _F["is_novel_genus"]] = 1.0
    feats[:, _F["n_div"]], feats[:, _F["n_log_div"]] = context[:, 0], context[:, 1]
    if len(hits):
        first = hits.sort_values(["query", "identity", "slot"], ascending=[True, False, True]).drop_duplicates(
            "query")
        feats[first["query"].to_numpy(), _F["n_coverage"]] = first["coverage"].to_numpy()
    for view, name in zip(views, ("n_cls_logmax", "n_kmer_logmax")):
        if view is not None:
            feats[:, _F[name]] = _log(view.probs.max(axis=1))
    return feats


def build_options(ref: np.ndarray, identity: np.ndarray, coverage: np.ndarray, taxa: ReferenceTaxa,
                  classifier: ClassifierView | None = None, kmer: ClassifierView | None = None,
                  max_species: int = 8, classifier_top: int = 3, visible=None, nearest=None) -> Options:
    """Every option of every query of a batch, with its features.

    Args:
        ref, identity, coverage: (n_queries, n) hits of the reference index, best first (ref -1: empty slot).
        taxa: the reference's species and genera (`ReferenceTaxa.from_rows` over the index's rows).
        classifier, kmer: the classifier's and the k-mer model's probabilities (None: that evidence is absent).
        max_species, classifier_top: candidate species from the hits, and from each classifier's top.
        visible: (query rows, species) -> reference records of the species the query could see (the default is
            every record: what `idengine predict` sees; simulations that hide records pass their own).
        nearest: (query rows, hit records) -> each record's identity to its nearest other-species record the
            query may see (`neighbours.nearest_other`); None leaves the gap features at 0.

    Returns:
        Options with one row per (query, option), the queries' rows in order, every query with at least the
        novel-genus option.
    """
    n = len(ref)
    views = (classifier, kmer)
    hits = hit_table(ref, identity, coverage, taxa)
    visible = visible or (lambda q, species: taxa.species_records.reindex(species).fillna(0).to_numpy())
    species_rows = _species_rows(hits, n, [classifier, kmer], max_species, classifier_top)
    species_rows["genus"] = species_rows["species"].map(taxa.species_genus).fillna("")
    feats = np.zeros((len(species_rows), len(FEATURES)), dtype=np.float32)
    _species_features(species_rows, hits, views, visible, nearest, feats)
    genus_rows = _genus_rows(species_rows, hits, taxa, views)
    context = _context(hits, n)
    parts = [(species_rows["query"].to_numpy(), SPECIES, species_rows["species"].to_numpy(),
              species_rows["genus"].to_numpy(), feats),
             (genus_rows["query"].to_numpy(), NOVEL_SPECIES, genus_rows["genus"].to_numpy(),
              genus_rows["genus"].to_numpy(), np.stack(genus_rows["features"]) if len(genus_rows) else
              np.zeros((0, len(FEATURES)), np.float32)),
             (np.arange(n), NOVEL_GENUS, np.full(n, "", dtype=object), np.full(n, "", dtype=object),
              _novel_genus_features(context, hits, views))]
    query = np.concatenate([p[0] for p in parts]).astype(np.int64)
    order = np.argsort(query, kind="stable")
    features = np.concatenate([p[4] for p in parts]).astype(np.float32)
    features[:, _F["ctx_div"]:] = context[query]
    kind = np.concatenate([np.full(len(p[0]), p[1], dtype=np.int8) for p in parts])
    names = np.concatenate([np.asarray(p[2], dtype=object) for p in parts])
    genus = np.concatenate([np.asarray(p[3], dtype=object) for p in parts])
    return Options(query[order], kind[order], names[order], genus[order], features[order], n)
