"""Step 11c, export: the trained model as one small, self-describing directory that `idengine predict` (and, for a
transformer, plain transformers + peft) can load.

Layout (a `lora` transformer; the base model is referenced, not copied):

    adapter_config.json        peft LoraConfig; base_model_name_or_path/revision name the base
    adapter_model.safetensors  LoRA weights + the classification head (peft modules_to_save)
    tokenizer_config.json, vocab.txt   the tokenizer (transformers save_pretrained)
    classifier/                kmer_model.* (kind kmer-nb / kmer-linear) or probe.* (kind probe) instead of the adapter
    engine/                    the call: reference.parquet (every reference record: id, sequence, taxonomy),
                               decision.safetensors + decision.json, kmer/ (the k-mer evidence model), engine.json
                               (each rank's threshold, the index settings)
    label_map.json             label -> species + taxonomy ranks (LabelSpace.to_json)
    calibration.json           the classifier's calibrator (Calibrator.to_dict), its species threshold, ranks
    config.yaml                the resolved idengine config
    metrics.json, final_report.md, reliability.png   what `idengine train` measured
    README.md                  how to load it, with and without idengine
    idengine.json              manifest: versions, base model id + revision, kind, and the sha256 of every other file
    base/                      only for backbone `tiny`: the ~1 MB random base (config.json, model.safetensors, tokenizer)
    merged/                    only with merge=True: merge_and_unload() -> save_pretrained (safetensors)

`full` mode writes the whole model instead of the adapter (config.json + model.safetensors); `head` mode writes
`head.safetensors` (the classifier only). Everything is JSON, YAML, parquet or safetensors: nothing is ever written or
read with pickle. Loading the transformer without idengine (a `lora` export; use `DIR/base` as the base for `tiny`):

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

import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from idengine import layout as L
from idengine.config import Config
from idengine.config_io import save_config
from idengine.data.labels import LabelSpace
from idengine.deploy.artifact import ENGINE_DIR, FORMAT, FORMAT_VERSION, read_manifest
from idengine.deploy.classifiers import base_record, write_classifier
from idengine.evaluate.calibrate import Calibrator
from idengine.reference.engine import Engine, save_engine
from idengine.storage import building, file_sha256, write_json, write_text

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("idengine", "torch", "transformers", "peft", "safetensors", "ray", "numpy", "scikit-learn",
                      "parasail")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries an artifact depends on (None when one is not installed)."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in VERSIONED_PACKAGES}}


def _readme(config: Config, label_space: LabelSpace, engine: Engine | None) -> str:
    base = base_record(config)
    where = "" if base["id"] is None else \
        "; base model: " + ("`base/` in this directory" if base["bundled"] else f"`{base['id']}` (revision "
                                                                               f"`{base['revision']}`)")
    call = (f"The call comes from the engine (engine/): {engine.index.n_ref} reference records of "
            f"{len(engine.space.species)} species searched by alignment, this classifier's and a k-mer model's "
            "probabilities, and a decision model; each rank (species, genus, ..., novel) has its own threshold for "
            f"precision {config.calibrate.target_precision}." if engine is not None else
            f"The call is the classifier's: a species at calibrated probability >= the threshold in calibration.json "
            f"(target precision {config.calibrate.target_precision}), else the deepest rank whose summed probability "
            "passes it, else `unassigned`.")
    return (f"# idengine model\n\nClassifier over {label_space.num_classes} species: {config.model.describe()}{where}. "
            f"{call}\n\nUse: `idengine predict --model DIR --sequences reads.fasta.gz --out calls.csv`, or "
            "`idengine.deploy.artifact.load_artifact(DIR).calls(ids, sequences)`; a transformer without idengine: "
            "see the docstring of `idengine/deploy/export.py` (transformers + peft). `idengine.json` lists every "
            "file with its sha256; nothing here is a pickle.\n")


def _write_manifest(directory: Path, config: Config, label_space: LabelSpace, merged: bool) -> dict[str, Any]:
    """idengine.json: versions, base, kind and the sha256 of every other file (sorted relative paths)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != L.MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": library_versions(), "base_model": base_record(config), "kind": config.model.kind,
                "finetune": config.model.finetune, "num_labels": label_space.num_classes,
                "max_tokens": config.model.max_tokens, "merged": merged,
                "files": {p.relative_to(directory).as_posix(): file_sha256(p) for p in files}}
    write_json(directory / L.MANIFEST, manifest)
    return manifest


def write_artifact(directory: Path, classifier: Any, label_space: LabelSpace, config: Config, calibrator: Calibrator,
                   threshold: float, metrics: dict[str, Any], engine: Engine | None = None, merge: bool = False,
                   extra_files: dict[str, str | Path] | None = None) -> dict[str, Any]:
    """Write an artifact's files into a staging directory (layout in the module docstring); returns the manifest.

    Args:
        directory: an empty staging directory; the caller renames it into place when everything is written.
        classifier: the trained classifier (deploy/classifiers.py: TransformerClassifier, ProbeClassifier or
            KmerClassifier).
        label_space, config: the labels (with taxonomy) the classifier predicts; the resolved config.
        calibrator, threshold: the classifier's calibration map and species threshold, fitted on out-of-fold data.
        metrics: written as metrics.json (non-finite numbers become null).
        engine: the engine making the call (None: the classifier's calls).
        merge: also write merged/ (LoRA merged into the base: a full model, gigabytes for the real backbone).
        extra_files: relative name -> existing file to copy in (reports, plots); listed in the manifest too.

    Raises:
        ValueError: an extra file is pickle-capable.
    """
    write_classifier(directory, classifier, config, merge)
    if engine is not None:
        save_engine(engine, directory / ENGINE_DIR)
    label_space.to_json(directory / L.LABEL_MAP_FILE)
    write_json(directory / L.CALIBRATION, {
        "calibrator": calibrator.to_dict(), "threshold": float(threshold),
        "target_precision": config.calibrate.target_precision, "rank_fallback": config.calibrate.rank_fallback,
        "ranks": list(label_space.ranks), "engine_thresholds": None if engine is None else engine.thresholds})
    save_config(config, directory / L.CONFIG_FILE)
    write_json(directory / L.METRICS_FILE, metrics)
    write_text(directory / L.README, _readme(config, label_space, engine))
    for name, source in (extra_files or {}).items():
        if Path(name).suffix in L.PICKLE_SUFFIXES:
            raise ValueError(f"extra file {name}: pickle-capable formats are not allowed in an artifact")
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, directory / name)
    return _write_manifest(directory, config, label_space, merged=merge)


def export_artifact(out_dir: str | Path, classifier: Any, label_space: LabelSpace, config: Config,
                    calibrator: Calibrator, threshold: float, metrics: dict[str, Any], engine: Engine | None = None,
                    merge: bool = False, extra_files: dict[str, str | Path] | None = None) -> Path:
    """`write_artifact` into a staging directory that replaces out_dir only once complete (see `storage.building`)."""
    with building(out_dir) as tmp:
        write_artifact(tmp, classifier, label_space, config, calibrator, threshold, metrics, engine, merge,
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
