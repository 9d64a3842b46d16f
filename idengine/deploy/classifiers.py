"""Step 11a, the classifier of an artifact, for every model kind: how it is written and read back.

Every kind loads as an object with `logits(cleaned_sequences) -> (n, C)`:
- transformer: the peft adapter + head (`lora`, loadable by plain transformers + peft), the whole model (`full`) or
  the head (`head`), on the base the manifest names (bundled in base/ for `tiny`);
- probe: classifier/probe.{json,safetensors} on the frozen base's pooled embeddings;
- kmer-nb / kmer-linear: classifier/kmer_model.{json,safetensors}.
Only JSON, YAML and safetensors are written and read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idengine import layout as L
from idengine.config import TINY_BACKBONE, Config
from idengine.data.labels import LabelSpace
from idengine.data.tokenize import load_tokenizer
from idengine.models.inference import sequence_embeddings, sequence_logits
from idengine.models.kmer import KmerModel, load_kmer_model
from idengine.models.probe import Probe, load_probe
from idengine.models.tiny import save_tiny_backbone
from idengine.models.transformer import build_model, load_backbone, load_trainable_state, trainable_state_dict, \
    unwrap
from idengine.storage import write_json

log = logging.getLogger(__name__)

CLASSIFIER_DIR = "classifier"


@dataclass
class TransformerClassifier:
    """A fine-tuned transformer with its tokenizer."""

    model: nn.Module
    tokenizer: Any
    max_tokens: int
    device: str = "cpu"

    def logits(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        return sequence_logits(self.model, self.tokenizer, sequences, self.max_tokens, batch_size,
                               torch.device(self.device))


@dataclass
class KmerClassifier:
    """A k-mer model (kmer-nb or kmer-linear)."""

    model: KmerModel

    def logits(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        return self.model.logits(sequences)


@dataclass
class ProbeClassifier:
    """A probe head on a frozen backbone's pooled embeddings."""

    probe: Probe
    backbone: nn.Module
    tokenizer: Any
    max_tokens: int
    pooling: str
    device: str = "cpu"

    def logits(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        x = sequence_embeddings(self.backbone, self.tokenizer, sequences, self.max_tokens, batch_size, self.pooling,
                                torch.device(self.device))
        return self.probe.logits(x)


def base_record(config: Config) -> dict[str, Any]:
    """The base model an artifact needs: the hub id + revision, or base/ bundled for the tiny backbone."""
    uses = config.model.uses_backbone and not (config.model.kind == "transformer" and config.model.finetune == "full")
    tiny = uses and config.model.backbone == TINY_BACKBONE
    return {"id": L.BASE_DIR if tiny else (config.model.backbone if uses else None),
            "revision": None if tiny or not uses else config.model.revision, "backbone": config.model.backbone,
            "bundled": tiny}


def write_classifier(directory: Path, classifier: Any, config: Config, merge: bool) -> None:
    """The classifier's files in its kind's layout (see the module docstring)."""
    kind = config.model.kind
    if kind in ("kmer-nb", "kmer-linear"):
        classifier.model.save(directory / CLASSIFIER_DIR)
        return
    if kind == "probe":
        classifier.probe.save(directory / CLASSIFIER_DIR)
    else:
        _write_transformer(directory, unwrap(classifier.model), config, merge)
    classifier.tokenizer.save_pretrained(str(directory))
    if base_record(config)["bundled"]:
        save_tiny_backbone(directory / L.BASE_DIR)


def _write_transformer(directory: Path, model: nn.Module, config: Config, merge: bool) -> None:
    mode = config.model.finetune
    if mode in ("lora", "full"):
        model.save_pretrained(str(directory), safe_serialization=True)
        if mode == "lora":
            _point_adapter_at_base(directory / L.ADAPTER_CONFIG, config)
    else:
        save_file(trainable_state_dict(model), str(directory / L.HEAD_FILE))
    if merge and mode != "full":
        merged = copy.deepcopy(model)
        merged = merged.merge_and_unload() if mode == "lora" else merged
        merged.save_pretrained(str(directory / L.MERGED_DIR), safe_serialization=True)
    elif merge:
        log.info("merge ignored: a full-finetune export already is the whole model")


def _point_adapter_at_base(path: Path, config: Config) -> None:
    """Make adapter_config.json name the base it adapts (the hub id + revision, or `base` for the tiny model)."""
    adapter = json.loads(path.read_text(encoding="utf-8"))
    record = base_record(config)
    adapter["base_model_name_or_path"], adapter["revision"] = record["id"], record["revision"]
    write_json(path, adapter)


def _base_config(directory: Path, config: Config, manifest: dict, base_model: str | None) -> Config:
    """The config with model.backbone pointing at the base to load: an override, base/, or the recorded hub id."""
    record = manifest["base_model"]
    source, revision = (base_model, None) if base_model else \
        (str(directory / L.BASE_DIR), None) if record.get("bundled") else (record["id"], record.get("revision"))
    model = dataclasses.replace(config.model, backbone=source, revision=revision, gradient_checkpointing=False)
    return dataclasses.replace(config, model=model)


def load_classifier(directory: Path, config: Config, manifest: dict, labels: LabelSpace, device: str,
                    base_model: str | None = None):
    """The artifact's classifier, ready to score (eval mode, on `device`)."""
    kind = config.model.kind
    if kind in ("kmer-nb", "kmer-linear"):
        return KmerClassifier(load_kmer_model(directory / CLASSIFIER_DIR))
    tokenizer = load_tokenizer(str(directory))
    base = _base_config(directory, config, manifest, base_model)
    if kind == "probe":
        backbone = load_backbone(base.model).to(device)
        return ProbeClassifier(load_probe(directory / CLASSIFIER_DIR), backbone, tokenizer, config.model.max_tokens,
                               config.model.pooling, device)
    return TransformerClassifier(_load_transformer(directory, base, labels).to(device).eval(), tokenizer,
                                 config.model.max_tokens, device)


def _load_transformer(directory: Path, base: Config, labels: LabelSpace) -> nn.Module:
    """Rebuild the classifier: base + adapter (lora), the whole saved model (full), or base + head (head)."""
    from transformers import EsmForSequenceClassification

    mode = base.model.finetune
    if mode == "full":
        return EsmForSequenceClassification.from_pretrained(str(directory), use_safetensors=True)
    # The head drawn here is overwritten below; build_model applies the backbone's pickle policy.
    head_only = dataclasses.replace(base.model, finetune="head")
    model = build_model(head_only, base.lora, labels.num_classes, dict(enumerate(labels.species)))
    if mode == "head":
        load_trainable_state(model, load_file(str(directory / L.HEAD_FILE)))
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=False)

