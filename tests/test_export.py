"""Export: export -> load gives identical probabilities, exactly the expected files, no pickle, loadable by peft alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from idengine.evaluate.calibrate import Calibrator
from idengine.config import Config, ModelConfig
from idengine.data.fasta import read_fasta
from idengine.data.labels import LabelSpace
from idengine.deploy.artifact import clean_for_model, load_artifact, verify_artifact
from idengine.models.inference import sequence_logits as model_logits
from idengine.deploy.classifiers import TransformerClassifier
from idengine.deploy.export import export_artifact
from idengine.layout import PICKLE_SUFFIXES
from idengine.storage import file_sha256

DATA = Path(__file__).parent / "data"
TOKENIZER_FILES = {"tokenizer_config.json", "vocab.txt"}
COMMON_FILES = {"label_map.json", "calibration.json", "config.yaml", "metrics.json", "README.md", "idengine.json",
                *TOKENIZER_FILES}
BASE_FILES = {"base/config.json", "base/model.safetensors", *(f"base/{f}" for f in TOKENIZER_FILES)}
MAX_TOKENS = 128


def real_label_space(n_species: int = 6) -> LabelSpace:
    """The n most frequent species of the real 12S test sample, with their taxonomy."""
    labels = pd.read_csv(DATA / "12s_sample_labels.csv")
    top = labels["species"].value_counts().index[:n_species]
    ranks = ("family", "genus")
    return LabelSpace.from_records(labels[labels["species"].isin(top)], ranks)


def real_sequences(n: int = 24) -> list[str]:
    """Raw (uncleaned) sequences of the real sample, some with IUPAC codes, plus a lower-case and an RNA copy."""
    seqs = read_fasta(DATA / "12s_sample.fasta.gz")[0]["sequence"].tolist()
    with_iupac = [s for s in seqs if re.search("[^ACGT]", s)]
    chosen = seqs[:n] + with_iupac[:3]
    return chosen + [chosen[0].lower(), chosen[1].replace("T", "U")]


def tiny_config(finetune: str = "lora") -> Config:
    return Config(model=ModelConfig(backbone="tiny", finetune=finetune, max_tokens=MAX_TOKENS))


def trained_like_model(config: Config, labels: LabelSpace, seed: int = 1) -> torch.nn.Module:
    """The tiny model with seeded non-zero trainable weights: LoRA B starts at zero, so the adapter must matter."""
    from idengine.models.transformer import build_model

    model = build_model(config.model, config.lora, labels.num_classes, dict(enumerate(labels.species)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


def make_artifact(out_dir: Path, finetune: str = "lora", merge: bool = False, threshold: float = 0.5,
                  config: Config | None = None):
    """Export a tiny model over real species; returns (directory, model, tokenizer, calibrator)."""
    from idengine.data.tokenize import load_tokenizer

    config = config or tiny_config(finetune)
    labels = real_label_space()
    model = trained_like_model(config, labels)
    tokenizer = load_tokenizer("tiny")
    calibrator = Calibrator("temperature", 1.7)
    metrics = {"test": {"top1_acc": 0.5, "log_loss": float("nan")}}
    classifier = TransformerClassifier(model, tokenizer, config.model.max_tokens)
    directory = export_artifact(out_dir, classifier, labels, config, calibrator, threshold, metrics, merge=merge)
    return directory, model, tokenizer, calibrator


def relative_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("export") / "model", merge=True)


def test_export_then_load_gives_identical_probabilities(lora_export):
    directory, model, tokenizer, calibrator = lora_export
    seqs = real_sequences()
    expected = calibrator.apply(model_logits(model, tokenizer, clean_for_model(seqs, tiny_config()), MAX_TOKENS))
    artifact = load_artifact(directory)
    got = artifact.probabilities(seqs)
    assert np.array_equal(got, expected)
    assert np.allclose(got.sum(axis=1), 1.0)
    assert artifact.threshold == 0.5 and artifact.calibrator.temperature == 1.7
    assert artifact.label_space == real_label_space()
    assert not artifact.model.training
    # The adapter is really applied: the same base + head without LoRA gives other logits.
    with artifact.model.disable_adapter():
        plain = model_logits(artifact.model, tokenizer, clean_for_model(seqs, tiny_config()), MAX_TOKENS)
    assert np.abs(plain - artifact.logits(seqs)).max() > 1e-3


def test_export_holds_exactly_the_expected_files_and_no_pickle(lora_export):
    directory = lora_export[0]
    merged = {"merged/config.json", "merged/model.safetensors"}
    expected = COMMON_FILES | BASE_FILES | merged | {"adapter_config.json", "adapter_model.safetensors"}
    assert relative_files(directory) == expected
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    from safetensors.torch import load_file

    for name in expected:  # every file is safetensors (it parses) or UTF-8 text: nothing can hold a pickle
        assert Path(name).suffix not in PICKLE_SUFFIXES
        if name.endswith(".safetensors"):
            assert load_file(str(directory / name))
        else:
            (directory / name).read_bytes().decode("utf-8")
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    assert (directory / "adapter_model.safetensors").stat().st_size < 1_000_000  # the adapter only, not the base


def test_manifest_records_sha256_versions_and_base(lora_export):
    directory = lora_export[0]
    manifest = verify_artifact(directory)
    assert set(manifest["files"]) == relative_files(directory) - {"idengine.json"}
    for name, digest in manifest["files"].items():
        assert file_sha256(directory / name) == digest
    assert manifest["finetune"] == "lora" and manifest["num_labels"] == 6 and manifest["max_tokens"] == MAX_TOKENS
    assert manifest["base_model"] == {"id": "base", "revision": None, "backbone": "tiny", "bundled": True}
    assert {"torch", "transformers", "peft", "ray", "idengine"} <= set(manifest["versions"])
    assert json.loads((directory / "metrics.json").read_text())["test"]["log_loss"] is None  # strict JSON
    calibration = json.loads((directory / "calibration.json").read_text())
    assert calibration["ranks"] == ["family", "genus"] and calibration["target_precision"] == 0.95


def test_altered_or_extra_files_are_refused(tmp_path):
    directory = make_artifact(tmp_path / "model")[0]
    (directory / "label_map.json").write_text((directory / "label_map.json").read_text().replace("Thryssa", "Thrysa"))
    with pytest.raises(ValueError, match="sha256 mismatch.*label_map.json"):
        load_artifact(directory)
    directory = make_artifact(tmp_path / "model2")[0]
    torch.save({"x": 1}, directory / "extra.pt")
    with pytest.raises(ValueError, match="pickle"):
        verify_artifact(directory)


def test_plain_transformers_and_peft_reproduce_the_logits(lora_export):
    """The loading snippet of the export.py docstring, with no idengine import in the loading path."""
    from peft import PeftModel
    from transformers import AutoTokenizer, EsmForSequenceClassification

    directory, model, tokenizer, _ = lora_export
    seqs = real_sequences()
    labels = json.loads((directory / "label_map.json").read_text())["labels"]
    id2label = {e["label"]: e["species"] for e in labels}
    base = EsmForSequenceClassification.from_pretrained(directory / "base", num_labels=len(id2label), id2label=id2label)
    plain = PeftModel.from_pretrained(base, directory).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(directory)
    cleaned = [re.sub("[^ACGT]", "N", s.upper().replace("U", "T")) for s in seqs]
    batch = plain_tokenizer(cleaned, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS)
    with torch.no_grad():
        logits = plain(**batch).logits.numpy()
    np.testing.assert_allclose(logits, model_logits(model, tokenizer, cleaned, MAX_TOKENS), atol=1e-5)
    merged = EsmForSequenceClassification.from_pretrained(directory / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(**batch).logits.numpy(), logits, atol=1e-4)


@pytest.mark.parametrize("finetune, weights", [("full", {"config.json", "model.safetensors"}),
                                               ("head", {"head.safetensors"} | BASE_FILES)])
def test_full_and_head_exports_round_trip(tmp_path, finetune, weights):
    directory, model, tokenizer, calibrator = make_artifact(tmp_path / "model", finetune=finetune)
    assert relative_files(directory) == COMMON_FILES | weights
    seqs = real_sequences(8)
    expected = calibrator.apply(model_logits(model, tokenizer, clean_for_model(seqs, tiny_config()), MAX_TOKENS))
    assert np.array_equal(load_artifact(directory).probabilities(seqs), expected)


def test_export_replaces_an_old_artifact_only_when_complete(tmp_path):
    directory = make_artifact(tmp_path / "model", threshold=0.5)[0]
    before = verify_artifact(directory)["files"]
    labels = real_label_space()
    config = tiny_config()
    with pytest.raises(ValueError, match="pickle"):
        export_artifact(directory, TransformerClassifier(trained_like_model(config, labels, seed=2), load_tokenizer_tiny(),
                                                         MAX_TOKENS), labels, config,
                        Calibrator("none"), 0.9, {}, extra_files={"notes.pkl": directory / "README.md"})
    assert verify_artifact(directory)["files"] == before  # the old artifact is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left behind
    make_artifact(directory, threshold=0.7)
    assert load_artifact(directory).threshold == 0.7


def test_bad_sequences_raise_a_clear_error(lora_export):
    artifact = load_artifact(lora_export[0])
    with pytest.raises(ValueError, match="sequence #1 cannot be scored \(invalid_characters: not nucleotides/IUPAC/gaps: 'X'"):
        artifact.probabilities(["ACGT" * 20, "ACGX" * 20])


def load_tokenizer_tiny():
    from idengine.data.tokenize import load_tokenizer

    return load_tokenizer("tiny")
