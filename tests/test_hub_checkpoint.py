"""The hub loading route at CI size: a tiny checkpoint laid out as the hub cache holds the published 2.5B NT (pickled
`.bin` shards + index, refs/main, tokenizer), loaded offline through the trusted hub id, trained one step, exported
and reloaded; an untrusted id with the same files is refused; and `model.base_dtype` (a half base, fp32 LoRA + head).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from idengine.config import DEFAULT_BACKBONE, Config, LoraSettings, ModelConfig, TrainConfig
from idengine.errors import InputError
from idengine.models.tiny import tiny_masked_lm
from idengine.models.transformer import build_model, half_base_dtype, pickled_weight_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from hub_checkpoint import REVISION, repo_dir, write_hub_checkpoint  # noqa: E402

UNTRUSTED = "someone/nt-pickles-only"
QUERY = "esm.encoder.layer.0.attention.self.query"
ID2LABEL = {0: "Lutjanus kasmira", 1: "Thunnus albacares", 2: "Thunnus thynnus"}  # LabelSpace order


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A throwaway HF cache, offline, holding the tiny model under the trusted id and under an untrusted one."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    model = tiny_masked_lm()
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for repo in (DEFAULT_BACKBONE, UNTRUSTED):  # two shards, as the published checkpoint has
        write_hub_checkpoint(cache, repo, model, max_shard_bytes=int(total * 0.8))
    # huggingface_hub reads these at import, so setting the environment alone would come too late
    for name, value in {"HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def hub_config(backbone: str = DEFAULT_BACKBONE, **model) -> Config:
    return Config(model=ModelConfig(backbone=backbone, finetune="lora", max_tokens=64, **model),
                  train=TrainConfig(epochs=1, batch_size=8, patience=0, train_eval_size=8, lr=1e-2,
                                    warmup_fraction=0.0, scheduler="constant"))


def token_rows(records_12s, tokenizer, n: int = 8, skip: int = 0) -> dict[str, np.ndarray]:
    from fixtures_tiny import labelled_tokens

    return labelled_tokens(records_12s, tokenizer, n_species=len(ID2LABEL), per_species=n // len(ID2LABEL) + 1,
                           max_tokens=64, skip=skip)


def test_hub_layout_is_the_published_one(hub_cache):
    root = repo_dir(hub_cache, DEFAULT_BACKBONE)
    snapshot = root / "snapshots" / REVISION
    assert (root / "refs" / "main").read_text() == REVISION
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json", "tokenizer_config.json", "vocab.txt"]
    assert pickled_weight_files(DEFAULT_BACKBONE) == ["pytorch_model.bin.index.json"]


def test_trusted_hub_id_loads_offline_trains_exports_and_reloads(hub_cache, records_12s, tmp_path, one_torch_thread):
    from idengine.data.labels import LabelSpace
    from idengine.data.tokenize import load_tokenizer
    from idengine.deploy.artifact import load_artifact
    from idengine.deploy.classifiers import TransformerClassifier
    from idengine.deploy.export import export_artifact
    from idengine.evaluate.calibrate import Calibrator
    from idengine.evaluate.metrics import score_logits
    from idengine.train.loop import local_train_data, train_local

    config = hub_config()
    tokenizer = load_tokenizer(DEFAULT_BACKBONE)  # from the snapshot, offline
    model = build_model(config.model, config.lora, len(ID2LABEL), ID2LABEL, seed=1)
    loaded = dict(model.named_parameters())[f"base_model.model.{QUERY}.base_layer.weight"]
    torch.testing.assert_close(loaded, tiny_masked_lm().state_dict()[f"{QUERY}.weight"])  # the shards' weights, not a fresh init
    rows = token_rows(records_12s, tokenizer)
    data = local_train_data(rows, rows, config.train, len(ID2LABEL))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    outcome = train_local(model, data, config.train, score_logits, torch.device("cpu"))
    assert [h["epoch"] for h in outcome.state.history] == [1] and np.isfinite(outcome.state.history[0]["loss"])
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    labels = LabelSpace.from_records(pd.DataFrame({"species": list(ID2LABEL.values())}))
    classifier = TransformerClassifier(model, tokenizer, config.model.max_tokens)
    out = export_artifact(tmp_path / "model", classifier, labels, config, Calibrator("temperature", 1.0), 0.5, {})
    manifest = json.loads((out / "idengine.json").read_text())
    assert manifest["base_model"]["id"] == DEFAULT_BACKBONE and not manifest["base_model"]["bundled"]
    assert not any(name.endswith(".bin") or name.startswith("base/") for name in manifest["files"])
    artifact = load_artifact(out, device="cpu")  # the base comes back through the hub id, offline
    expected = model.eval()(input_ids=torch.tensor(rows["input_ids"][:1].tolist()),
                            attention_mask=torch.ones(1, len(rows["input_ids"][0]), dtype=torch.long)).logits
    reloaded = artifact.model(input_ids=torch.tensor(rows["input_ids"][:1].tolist()),
                              attention_mask=torch.ones(1, len(rows["input_ids"][0]), dtype=torch.long)).logits
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)


def test_untrusted_hub_id_with_only_pickles_is_refused_with_what_to_do(hub_cache, tmp_path, monkeypatch):
    config = hub_config(UNTRUSTED)
    with pytest.raises(InputError) as err:
        build_model(config.model, config.lora, len(ID2LABEL), ID2LABEL)
    message = str(err.value)
    for why in ("pickled", "safetensors", "loads no pickle it did not write", DEFAULT_BACKBONE, UNTRUSTED):
        assert why in message
    # The same files as a local directory are refused the same way.
    snapshot = repo_dir(hub_cache, UNTRUSTED) / "snapshots" / REVISION
    with pytest.raises(InputError, match="pickled PyTorch weights only"):
        build_model(dataclasses.replace(config.model, backbone=str(snapshot)), config.lora, 3, ID2LABEL)
    # What to do works: the conversion lines the message gives make a checkpoint idengine loads.
    code = re.search(r'python -c "(.+?)"\n', message).group(1)
    monkeypatch.chdir(tmp_path)
    exec(code, {})  # noqa: S102 - the message's own instructions, on the test's own files
    converted = tmp_path / "nt-safetensors"
    assert (converted / "model.safetensors").is_file() and not list(converted.glob("*.bin"))
    model = build_model(dataclasses.replace(config.model, backbone=str(converted)), config.lora, 3, ID2LABEL)
    weight = dict(model.named_parameters())[f"base_model.model.{QUERY}.base_layer.weight"]
    torch.testing.assert_close(weight, tiny_masked_lm().state_dict()[f"{QUERY}.weight"])


def test_a_missing_checkpoint_keeps_transformers_own_error(hub_cache):
    config = hub_config("someone/not-in-the-cache")
    with pytest.raises(OSError):
        build_model(config.model, config.lora, 3, ID2LABEL)


@pytest.mark.parametrize("base_dtype", ["bf16", "fp16"])
def test_half_base_keeps_lora_and_head_fp32_and_trains_only_them(base_dtype, records_12s, nt_tokenizer,
                                                                 one_torch_thread):
    from idengine.train.loop import build_optimizer, build_scheduler, grad_scaler_for, local_train_data, train_epoch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[base_dtype]
    config = hub_config("tiny", base_dtype=base_dtype, gradient_checkpointing=True)
    model = build_model(config.model, LoraSettings(r=4), len(ID2LABEL), ID2LABEL, seed=1)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert half_base_dtype(model) == half
    assert {p.dtype for n, p in frozen.items() if ".original_module." not in n} == {half}
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert any("lora_A" in n for n in trained) and any("modules_to_save" in n and "classifier" in n for n in trained)
    assert all("lora_" in n or "modules_to_save" in n for n in trained)

    device = torch.device("cpu")
    scaler = grad_scaler_for(model, None, device)  # no autocast on a CPU: the half base alone decides
    assert (scaler is not None) == (half == torch.float16)
    data = local_train_data(token_rows(records_12s, nt_tokenizer), token_rows(records_12s, nt_tokenizer),
                            config.train, len(ID2LABEL))
    optimizer = build_optimizer(model, config.train)
    scheduler = build_scheduler(optimizer, config.train, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = train_epoch(model, data.train_batches(0), optimizer, scheduler, config.train, None, device, None,
                        scaler, max_steps=1)
    assert stats["steps"] == 1 and np.isfinite(stats["loss"])
    after = dict(model.named_parameters())
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(trained)
    assert all(torch.isfinite(p).all() for p in trained.values())


def test_half_base_logits_stay_close_to_fp32(records_12s, nt_tokenizer, one_torch_thread):
    from idengine.models.inference import classifier_logits

    rows = list(token_rows(records_12s, nt_tokenizer)["input_ids"])
    logits = {}
    for base_dtype in ("fp32", "bf16"):
        config = hub_config("tiny", base_dtype=base_dtype)
        model = build_model(config.model, config.lora, len(ID2LABEL), ID2LABEL, seed=1)
        logits[base_dtype] = classifier_logits(model, rows, batch_size=4)
    assert logits["bf16"].dtype == np.float32 and np.isfinite(logits["bf16"]).all()
    np.testing.assert_allclose(logits["bf16"], logits["fp32"], atol=0.05)


def test_full_finetune_over_a_half_base_is_refused():
    with pytest.raises(InputError, match="base_dtype=bf16"):
        build_model(ModelConfig(backbone="tiny", finetune="full", base_dtype="bf16"), LoraSettings(), 3, ID2LABEL)


def test_a_half_base_on_a_cpu_warns_that_it_is_slow(caplog):
    from idengine.train.loop import warn_half_base_on_cpu

    for base_dtype in ("fp32", "bf16"):
        model = build_model(ModelConfig(backbone="tiny", base_dtype=base_dtype), LoraSettings(r=4), 3, ID2LABEL)
        with caplog.at_level("WARNING", logger="idengine.train.loop"):
            warn_half_base_on_cpu(model, torch.device("cpu"))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["model.base_dtype=bf16 on a CPU"]
