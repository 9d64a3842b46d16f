"""Step 11b, export: the trained model as one small, self-describing directory that plain transformers + peft can load.

Layout of a `lora` export (the default, "lightweight": megabytes, the base model is referenced, not copied):

    adapter_config.json        peft LoraConfig; base_model_name_or_path/revision name the base
    adapter_model.safetensors  LoRA weights + the classification head (peft modules_to_save)
    tokenizer_config.json, vocab.txt   the tokenizer (transformers save_pretrained)
    label_map.json             label -> species + taxonomy ranks (LabelSpace.to_json)
    calibration.json           calibrator (Calibrator.to_dict), species threshold, target precision, ranks
    config.yaml                the resolved idengine config
    metrics.json               cv mean/sd, test metrics, calibration and open-set reports (whatever the caller gives)
    L.README.md                  how to load it, with and without idengine
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
import json
import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from idengine import layout as L
from idengine.config import TINY_BACKBONE, Config
from idengine.config_io import save_config
from idengine.data.labels import LabelSpace
from idengine.deploy.artifact import FORMAT, FORMAT_VERSION, read_manifest
from idengine.evaluate.calibrate import Calibrator
from idengine.models.tiny import save_tiny_backbone
from idengine.models.transformer import trainable_state_dict, unwrap
from idengine.storage import building, file_sha256, write_json, write_text

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("idengine", "torch", "transformers", "peft", "safetensors", "ray", "numpy", "scikit-learn")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries an artifact depends on (None when one is not installed)."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in VERSIONED_PACKAGES}}


def _write_weights(tmp: Path, model: nn.Module, config: Config, merge: bool) -> None:
    """The trained weights in the mode's layout; the base goes in base/ only for the (tiny, random) `tiny` backbone."""
    mode = config.model.finetune
    if mode == "lora":
        model.save_pretrained(str(tmp), safe_serialization=True)
        _point_adapter_at_base(tmp / "adapter_config.json", config)
    elif mode == "full":
        model.save_pretrained(str(tmp), safe_serialization=True)
    else:
        save_file(trainable_state_dict(model), str(tmp / L.HEAD_FILE))
    if mode != "full" and config.model.backbone == TINY_BACKBONE:
        save_tiny_backbone(tmp / L.BASE_DIR)
    if merge and mode != "full":
        merged = copy.deepcopy(model)
        merged = merged.merge_and_unload() if mode == "lora" else merged
        merged.save_pretrained(str(tmp / L.MERGED_DIR), safe_serialization=True)
    elif merge:
        log.info("merge ignored: a full-finetune export already is the whole model")


def _point_adapter_at_base(path: Path, config: Config) -> None:
    """Make adapter_config.json name the base it adapts (the hub id + revision, or `base` for the tiny model)."""
    adapter = json.loads(path.read_text(encoding="utf-8"))
    tiny = config.model.backbone == TINY_BACKBONE
    adapter["base_model_name_or_path"] = L.BASE_DIR if tiny else config.model.backbone
    adapter["revision"] = None if tiny else config.model.revision
    write_json(path, adapter)


def _base_record(config: Config) -> dict[str, Any]:
    tiny = config.model.backbone == TINY_BACKBONE and config.model.finetune != "full"
    return {"id": L.BASE_DIR if tiny else config.model.backbone, "revision": None if tiny else config.model.revision,
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
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != L.MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": library_versions(), "base_model": _base_record(config), "finetune": config.model.finetune,
                "num_labels": label_space.num_classes, "max_tokens": config.model.max_tokens, "merged": merged,
                "files": {p.relative_to(directory).as_posix(): file_sha256(p) for p in files}}
    write_json(directory / L.MANIFEST, manifest)
    return manifest


def write_artifact(directory: Path, model: nn.Module, tokenizer, label_space: LabelSpace, config: Config,
                   calibrator: Calibrator, threshold: float, metrics: dict[str, Any], merge: bool = False,
                   extra_files: dict[str, str | Path] | None = None) -> dict[str, Any]:
    """Write an artifact's files into a staging directory (layout in the module docstring); returns the manifest.

    Args:
        directory: an empty staging directory; the caller renames it into place when everything is written.
        model, tokenizer: the trained model from build_model (possibly DDP-wrapped) and its tokenizer.
        label_space, config: the labels (with taxonomy) the head predicts; the resolved config it was trained with.
        calibrator, threshold: the calibration map and species threshold fitted on out-of-fold data.
        metrics: written as metrics.json (non-finite numbers become null).
        merge: also write merged/ (LoRA merged into the base: a full model, gigabytes for the real backbone).
        extra_files: relative name -> existing file to copy in (reports, plots); listed in the manifest too.

    Raises:
        ValueError: the head and label space differ, or an extra file is pickle-capable.
    """
    model = unwrap(model)
    if model.config.num_labels != label_space.num_classes:
        raise ValueError(f"model has {model.config.num_labels} labels, label space {label_space.num_classes}")
    _write_weights(directory, model, config, merge)
    tokenizer.save_pretrained(str(directory))
    label_space.to_json(directory / L.LABEL_MAP_FILE)
    write_json(directory / L.CALIBRATION, {
        "calibrator": calibrator.to_dict(), "threshold": float(threshold),
        "target_precision": config.calibrate.target_precision, "rank_fallback": config.calibrate.rank_fallback,
        "ranks": list(label_space.ranks)})
    save_config(config, directory / L.CONFIG_FILE)
    write_json(directory / L.METRICS_FILE, metrics)
    write_text(directory / L.README, _readme(config, label_space, threshold))
    for name, source in (extra_files or {}).items():
        if Path(name).suffix in L.PICKLE_SUFFIXES:
            raise ValueError(f"extra file {name}: pickle-capable formats are not allowed in an artifact")
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, directory / name)
    return _write_manifest(directory, config, label_space, merged=merge)


def export_artifact(out_dir: str | Path, model: nn.Module, tokenizer, label_space: LabelSpace, config: Config,
                    calibrator: Calibrator, threshold: float, metrics: dict[str, Any], merge: bool = False,
                    extra_files: dict[str, str | Path] | None = None) -> Path:
    """`write_artifact` into a staging directory that replaces out_dir only once complete (see `storage.building`)."""
    with building(out_dir) as tmp:
        write_artifact(tmp, model, tokenizer, label_space, config, calibrator, threshold, metrics, merge,
                       extra_files)
    log.info("exported %s (%d species) to %s", config.model.describe(), label_space.num_classes, out_dir)
    return Path(out_dir)


def update_artifact_files(model_dir: str | Path, files: dict[str, Any]) -> dict[str, Any]:
    """Write files (name -> str for text, else JSON) into an artifact still being built; updates the manifest."""
    directory = Path(model_dir)
    manifest = read_manifest(directory)
    for name, content in files.items():
        if isinstance(content, str):
            write_text(directory / name, content)
        else:
            write_json(directory / name, content)
        manifest["files"][name] = file_sha256(directory / name)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_json(directory / L.MANIFEST, manifest)
    return manifest
