"""Step 14, export: the trained model as one small, self-describing directory that plain transformers + peft can load.

Layout of a `lora` export (the default, "lightweight": megabytes, the base model is referenced, not copied):

    adapter_config.json        peft LoraConfig; base_model_name_or_path/revision name the base
    adapter_model.safetensors  LoRA weights + the classification head (peft modules_to_save)
    tokenizer_config.json, vocab.txt   the tokenizer (transformers save_pretrained)
    label_map.json             label -> species + taxonomy ranks (LabelSpace.to_json)
    calibration.json           calibrator (Calibrator.to_dict), species threshold, target precision, ranks
    config.yaml                the resolved idengine config
    metrics.json               cv mean/sd, test metrics, calibration and open-set reports (whatever the caller gives)
    README.md                  how to load it, with and without idengine
    idengine.json              manifest: versions, base model id + revision, mode, and the sha256 of every other file
    base/                      only for backbone `tiny`: the ~1 MB random base (config.json, model.safetensors, tokenizer)
    merged/                    only with merge=True: merge_and_unload() -> save_pretrained (safetensors)

`full` mode writes the whole model instead of the adapter (config.json + model.safetensors); `head` mode writes
`head.safetensors` (the classifier only) beside the base reference. Everything is JSON, YAML or safetensors: nothing
is ever written or read with pickle. Loading without idengine (a `lora` export; use `DIR/base` as the base for `tiny`):

    import json, torch
    from peft import PeftModel
    from transformers import AutoTokenizer, EsmForSequenceClassification
    d = "runs/model"
    labels = json.load(open(f"{d}/label_map.json"))["labels"]
    id2label = {e["label"]: e["species"] for e in labels}
    manifest = json.load(open(f"{d}/idengine.json"))["base_model"]
    base = EsmForSequenceClassification.from_pretrained(manifest["id"], revision=manifest["revision"],
                                                        num_labels=len(id2label), id2label=id2label)
    model = PeftModel.from_pretrained(base, d).eval()
    tokenizer = AutoTokenizer.from_pretrained(d)
    batch = tokenizer(["ACGT..."], return_tensors="pt", padding=True, truncation=True, max_length=1000)
    temperature = json.load(open(f"{d}/calibration.json"))["calibrator"]["temperature"]
    probs = torch.softmax(model(**batch).logits / temperature, dim=-1)

Sequences must be cleaned first as in training (upper case, U->T, IUPAC codes->N, no gaps). InstaDeepAI ships the
2.5B base only as pickled `.bin` shards: from_pretrained needs `use_safetensors=False` for it (a trusted source).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idengine import columns as C
from idengine.calibrate import Calibrator
from idengine.config import TINY_BACKBONE, Config, load_config, save_config
from idengine.data.clean import normalise_sequence
from idengine.data.splits import LabelSpace
from idengine.data.tokenize import collate, load_tokenizer, tokenize_batch
from idengine.files import file_sha256
from idengine.model import build_model, load_trainable_state, save_tiny_backbone, trainable_state_dict, unwrap

log = logging.getLogger(__name__)

FORMAT = "idengine-artifact"
FORMAT_VERSION = 1
MANIFEST = "idengine.json"
CALIBRATION = "calibration.json"
METRICS = "metrics.json"
README = "README.md"
HEAD_FILE = "head.safetensors"
BASE_DIR = "base"
MERGED_DIR = "merged"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
"""Suffixes of formats that may hold pickles; an artifact never contains them and load_artifact refuses them."""
VERSIONED_PACKAGES = ("idengine", "torch", "transformers", "peft", "safetensors", "ray", "numpy", "scikit-learn")


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
        """Raw (n, C) float32 logits of sequences (normalised like training; each must be a valid barcode)."""
        return model_logits(self.model, self.tokenizer, sequences, self.config.model.max_tokens, batch_size,
                            self.device)

    def probabilities(self, sequences: list[str], batch_size: int = 64) -> np.ndarray:
        """Calibrated (n, C) float64 probabilities in label order; ValueError for an empty or non-DNA sequence."""
        return self.calibrator.apply(self.logits(sequences, batch_size))


def clean_for_model(sequences: list[str]) -> list[str]:
    """Normalise like `idengine prepare` (upper case, U->T, IUPAC->N, no gaps); ValueError for an unusable one."""
    cleaned = []
    for i, raw in enumerate(sequences):
        seq, invalid, _flags = normalise_sequence(str(raw))
        if invalid or not seq:
            what = f"characters {''.join(sorted(invalid))!r}" if invalid else "no bases"
            raise ValueError(f"sequence #{i} has {what}; only nucleotides, IUPAC codes and gaps can be scored")
        cleaned.append(seq)
    return cleaned


@torch.inference_mode()
def model_logits(model: nn.Module, tokenizer, sequences: list[str], max_tokens: int, batch_size: int = 64,
                 device: str = "cpu") -> np.ndarray:
    """(n, C) float32 logits of raw sequences: normalise, tokenize, pad per batch, forward in eval mode.

    Batches are formed in length order so that short amplicons are not padded to full-gene length; rows come
    back in input order. The result depends only on the model and the sequences, not on which caller runs it.
    """
    cleaned = clean_for_model(sequences)
    num_labels = model.config.num_labels
    out = np.zeros((len(cleaned), num_labels), dtype=np.float32)
    if not cleaned:
        return out
    model.eval()
    order = np.argsort([len(s) for s in cleaned], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tokens = tokenize_batch({C.SEQUENCE: np.array([cleaned[i] for i in rows], dtype=object)}, tokenizer,
                                max_tokens)
        batch = collate(tokens, pad_id=tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        out[rows] = logits.logits.float().cpu().numpy()
    return out


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries an artifact depends on (None when one is not installed)."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in VERSIONED_PACKAGES}}


def json_safe(value: Any) -> Any:
    """Nested dicts/lists with numpy scalars made plain and NaN/inf made null, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(json_safe(data), indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                    encoding="utf-8")


def _write_weights(tmp: Path, model: nn.Module, config: Config, merge: bool) -> None:
    """The trained weights in the mode's layout; the base goes in base/ only for the (tiny, random) `tiny` backbone."""
    mode = config.model.finetune
    if mode == "lora":
        model.save_pretrained(str(tmp), safe_serialization=True)
        _point_adapter_at_base(tmp / "adapter_config.json", config)
    elif mode == "full":
        model.save_pretrained(str(tmp), safe_serialization=True)
    else:
        save_file(trainable_state_dict(model), str(tmp / HEAD_FILE))
    if mode != "full" and config.model.backbone == TINY_BACKBONE:
        save_tiny_backbone(tmp / BASE_DIR)
    if merge and mode != "full":
        merged = copy.deepcopy(model)
        merged = merged.merge_and_unload() if mode == "lora" else merged
        merged.save_pretrained(str(tmp / MERGED_DIR), safe_serialization=True)
    elif merge:
        log.info("merge ignored: a full-finetune export already is the whole model")


def _point_adapter_at_base(path: Path, config: Config) -> None:
    """Make adapter_config.json name the base it adapts (the hub id + revision, or `base` for the tiny model)."""
    adapter = json.loads(path.read_text(encoding="utf-8"))
    tiny = config.model.backbone == TINY_BACKBONE
    adapter["base_model_name_or_path"] = BASE_DIR if tiny else config.model.backbone
    adapter["revision"] = None if tiny else config.model.revision
    write_json(path, adapter)


def _base_record(config: Config) -> dict[str, Any]:
    tiny = config.model.backbone == TINY_BACKBONE and config.model.finetune != "full"
    return {"id": BASE_DIR if tiny else config.model.backbone, "revision": None if tiny else config.model.revision,
            "backbone": config.model.backbone, "bundled": tiny}


def _readme(config: Config, label_space: LabelSpace, threshold: float) -> str:
    base = _base_record(config)
    where = "`base/` in this directory" if base["bundled"] else f"`{base['id']}` (revision `{base['revision']}`)"
    return (f"# idengine model\n\nSpecies classifier over {label_space.num_classes} species ({config.model.finetune} "
            f"fine-tune of {config.model.backbone}); base model: {where}. Species threshold {threshold:.4g} (target "
            f"precision {config.calibrate.target_precision}); below it the call falls back to the deepest rank whose "
            "summed probability passes it, else `unassigned`.\n\nUse: `idengine predict --model DIR --sequences "
            "reads.fasta.gz --out calls.csv`, or `idengine.export.load_artifact(DIR).probabilities([...])`; without "
            "idengine, see the docstring of `idengine/export.py` (transformers + peft). `idengine.json` lists every "
            "file with its sha256; nothing here is a pickle.\n")


def _write_manifest(directory: Path, config: Config, label_space: LabelSpace, merged: bool) -> dict[str, Any]:
    """idengine.json: versions, base, mode and the sha256 of every other file (sorted relative paths)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": library_versions(), "base_model": _base_record(config), "finetune": config.model.finetune,
                "num_labels": label_space.num_classes, "max_tokens": config.model.max_tokens, "merged": merged,
                "files": {p.relative_to(directory).as_posix(): file_sha256(p) for p in files}}
    write_json(directory / MANIFEST, manifest)
    return manifest


def replace_dir(tmp: Path, out: Path) -> None:
    """Put a finished temp directory at `out`, replacing an older one only after the new one is complete."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_artifact(out_dir: str | Path, model: nn.Module, tokenizer, label_space: LabelSpace, config: Config,
                    calibrator: Calibrator, threshold: float, metrics: dict[str, Any], merge: bool = False,
                    extra_files: dict[str, str | Path] | None = None) -> Path:
    """Write the artifact directory (layout in the module docstring), atomically: temp dir, then rename.

    Args:
        out_dir: the artifact directory; an existing one is replaced once the new one is complete.
        model, tokenizer: the trained model from build_model (possibly DDP-wrapped) and its tokenizer.
        label_space, config: the labels (with taxonomy) the head predicts; the resolved config it was trained with.
        calibrator, threshold: the calibration map and species threshold fitted on out-of-fold data.
        metrics: written as metrics.json (non-finite numbers become null).
        merge: also write merged/ (LoRA merged into the base: a full model, gigabytes for the real backbone).
        extra_files: relative name -> existing file to copy in (reports, plots); listed in the manifest too.

    Returns:
        out_dir as a Path. Raises ValueError when the head and label space differ, or an extra file is a pickle.
    """
    model = unwrap(model)
    if model.config.num_labels != label_space.num_classes:
        raise ValueError(f"model has {model.config.num_labels} labels, label space {label_space.num_classes}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_weights(tmp, model, config, merge)
        tokenizer.save_pretrained(str(tmp))
        label_space.to_json(tmp / C.LABEL_MAP_FILE)
        write_json(tmp / CALIBRATION, {
            "calibrator": calibrator.to_dict(), "threshold": float(threshold),
            "target_precision": config.calibrate.target_precision, "rank_fallback": config.calibrate.rank_fallback,
            "ranks": list(label_space.ranks)})
        save_config(config, tmp / C.CONFIG_FILE)
        write_json(tmp / METRICS, metrics)
        (tmp / README).write_text(_readme(config, label_space, threshold), encoding="utf-8")
        for name, source in (extra_files or {}).items():
            if Path(name).suffix in PICKLE_SUFFIXES:
                raise ValueError(f"extra file {name}: pickle-capable formats are not allowed in an artifact")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        _write_manifest(tmp, config, label_space, merged=merge)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s model (%d species) to %s", config.model.finetune, label_space.num_classes, out)
    return out


def update_artifact_files(model_dir: str | Path, files: dict[str, Any]) -> dict[str, Any]:
    """Write files (name -> str for text, else JSON) into an artifact still being built; updates the manifest."""
    directory = Path(model_dir)
    manifest = read_manifest(directory)
    for name, content in files.items():
        if isinstance(content, str):
            (directory / name).write_text(content, encoding="utf-8")
        else:
            write_json(directory / name, content)
        manifest["files"][name] = file_sha256(directory / name)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory; FileNotFoundError without one, ValueError for another format."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {MANIFEST}; pass the directory written by `idengine train`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
                         f"{FORMAT} v<={FORMAT_VERSION}; upgrade idengine")
    return manifest


def verify_artifact(model_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every file matches its sha256 and none is pickle-capable (else ValueError)."""
    directory = Path(model_dir)
    manifest = read_manifest(directory)
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
    listed = set(manifest["files"])
    pickles = sorted(name for name in present if Path(name).suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{directory}: pickle-capable files {pickles}; idengine never loads them")
    if present != listed:
        raise ValueError(f"{directory}: files differ from {MANIFEST}: missing {sorted(listed - present)}, "
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
        (str(directory / BASE_DIR), None) if record.get("bundled") else (record["id"], record.get("revision"))
    # The head drawn here is overwritten below; build_model applies the backbone's pickle policy.
    base_cfg = dataclasses.replace(config.model, backbone=source, revision=revision, finetune="head",
                                   gradient_checkpointing=False)
    model = build_model(base_cfg, config.lora, labels.num_classes, dict(enumerate(labels.species)))
    if mode == "head":
        load_trainable_state(model, load_file(str(directory / HEAD_FILE)))
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
    config = load_config(directory / C.CONFIG_FILE)
    label_space = LabelSpace.from_json(directory / C.LABEL_MAP_FILE)
    calibration = json.loads((directory / CALIBRATION).read_text(encoding="utf-8"))
    if manifest["num_labels"] != label_space.num_classes:
        raise ValueError(f"{directory}: manifest says {manifest['num_labels']} labels, label_map.json "
                         f"{label_space.num_classes}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_model(directory, config, manifest, label_space, base_model).to(device).eval()
    log.info("loaded %s (%s, %d species) on %s", directory, manifest["finetune"], label_space.num_classes, device)
    return Artifact(model, load_tokenizer(str(directory)), label_space,
                    Calibrator.from_dict(calibration["calibrator"]), float(calibration["threshold"]), config,
                    manifest, device)
