"""Step 10g, the engine: the call for a batch of sequences, from the reference index, the classifier's and the k-mer
model's probabilities and the decision model, as `idengine predict` runs it (and `idengine train` on the test split).

Stored in an artifact as engine/: the reference records (reference.parquet; the prefilter is rebuilt on load), their
nearest other-species neighbours, the k-mer evidence model, the decision model and each rank's threshold
(engine.json). No pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from idengine import layout as L
from idengine.config import EngineConfig
from idengine.evaluate.metrics import softmax
from idengine.models.kmer import KmerModel, load_kmer_model
from idengine.reference.decision import DecisionModel, load_decision
from idengine.reference.evidence import ClassifierView, ReferenceTaxa, build_options
from idengine.reference.index import ReferenceIndex, build_index, load_index, save_index, search
from idengine.reference.neighbours import Neighbours, load_neighbours, nearest_other
from idengine.reference.space import OptionSpace, best_per_rank, engine_calls

ENGINE_META = "engine.json"
KMER_DIR = "kmer"


@dataclass
class Engine:
    """What makes the call beside the classifier: see the module docstring."""

    index: ReferenceIndex
    decision: DecisionModel
    thresholds: dict[str, float]
    """Each rank's threshold (species, genus, ..., novel) for the target precision, chosen on out-of-fold calls."""
    settings: EngineConfig
    neighbours: Neighbours
    """Each reference record's nearest other-species records (the barcode-gap evidence)."""
    kmer: KmerModel | None = None
    """The k-mer evidence model (None when the classifier is itself that k-mer model)."""

    def __post_init__(self) -> None:
        frame = pd.DataFrame({"species": self.index.species, **self.index.taxonomy})
        self.space = OptionSpace.from_taxonomy(frame)
        self.taxa = ReferenceTaxa.from_rows(self.index.species, self.index.taxonomy.get("genus"))

    def answer(self, sequences: list[str], classifier_probs: np.ndarray | None, label_species: np.ndarray):
        """The engine's probabilities over its answer space (sparse, one row per sequence) and the hits behind them,
        for cleaned sequences given the classifier's calibrated probabilities over its labels."""
        s = self.settings
        hits = search(self.index, sequences, s.candidates, s.min_overlap)
        species = np.asarray(label_species, dtype=object)
        classifier = None if classifier_probs is None else ClassifierView(classifier_probs, species)
        kmer = None if self.kmer is None else ClassifierView(softmax(self.kmer.logits(sequences)), species)
        if kmer is None and classifier is None:
            raise ValueError("the engine needs a classifier or a k-mer model")
        options = build_options(hits.ref, hits.identity, hits.coverage, self.taxa, classifier, kmer,
                                s.max_species, s.classifier_top,
                                nearest=lambda q, rows: nearest_other(self.neighbours, rows))
        return self.space.matrix(options, self.decision.probabilities(options)), hits

    def call(self, sequences: list[str], classifier_probs: np.ndarray | None, label_species: np.ndarray,
             top_k: int = 5) -> pd.DataFrame:
        """The engine's call for cleaned sequences, given the classifier's calibrated probabilities over its labels.

        Returns:
            One row per sequence: call, call_rank, call_prob, p_novel_species, p_novel_genus, nearest_id,
            nearest_identity, nearest_coverage, top_genus and top_genus_prob (the most probable genus, its species
            and "a species not in the reference of that genus" summed, whatever rank the call reached; "" and 0
            without a genus column), and the top_k species with their probabilities.
        """
        p, hits = self.answer(sequences, classifier_probs, label_species)
        calls = engine_calls(self.space, p, self.thresholds, no_hit=hits.ref[:, 0] < 0)
        top = hits.ref[:, 0]
        calls["nearest_id"] = np.where(top >= 0, self.index.ids[np.maximum(top, 0)], "")
        calls["nearest_identity"] = hits.identity[:, 0]
        calls["nearest_coverage"] = hits.coverage[:, 0]
        if len(self.space.genera) and len(sequences):
            calls["top_genus"], calls["top_genus_prob"] = best_per_rank(self.space, p, "genus")
        else:
            calls["top_genus"], calls["top_genus_prob"] = "", 0.0
        return pd.concat([calls.drop(columns=["species", "species_prob"]), self._top_species(p, top_k)], axis=1)

    def _top_species(self, p, k: int) -> pd.DataFrame:
        """The k most probable reference species of each query and their probabilities ("" and 0 past a query's
        last species option), read from the sparse rows: a dense (queries x species) copy would cost 8 bytes per
        reference species per query, the largest block of a call on a big reference. At most as many columns as the
        reference has species, as the classifier-alone call."""
        k = min(k, len(self.space.species))
        q = sparse.csr_array(p[:, :len(self.space.species)])
        row = np.repeat(np.arange(q.shape[0]), np.diff(q.indptr))
        order = np.lexsort((q.indices, -q.data, row))  # by query, then probability (highest first), then column
        slot = np.arange(len(order)) - q.indptr[row[order]]
        first = slot < k
        keep = order[first]
        names = np.full((q.shape[0], k), "", dtype=object)
        probs = np.zeros((q.shape[0], k))
        names[row[keep], slot[first]] = self.space.species[q.indices[keep]]
        probs[row[keep], slot[first]] = q.data[keep]
        out = {}
        for j in range(k):
            out[f"top{j + 1}_species"], out[f"top{j + 1}_prob"] = names[:, j], probs[:, j]
        return pd.DataFrame(out)


def reference_index(table: pd.DataFrame, settings: EngineConfig) -> ReferenceIndex:
    """The engine's index over a reference table (id, sequence, species, ranks; fold and group for masking)."""
    return build_index(table, settings.index_k, settings.index_sampling)


def save_engine(engine: Engine, directory: Path) -> None:
    """engine/ of an artifact: reference.parquet, decision files, kmer/ (when present), engine.json."""
    directory.mkdir(parents=True, exist_ok=True)
    save_index(engine.index, directory / L.REFERENCE_FILE)
    engine.decision.save(directory)
    engine.neighbours.save(directory)
    if engine.kmer is not None:
        engine.kmer.save(directory / KMER_DIR)
    meta = {"thresholds": engine.thresholds, "settings": engine.settings.__dict__, "kmer": engine.kmer is not None}
    (directory / ENGINE_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def load_engine(directory: Path) -> Engine:
    """Read engine/ back (the index's prefilter is rebuilt with the stored settings)."""
    meta = json.loads((directory / ENGINE_META).read_text(encoding="utf-8"))
    settings = EngineConfig(**meta["settings"])
    index = load_index(directory / L.REFERENCE_FILE, settings.index_k, settings.index_sampling)
    kmer = load_kmer_model(directory / KMER_DIR) if meta["kmer"] else None
    return Engine(index, load_decision(directory), {k: float(v) for k, v in meta["thresholds"].items()}, settings,
                  load_neighbours(directory), kmer)
