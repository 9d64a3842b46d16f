"""Step 11a, artifact: an exported model directory, loaded and checked: what `idengine predict` and the Python API run.

Only JSON, YAML and safetensors are read; every file is checked against the sha256 the manifest (idengine.json)
lists, and a directory holding a pickle-capable file is refused. The layout is described in deploy/export.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn

from idengine import layout as L
from idengine.config import Config
from idengine.config_io import load_config
from idengine.data.clean import check_sequence
from idengine.data.labels import LabelSpace
from idengine.data.tokenize import load_tokenizer, tokenize_batch
from idengine.evaluate.calibrate import Calibrator
from idengine.evaluate.calls import calls_for
from idengine.models.inference import classifier_logits
from idengine.models.transformer import build_model, load_trainable_state
from idengine.storage import file_sha256

log = logging.getLogger(__name__)

FORMAT = "idengine-artifact"
FORMAT_VERSION = 1
CHUNK_COLUMNS = ["id", "record", "sequence", "length_bp", "reason", "detail"]
"""A block of query records: 1-based position in the file, the cleaned sequence, and why it is unusable (or "")."""
ERROR_COLUMNS = ["id", "record", "reason", "detail"]


@dataclass
class Artifact:
    """An exported model, loaded: ready to turn sequences into calibrated species probabilities."""

    model: nn.Module
    """The classifier in eval mode (peft model, or EsmForSequenceClassification for full/head exports)."""
    tokenizer: Any
    label_space: LabelSpace
    calibrator: Calibrator
    threshold: float
    """Species threshold: a species is called when its calibrated probability is >= this."""
    config: Config
    manifest: dict[str, Any]
    device: str = "cpu"

    def logits(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        """Raw (n, C) float32 logits of sequences, cleaned as in training (ValueError for an unusable one)."""
        cleaned = clean_for_model(sequences, self.config)
        return model_logits(self.model, self.tokenizer, cleaned, self.config.model.max_tokens, batch_size,
                            self.device)

    def probabilities(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        """Calibrated (n, C) float64 probabilities in label order; ValueError for an empty or non-DNA sequence."""
        return self.calibrator.apply(self.logits(sequences, batch_size))

    def calls(self, ids: list[str], sequences: list[str], top_k: int = 5, batch_size: int = 64) -> pd.DataFrame:
        """One call per valid sequence (species, a higher rank or unassigned) and the top-k calibrated species.

        Returns:
            DataFrame: id, call, call_rank, confidence, top1_species, top1_prob, ... in input order.
        """
        probs = self.probabilities(list(sequences), batch_size=batch_size)
        calls = calls_for(probs, self.label_space, self.threshold, self.config.calibrate.rank_fallback)
        k = min(top_k, probs.shape[1])
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        species = np.asarray(self.label_space.species, dtype=object)
        out = {"id": list(ids), "call": calls["call"].to_numpy(), "call_rank": calls["call_rank"].to_numpy(),
               "confidence": calls["confidence"].to_numpy()}
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


def model_logits(model: nn.Module, tokenizer, sequences: list[str], max_tokens: int, batch_size: int = 64,
                 device: str = "cpu") -> np.ndarray:
    """(n, C) float32 logits of cleaned sequences: tokenize, then `models.inference.run_rows` (length-sorted)."""
    tokens = tokenize_batch({L.SEQUENCE: np.array(list(sequences), dtype=object)}, tokenizer, max_tokens)
    return classifier_logits(model, list(tokens[L.INPUT_IDS]), batch_size, device=torch.device(device))


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
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
                         f"{FORMAT} v<={FORMAT_VERSION}; upgrade idengine")
    return manifest


def verify_artifact(model_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every file matches its sha256 and none is pickle-capable (else ValueError)."""
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
        raise ValueError(f"{directory}: sha256 mismatch for {altered}: the files were altered or truncated")
    return manifest


def _load_model(directory: Path, config: Config, manifest: dict[str, Any], labels: LabelSpace,
                base_model: str | None) -> nn.Module:
    """Rebuild the classifier: base + adapter (lora), the whole saved model (full), or base + head (head)."""
    from transformers import EsmForSequenceClassification

    mode = manifest["finetune"]
    if mode == "full":
        return EsmForSequenceClassification.from_pretrained(str(directory), use_safetensors=True)
    record = manifest["base_model"]  # an override, the bundled base/, or the recorded hub id + revision
    source, revision = (base_model, None) if base_model else \
        (str(directory / L.BASE_DIR), None) if record.get("bundled") else (record["id"], record.get("revision"))
    # The head drawn here is overwritten below; build_model applies the backbone's pickle policy.
    base_cfg = dataclasses.replace(config.model, backbone=source, revision=revision, finetune="head",
                                   gradient_checkpointing=False)
    model = build_model(base_cfg, config.lora, labels.num_classes, dict(enumerate(labels.species)))
    if mode == "head":
        load_trainable_state(model, load_file(str(directory / L.HEAD_FILE)))
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=False)


def load_artifact(model_dir: str | Path, device: str | None = None, base_model: str | None = None,
                  verify: bool = True) -> Artifact:
    """Load an exported model (only JSON, YAML and safetensors are read: no pickle).

    Args:
        model_dir: directory written by export_artifact / `idengine train`.
        device: torch device; default `cuda` when available, else `cpu`.
        base_model: local directory or hub id to use as the base instead of the recorded one (e.g. an offline
            mirror of the hub checkpoint at the recorded revision).
        verify: check every file's sha256 against the manifest first.

    Returns:
        The Artifact, its model in eval mode on `device`. Raises FileNotFoundError for a directory that is not
        an artifact, ValueError for altered or inconsistent files.
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
    model = _load_model(directory, config, manifest, label_space, base_model).to(device).eval()
    log.info("loaded %s (%s, %d species) on %s", directory, manifest["finetune"], label_space.num_classes, device)
    return Artifact(model, load_tokenizer(str(directory)), label_space,
                    Calibrator.from_dict(calibration["calibrator"]), float(calibration["threshold"]), config,
                    manifest, device)
