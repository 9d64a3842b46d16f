"""Step 11b, artifact: an exported model directory, loaded and checked: what `idengine predict` and the Python API run.

Only JSON, YAML, parquet and safetensors are read; every file is checked against the sha256 the manifest
(idengine.json) lists, and a directory holding a pickle-capable file is refused, naming it. The layout is described
in deploy/export.py. The call comes from the engine (reference/engine.py) when the artifact has one, else from the
classifier's calibrated probabilities alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from idengine import layout as L
from idengine.config import Config
from idengine.config_io import load_config
from idengine.data.clean import check_sequence
from idengine.data.labels import LabelSpace
from idengine.deploy.classifiers import load_classifier
from idengine.evaluate.calibrate import Calibrator
from idengine.evaluate.calls import calls_for
from idengine.reference.engine import Engine, load_engine
from idengine.storage import file_sha256, read_json

log = logging.getLogger(__name__)

FORMAT = "idengine-artifact"
FORMAT_VERSION = 2
ENGINE_DIR = "engine"
CHUNK_COLUMNS = ["id", "record", "sequence", "length_bp", "reason", "detail"]
"""A block of query records: 1-based position in the file, the cleaned sequence, and why it is unusable (or "")."""
ERROR_COLUMNS = ["id", "record", "reason", "detail"]


@dataclass
class Artifact:
    """An exported model, loaded: ready to turn sequences into calls and calibrated probabilities."""

    classifier: Any
    """The classifier of `config.model.kind` (deploy/classifiers.py): `logits(cleaned sequences) -> (n, C)`."""
    label_space: LabelSpace
    calibrator: Calibrator
    threshold: float
    """The classifier's species threshold (the call without the engine)."""
    config: Config
    manifest: dict[str, Any]
    engine: Engine | None = None
    device: str = "cpu"

    @property
    def model(self):
        """The transformer classifier's torch module (peft model or EsmForSequenceClassification)."""
        return self.classifier.model

    def logits(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        """The classifier's raw (n, C) float32 logits, sequences cleaned as in training (ValueError if unusable)."""
        cleaned = clean_for_model(sequences, self.config)
        if not cleaned:
            return np.zeros((0, self.label_space.num_classes), dtype=np.float32)
        return self.classifier.logits(cleaned, batch_size)

    def probabilities(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        """The classifier's calibrated (n, C) probabilities in label order."""
        return self.calibrator.apply(self.logits(sequences, batch_size))

    def calls(self, ids: list[str], sequences: list[str], top_k: int = 5, batch_size: int = 64) -> pd.DataFrame:
        """One call per valid sequence (the engine's when there is one) with its probabilities.

        Returns:
            DataFrame: id, call, call_rank, call_prob, then (engine) p_novel_species, p_novel_genus, nearest_id,
            nearest_identity, nearest_coverage, top_genus, top_genus_prob, and top1_species, top1_prob, ... in
            input order.
        """
        probs = self.probabilities(list(sequences), batch_size=batch_size)
        if self.engine is not None:
            calls = self.engine.call(clean_for_model(sequences, self.config), probs,
                                     np.asarray(self.label_space.species, dtype=object), top_k)
            return pd.concat([pd.DataFrame({"id": list(ids)}), calls], axis=1)
        calls = calls_for(probs, self.label_space, self.threshold, self.config.calibrate.rank_fallback)
        k = min(top_k, probs.shape[1])
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        species = np.asarray(self.label_space.species, dtype=object)
        out = {"id": list(ids), "call": calls["call"].to_numpy(), "call_rank": calls["call_rank"].to_numpy(),
               "call_prob": calls["call_prob"].to_numpy()}
        for j in range(k):
            out[f"top{j + 1}_species"] = species[top[:, j]]
            out[f"top{j + 1}_prob"] = probs[np.arange(len(out["id"])), top[:, j]]
        return pd.DataFrame(out)

    def call_chunk(self, chunk: pd.DataFrame, top_k: int, batch_size: int = 64) -> pd.DataFrame:
        """Calls for the good rows of a CHUNK_COLUMNS block; bad rows pass through with their reason and no call."""
        good = chunk["reason"] == ""
        scored = self.calls(chunk.loc[good, "id"].tolist(), chunk.loc[good, "sequence"].tolist(), top_k, batch_size)
        scored.index = chunk.index[good]
        # Even with no good row, `scored` has every column, so each block has the same schema.
        return chunk.drop(columns=["sequence"]).join(scored.drop(columns=["id"]))


def clean_for_model(sequences: list[str], config: Config) -> list[str]:
    """Normalise like `idengine prepare` (`data.clean.check_sequence`, the model's own thresholds).

    Raises:
        ValueError: a sequence the model cannot score, naming its position and the reason.
    """
    cleaned = []
    for i, raw in enumerate(sequences):
        seq, reason, detail = check_sequence(str(raw), config.data)
        if reason:
            raise ValueError(f"sequence #{i} cannot be scored ({reason}: {detail})")
        cleaned.append(seq)
    return cleaned


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory; FileNotFoundError without one, ValueError for another format."""
    path = Path(model_dir) / L.MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {L.MANIFEST}; pass the directory written by `idengine train`")
    manifest = read_json(path)  # a truncated or edited one is refused naming it
    if not isinstance(manifest, dict):
        manifest = {}
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
                         f"{FORMAT} v{FORMAT_VERSION}; export the model again with this idengine")
    if not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path}: no file list; the manifest was altered: export the model again")
    return manifest


def verify_artifact(model_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every file matches its sha256 and none is pickle-capable (else ValueError naming them)."""
    directory = Path(model_dir)
    manifest = read_manifest(directory)
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {L.MANIFEST}
    listed = set(manifest["files"])
    pickles = sorted(name for name in present if Path(name).suffix in L.PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{directory}: pickle-capable files {pickles}; idengine never loads them")
    if present != listed:
        raise ValueError(f"{directory}: files differ from {L.MANIFEST}: missing {sorted(listed - present)}, "
                         f"unlisted {sorted(present - listed)}; export the model again")
    altered = [name for name in sorted(listed) if file_sha256(directory / name) != manifest["files"][name]]
    if altered:
        raise ValueError(f"{directory}: sha256 mismatch for {altered}: the files were altered or truncated; "
                         "refusing to load it (export the model again, or copy it whole)")
    return manifest


def load_artifact(model_dir: str | Path, device: str | None = None, base_model: str | None = None,
                  verify: bool = True) -> Artifact:
    """Load an exported model (only JSON, YAML, parquet and safetensors are read: no pickle).

    Args:
        model_dir: directory written by `idengine train`.
        device: torch device; default `cuda` when available, else `cpu`.
        base_model: local directory or hub id to use as the base instead of the recorded one (e.g. an offline
            mirror of the hub checkpoint at the recorded revision).
        verify: check every file's sha256 against the manifest first.

    Returns:
        The Artifact. Raises FileNotFoundError for a directory that is not an artifact, ValueError for altered or
        inconsistent files.
    """
    directory = Path(model_dir)
    manifest = verify_artifact(directory) if verify else read_manifest(directory)
    config = load_config(directory / L.CONFIG_FILE)
    label_space = LabelSpace.from_json(directory / L.LABEL_MAP_FILE)
    calibration = json.loads((directory / L.CALIBRATION).read_text(encoding="utf-8"))
    if manifest["num_labels"] != label_space.num_classes:
        raise ValueError(f"{directory}: manifest says {manifest['num_labels']} labels, label_map.json "
                         f"{label_space.num_classes}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    classifier = load_classifier(directory, config, manifest, label_space, device, base_model)
    engine = load_engine(directory / ENGINE_DIR) if (directory / ENGINE_DIR).is_dir() else None
    log.info("loaded %s (%s, %d species%s) on %s", directory, config.model.describe(), label_space.num_classes,
             f", engine over {engine.index.n_ref} references" if engine else "", device)
    return Artifact(classifier, label_space, Calibrator.from_dict(calibration["calibrator"]),
                    float(calibration["threshold"]), config, manifest, engine, device)
