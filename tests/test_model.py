"""Model: the tiny NT-architecture backbone in lora/full/head modes, from_pretrained on a directory, trainable state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_tiny import one_torch_thread, tiny_model_dir  # noqa: F401 (fixtures)
from idengine.config import LoraSettings, ModelConfig
from idengine.models.transformer import build_model, count_parameters, load_trainable_state, trainable_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LABELS = 5
ID2LABEL = {i: f"Species {i}" for i in range(N_LABELS)}
HIDDEN, LAYERS = 64, 2


def _build(backbone="tiny", finetune="lora", seed=0, r=8, dropout=0.0, **model_kwargs):
    cfg = ModelConfig(backbone=str(backbone), finetune=finetune, **model_kwargs)
    return build_model(cfg, LoraSettings(r=r, alpha=16, dropout=dropout), N_LABELS, ID2LABEL, seed=seed)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 4105, (4, 30), generator=g)
    ids[:, 0] = 3
    mask = torch.ones_like(ids)
    ids[1, 20:], mask[1, 20:] = 1, 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_exactly_the_adapters_and_the_head():
    model = _build()
    expected = {
        f"base_model.model.esm.encoder.layer.{layer}.attention.self.{target}.lora_{ab}.default.weight"
        for layer in range(LAYERS) for target in ("query", "key", "value") for ab in "AB"
    } | {f"base_model.model.classifier.modules_to_save.default.{lin}.{w}" for lin in ("dense", "out_proj")
         for w in ("weight", "bias")}
    assert _trainable_names(model) == expected
    trainable, total = count_parameters(model)
    head = HIDDEN * HIDDEN + HIDDEN + HIDDEN * N_LABELS + N_LABELS
    assert trainable == LAYERS * 3 * 8 * (HIDDEN + HIDDEN) + head
    assert total == count_parameters(_build(finetune="full"))[1] + trainable  # base + adapters + the head's copy
    assert model.config.id2label == ID2LABEL


@pytest.mark.parametrize("finetune", ["full", "head"])
def test_full_and_head_modes(finetune):
    model = _build(finetune=finetune)
    names = {n for n, _ in model.named_parameters()}
    if finetune == "full":
        # Everything but ESM's contact head, which the classification forward never uses (DDP would refuse it).
        assert _trainable_names(model) == {n for n in names if ".contact_head." not in n}
    else:
        assert _trainable_names(model) == {n for n in names if n.startswith("classifier.")}
        assert len(_trainable_names(model)) == 4
    assert _logits(model, _batch()).shape == (4, N_LABELS)


def test_from_pretrained_dir_gives_the_tiny_model(tiny_model_dir):
    assert {p.name for p in tiny_model_dir.iterdir()} == {"config.json", "model.safetensors", "vocab.txt",
                                                          "tokenizer_config.json"}
    from_dir, tiny = _build(tiny_model_dir), _build("tiny")
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    query = "esm.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(from_dir.base_model.model.esm.encoder.layer[1].attention.self.query.base_layer.weight,
                       saved[query])
    assert torch.equal(_logits(from_dir, _batch()), _logits(tiny, _batch()))


def test_head_is_new_and_seeded_base_is_fixed():
    a, b, c = _build(finetune="full", seed=0), _build(finetune="full", seed=0), _build(finetune="full", seed=1)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sa.items())
    for name, value in sa.items():
        new_draw = name.startswith("classifier.") and name.endswith("weight")
        assert torch.equal(value, sc[name]) != new_draw, name


def test_trainable_state_round_trip_reloads_identical_logits(tmp_path):
    trained = _build(seed=0)
    with torch.no_grad():  # stand-in for training: LoRA B starts at zero, so move every trainable tensor
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = trainable_state_dict(trained)
    assert set(state) == _trainable_names(trained)
    save_file(state, str(tmp_path / "adapter.safetensors"))
    fresh = _build(seed=1)
    batch = _batch()
    assert not torch.allclose(_logits(fresh, batch), _logits(trained, batch))
    load_trainable_state(fresh, load_file(str(tmp_path / "adapter.safetensors")))
    assert torch.equal(_logits(fresh, batch), _logits(trained, batch))


def test_load_trainable_state_is_strict():
    model = _build()
    state = trainable_state_dict(model)
    missing = dict(list(state.items())[1:])
    with pytest.raises(KeyError, match="missing"):
        load_trainable_state(model, missing)
    with pytest.raises(KeyError, match="unexpected"):
        load_trainable_state(model, {**state, "esm.embeddings.word_embeddings.weight": torch.zeros(1)})
    with pytest.raises(KeyError):  # e.g. an adapter saved with other target modules
        load_trainable_state(model, {k.replace(".query.", ".dense.", 1): v for k, v in state.items()})
    head = "base_model.model.classifier.modules_to_save.default.out_proj.bias"
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, {**state, head: torch.zeros(N_LABELS + 1)})


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(finetune):
    plain, checkpointed = _build(finetune=finetune), _build(finetune=finetune, gradient_checkpointing=True)
    batch, labels = _batch(), torch.tensor([0, 1, 2, 3])
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 16
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_lora_init_depends_on_the_seed_argument_only():
    torch.manual_seed(123)
    a = trainable_state_dict(_build(seed=0))
    torch.manual_seed(456)
    b, c = trainable_state_dict(_build(seed=0)), trainable_state_dict(_build(seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
