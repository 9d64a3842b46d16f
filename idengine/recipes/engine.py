"""The engine's part of `idengine cv`: out-of-fold evidence, nested decision models, and what the calls are worth.

1. The reference of the cv: every kept non-test record (with its fold) and every record of the set-aside rare
   species, in one reference index (`reference/index.py`).
2. The scenarios (`reference/scenarios.py`): known-species queries of each fold, and the rare species' records as
   known-rare, novel-species and novel-genus queries, each with what it must not see; and `thinned` known queries
   (their species cut to one record, the classifiers blind to it), which only fit the scorer.
3. The evidence of every query: its hits (searched with its exclusions), the classifier's calibrated out-of-fold
   probabilities, the k-mer model's (fitted per fold), as options (`reference/evidence.py`).
4. For each fold k: the decision model fitted on the other folds' queries scores fold k's; its temperature and its
   thresholds come from the other folds' outputs too (as `idengine train` fits them on all folds' outputs): nothing
   about fold k is used to judge fold k.
5. Metrics per fold (closed-set, open-world, the index alone), and the tables `idengine train` fits the final
   decision model from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from idengine import layout as C
from idengine.config import Config
from idengine.data.labels import LabelSpace
from idengine.evaluate.calibrate import Calibrator, fit_calibrator
from idengine.evaluate.metrics import softmax, summarise_folds
from idengine.evaluate.oof import FoldResult
from idengine.models.kmer import fit_kmer_model
from idengine.reference import assess
from idengine.reference.decision import fit_decision, fit_score_temperature, segment_softmax
from idengine.reference.evidence import ClassifierView, Options, ReferenceTaxa, build_options
from idengine.reference.index import Exclusions, Hits, ReferenceIndex, build_index, search
from idengine.reference.neighbours import Neighbours, nearest_other, reference_neighbours
from idengine.reference.scenarios import THINNED, Visibility, deal_rare_species, fill_answers, judged, \
    make_scenarios
from idengine.reference.space import OptionSpace, engine_calls, rank_thresholds

log = logging.getLogger(__name__)

SEARCH_CHUNK = 1024
"""Queries per search task (Ray tasks in parallel when Ray is running)."""
ENGINE_DIR = "engine"
SCENARIOS_FILE, OPTIONS_FILE = "scenarios.parquet", "options.parquet"


@dataclass
class EngineRun:
    """What the engine's cv step produced: per-query outcomes, the options with out-of-fold scores, metrics."""

    scenarios: pd.DataFrame
    options: Options
    oof_scores: np.ndarray
    metrics: dict[str, Any]
    neighbours: Neighbours

    def write(self, cv_dir) -> None:
        """engine/{scenarios,options}.parquet and the cv reference's neighbours into a (staging) cv directory."""
        out = cv_dir / ENGINE_DIR
        out.mkdir()
        self.neighbours.save(out)
        self.scenarios.to_parquet(out / SCENARIOS_FILE, index=False)
        o = self.options
        features = pa.FixedSizeListArray.from_arrays(pa.array(o.features.ravel()), o.features.shape[1])
        pq.write_table(pa.table({"query": o.query, "kind": o.kind, "name": o.name.astype(str),
                                 "genus": o.genus.astype(str), "features": features, "oof_score": self.oof_scores}),
                       out / OPTIONS_FILE)


def read_engine(cv_dir) -> tuple[pd.DataFrame, Options, np.ndarray]:
    """The scenarios, the options and their out-of-fold scores a cv run's engine step wrote."""
    scenarios = pd.read_parquet(cv_dir / ENGINE_DIR / SCENARIOS_FILE)
    table = pq.read_table(cv_dir / ENGINE_DIR / OPTIONS_FILE)
    column = table.column("features").combine_chunks()
    features = np.asarray(column.flatten(), dtype=np.float32).reshape(table.num_rows, column.type.list_size)
    options = Options(np.asarray(table.column("query")), np.asarray(table.column("kind")).astype(np.int8),
                      np.asarray(table.column("name").to_pylist(), dtype=object),
                      np.asarray(table.column("genus").to_pylist(), dtype=object), features, len(scenarios))
    return scenarios, options, np.asarray(table.column("oof_score"))


def reference_table(records: pd.DataFrame, unknown: pd.DataFrame) -> pd.DataFrame:
    """Kept non-test records (with their fold) and every rare-species record (no fold): the cv's reference."""
    kept = records[records[C.FOLD] != C.TEST_FOLD].drop(columns=[C.LABEL], errors="ignore")
    rare = unknown.assign(**{C.FOLD: None})
    return pd.concat([kept, rare], ignore_index=True)


def rare_folds(unknown: pd.DataFrame, folds: list[str], seed: int) -> pd.Series:
    """The cv fold each rare record belongs to (its species' fold), aligned with unknown."""
    return unknown[C.SPECIES].map(deal_rare_species(unknown, folds, seed))


def search_all(index: ReferenceIndex, queries: list[str], exclude: pd.DataFrame, config: Config) -> Hits:
    """Every query searched with its own exclusions, in chunks: Ray tasks in parallel when Ray runs here."""
    e = config.engine
    chunks = [slice(i, i + SEARCH_CHUNK) for i in range(0, len(queries), SEARCH_CHUNK)]

    def args(s: slice):
        part = exclude.iloc[s]
        keep = part["keep_record"].to_numpy() if "keep_record" in part else None
        return queries[s], Exclusions(part["exclude_fold"].to_numpy(), part["exclude_species"].to_numpy(),
                                      part["exclude_genus"].to_numpy(), part["exclude_group"].to_numpy(), keep)

    import ray

    if ray.is_initialized() and len(chunks) > 1:
        shared, task = ray.put(index), ray.remote(num_cpus=1)(_search_task)
        parts = ray.get([task.remote(shared, *args(s), e.candidates, e.min_overlap) for s in chunks])
    else:
        parts = [_search_task(index, *args(s), e.candidates, e.min_overlap) for s in chunks]
    return Hits(*[np.concatenate([getattr(p, f) for p in parts]) for f in
                  ("ref", "identity", "coverage", "overlap", "columns", "prefilter")])


def _search_task(index: ReferenceIndex, queries: list[str], exclude: Exclusions, n: int, min_overlap: float) -> Hits:
    return search(index, queries, n, min_overlap, exclude)


def record_probs(ids_by_query: np.ndarray, logits_by_id: dict[str, np.ndarray], calibrator: Calibrator | None
                 ) -> np.ndarray:
    """(n_queries, C) probabilities of each query's record from per-record logits (calibrated when given)."""
    logits = np.stack([logits_by_id[i] for i in ids_by_query]) if len(ids_by_query) else np.zeros((0, 0))
    return calibrator.apply(logits) if calibrator is not None else softmax(logits)


def kmer_logits(config: Config, records: pd.DataFrame, unknown: pd.DataFrame, rare_fold: pd.Series,
                labels: LabelSpace) -> dict[str, np.ndarray]:
    """The engine's k-mer model fitted per fold: logits of each fold's validation and rare records, by record id."""
    out = {}
    for fold in sorted(records.loc[records[C.FOLD] != C.TEST_FOLD, C.FOLD].unique(), key=int):
        train = records[(records[C.FOLD] != fold) & (records[C.FOLD] != C.TEST_FOLD)]
        model = fit_kmer_model(config.engine.kmer_model, train[C.SEQUENCE].to_numpy(), train[C.LABEL].to_numpy(),
                               labels.num_classes, k=config.model.kmer, seed=config.train.seed)
        queries = pd.concat([records[records[C.FOLD] == fold], unknown[rare_fold.to_numpy() == fold]])
        out.update(zip(queries[C.ID], model.logits(queries[C.SEQUENCE].to_numpy())))
    return out


def neighbours_of(index: ReferenceIndex, config: Config) -> Neighbours:
    """Every reference record's nearest other-species records (each searched with its own species hidden)."""
    def run(sequences: list[str], species: np.ndarray) -> Hits:
        hide = pd.DataFrame({"exclude_fold": None, "exclude_species": species, "exclude_genus": None,
                             "exclude_group": None}, index=range(len(species)))
        return search_all(index, sequences, hide, config)

    return reference_neighbours(index.species, list(index.sequences), run)


def query_options(config: Config, scenarios: pd.DataFrame, hits: Hits, taxa: ReferenceTaxa,
                  views: dict[str, tuple], labels: LabelSpace, visibility: Visibility,
                  neighbours: Neighbours) -> Options:
    """build_options over all queries, chunk by chunk (the per-query probabilities are built per chunk)."""
    parts, e = [], config.engine
    for start in range(0, len(scenarios), SEARCH_CHUNK):
        rows = np.arange(start, min(start + SEARCH_CHUNK, len(scenarios)))
        chunk = scenarios.iloc[rows].reset_index(drop=True)
        blind = np.where(chunk["scenario"] == THINNED, chunk["truth_species"], None)
        made = {name: None if v is None else ClassifierView(record_probs(chunk["record"].to_numpy(), *v),
                                                           np.asarray(labels.species, dtype=object), blind)
                for name, v in views.items()}
        part = build_options(hits.ref[rows], hits.identity[rows], hits.coverage[rows], taxa, made["classifier"],
                             made["kmer"], e.max_species, e.classifier_top,
                             visible=lambda q, s, c=chunk: visibility.records(c, q, s),
                             nearest=lambda q, r, c=chunk: nearest_other(
                                 neighbours, r, lambda owners, rows: visibility.rows_visible(c, owners, rows), q))
        parts.append(Options(part.query + start, part.kind, part.name, part.genus, part.features, 0))
    return Options(*[np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("query", "kind", "name", "genus", "features")], len(scenarios))


def select_queries(options: Options, mask: np.ndarray) -> tuple[Options, np.ndarray]:
    """The options of the queries where mask is true, queries renumbered 0..; and the rows taken."""
    rows = np.flatnonzero(mask[options.query])
    renumber = np.cumsum(mask) - 1
    picked = options.take(rows)
    return Options(renumber[picked.query], picked.kind, picked.name, picked.genus, picked.features,
                   int(mask.sum())), rows


def nested_scores(config: Config, options: Options, targets: np.ndarray, scenarios: pd.DataFrame) -> np.ndarray:
    """Each option's score by the decision model fitted WITHOUT its query's fold (one fit per fold)."""
    scores = np.zeros(len(options.query))
    fold = scenarios["fold"].to_numpy()
    for k in sorted(pd.unique(fold), key=int):
        train, _ = select_queries(options, fold != k)
        model = fit_decision(train, targets[fold != k], scenarios["truth_species"].to_numpy()[fold != k],
                             config.engine.hidden, config.engine.seed)
        held, rows = select_queries(options, fold == k)
        scores[rows] = model.scores(held.features)
    return scores


def fold_probabilities(space: OptionSpace, options: Options, scores: np.ndarray, targets: np.ndarray,
                       others: np.ndarray):
    """Every query's probabilities as `idengine train` deploys them: the nested scores over the temperature fitted on
    the queries of `others` (a query mask: the OTHER folds' judged queries when cv judges a fold; every judged query
    when train fits the final temperature and thresholds)."""
    temperature = 1.0
    if others.any():
        sub, rows = select_queries(options, others)
        temperature = fit_score_temperature(scores[rows], sub, targets[others])
    return space.matrix(options, segment_softmax(scores / temperature, options.query, options.n_queries)), temperature


def judge_fold(space: OptionSpace, p, scenarios: pd.DataFrame, fold_rows: np.ndarray, other_rows: np.ndarray,
               truth: pd.DataFrame, hits: Hits, reference: ReferenceIndex, labels: LabelSpace, config: Config
               ) -> tuple[dict[str, Any], pd.DataFrame]:
    """One fold's metrics, with thresholds chosen on the OTHER folds' out-of-fold outputs; and its calls."""
    choices = rank_thresholds(space, p[other_rows], truth.iloc[other_rows], config.calibrate.target_precision)
    calls = engine_calls(space, p[fold_rows], {rank: c.threshold for rank, c in choices.items()},
                         no_hit=hits.ref[fold_rows, 0] < 0)
    part = scenarios.iloc[fold_rows].reset_index(drop=True)
    genus = space_best_genus(space, p[fold_rows])
    top = hits.ref[fold_rows, 0]
    top_species = np.where(top >= 0, reference.species[np.maximum(top, 0)], None)
    top_genus = np.where(top >= 0, reference.taxonomy.get("genus", reference.species)[np.maximum(top, 0)], None)
    metrics = {**assess.closed_set_metrics(space, p[fold_rows], part, np.asarray(labels.species, dtype=object),
                                          config.train.top_k),
               **assess.open_world(calls, part, genus),
               "thresholds": {rank: c.threshold for rank, c in choices.items()}}
    alone = assess.index_alone(top_species, top_genus, hits.identity[fold_rows, 0], part)
    return {"engine": metrics, "index": alone}, calls


def space_best_genus(space: OptionSpace, p) -> tuple[np.ndarray, np.ndarray]:
    """Per query the most probable genus (None everywhere when the reference has no genus)."""
    from idengine.reference.space import best_per_rank

    if "genus" not in space.rank_table.columns:
        return np.full(p.shape[0], None, dtype=object), np.zeros(p.shape[0])
    return best_per_rank(space, p, "genus")


def _summarise(per_fold: list[dict[str, Any]], part: str) -> dict[str, Any]:
    rows = [{k: v for k, v in f[part].items() if isinstance(v, (int, float))} for f in per_fold]
    return summarise_folds(rows)


def engine_cv(config: Config, records: pd.DataFrame, unknown: pd.DataFrame, labels: LabelSpace,
              results: list[FoldResult]) -> EngineRun:
    """The engine's cv step (see the module docstring) over finished classifier folds."""
    start = time.time()
    reference = reference_table(records, unknown)
    index = build_index(reference, config.engine.index_k, config.engine.index_sampling)
    visibility = Visibility(reference)
    scenarios = fill_answers(make_scenarios(records[records[C.FOLD] != C.TEST_FOLD], unknown,
                                            config.engine.novel_genus_share, config.engine.seed,
                                            config.engine.rare_balance), visibility)
    sequence_of = dict(zip(reference[C.ID], reference[C.SEQUENCE]))
    searched = time.time()
    hits = search_all(index, [sequence_of[r] for r in scenarios["record"]], scenarios, config)
    searched = time.time() - searched
    views = _views(config, records, unknown, labels, results)
    taxa = ReferenceTaxa.from_rows(index.species, index.taxonomy.get("genus"))
    neighbours = neighbours_of(index, config)
    built = time.time()
    options = query_options(config, scenarios, hits, taxa, views, labels, visibility, neighbours)
    built = time.time() - built
    targets = assess.target_slots(options, scenarios["answer_kind"].to_numpy(), scenarios["answer"].to_numpy())
    scores = nested_scores(config, options, targets, scenarios)
    space = OptionSpace.from_taxonomy(reference)
    truth = assess.truth_table(scenarios, reference)
    per_fold, outcomes, scored = [], [], judged(scenarios)
    for fold in sorted(scenarios["fold"].unique(), key=int):
        mask = (scenarios["fold"] == fold).to_numpy()
        p, temperature = fold_probabilities(space, options, scores, targets, ~mask & scored)
        metrics, calls = judge_fold(space, p, scenarios, np.flatnonzero(mask & scored),
                                    np.flatnonzero(~mask & scored), truth, hits, index, labels, config)
        metrics["engine"]["temperature"] = temperature
        per_fold.append({"fold": fold, **metrics})
        outcomes.append(calls.set_index(scenarios.index[mask & scored]))
    table = scenarios.join(pd.concat(outcomes)).assign(target_slot=targets, top_hit=hits.ref[:, 0],
                                                       top_identity=hits.identity[:, 0])
    metrics = {"engine": _summarise(per_fold, "engine"), "index": _summarise(per_fold, "index"),
               "folds": per_fold, "queries": table["scenario"].value_counts().to_dict(),
               "untrainable_queries": int((targets < 0).sum()), "seconds": round(time.time() - start, 1),
               "seconds_search": round(searched, 1), "seconds_evidence": round(built, 1)}
    log.info("engine cv: %d queries (%s) in %.0f s", len(table), metrics["queries"], metrics["seconds"])
    return EngineRun(table, options, scores, metrics, neighbours)


def _views(config: Config, records: pd.DataFrame, unknown: pd.DataFrame, labels: LabelSpace,
           results: list[FoldResult]) -> dict[str, tuple | None]:
    """Per-record logits of the classifier (its calibrated out-of-fold ones) and of the engine's k-mer model."""
    oof_ids = np.concatenate([r.ids for r in results])
    oof_logits = np.concatenate([r.logits for r in results])
    calibrator = fit_calibrator(oof_logits, np.concatenate([r.labels for r in results]), config.calibrate.method)
    logits = dict(zip(oof_ids, oof_logits))
    for r in results:
        logits.update(zip(r.rare_ids, r.rare_logits))
    views = {"classifier": (logits, calibrator), "kmer": None}
    if config.model.kind != config.engine.kmer_model:
        folds = rare_folds(unknown, sorted({r.fold for r in results}, key=int), config.engine.seed)
        views["kmer"] = (kmer_logits(config, records, unknown, folds, labels), None)
    return views
