"""Training loop on the tiny model and real 12S records: the loss, what changes, over-fitting, accumulation, early
stopping, checkpoints and resume."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fixtures_tiny import labelled_tokens, nt_tokenizer, one_torch_thread, records_12s  # noqa: F401 (fixtures)
from idengine.config import LoraSettings, ModelConfig, TrainConfig
from idengine.data.tokenize import PAD_ID, collate
from idengine.models.transformer import build_model, trainable_state_dict
from idengine.layout import CHECKPOINT_FILES, CKPT_BEST_LOGITS, CKPT_STATE
from idengine.train.loop import (
    build_optimizer,
    build_scheduler,
    class_weights,
    local_train_data,
    predict_logits,
    run_training,
    train_epoch,
    weighted_cross_entropy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
N_CLASSES = 4


@pytest.fixture(scope="module")
def fold(records_12s, nt_tokenizer):
    """32 training and 16 validation records of the 4 largest species, at most 64 tokens each."""
    train = labelled_tokens(records_12s, nt_tokenizer, N_CLASSES, 8, max_tokens=64)
    val = labelled_tokens(records_12s, nt_tokenizer, N_CLASSES, 4, max_tokens=64, skip=8)
    assert not set(train["id"]) & set(val["id"])
    return train, val


def _model(finetune="lora", dropout=0.0, seed=0):
    return build_model(ModelConfig(backbone="tiny", finetune=finetune), LoraSettings(r=8, alpha=16, dropout=dropout),
                       N_CLASSES, {i: f"sp{i}" for i in range(N_CLASSES)}, seed=seed)


def _cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=5e-3, warmup_fraction=0.0, patience=0, monitor="acc", train_eval_size=32)
    return TrainConfig(**{**base, **kw})


def _batch(table, rows):
    return collate({"input_ids": table["input_ids"][rows], "label": table["label"][rows]}, PAD_ID)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"acc": float((logits.argmax(1) == labels).mean()), "n": float(len(labels))}


def test_class_weights_by_hand():
    labels = np.array([0, 0, 0, 1, 2, 2])  # counts 3, 1, 2 and class 3 absent
    assert class_weights(labels, 4, "none", 0.9) is None
    inverse = np.array([1 / 3, 1, 1 / 2])
    expected = np.append(inverse / inverse.mean(), 1.0)
    assert np.allclose(class_weights(labels, 4, "inverse", 0.9).numpy(), expected)
    effective = np.array([0.1 / (1 - 0.9**3), 0.1 / 0.1, 0.1 / (1 - 0.9**2)])  # (1-b)/(1-b^n)
    expected = np.append(effective / effective.mean(), 1.0)
    got = class_weights(labels, 4, "effective", 0.9)
    assert got.dtype == torch.float32 and np.allclose(got.numpy(), expected)
    assert np.isclose(got[:3].mean().item(), 1.0)
    with pytest.raises(ValueError):
        class_weights(labels, 4, "sqrt", 0.9)


def test_training_loss_is_the_explicit_weighted_cross_entropy(fold):
    train, _ = fold
    model, cfg = _model(), _cfg()
    batch = _batch(train, np.arange(0, 32, 2))
    weights = torch.tensor([0.5, 2.0, 1.0, 1.5])
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    explicit = F.cross_entropy(logits, batch["labels"], weight=weights).item()
    nll = -torch.log_softmax(logits, 1)[torch.arange(16), batch["labels"]]
    w = weights[batch["labels"]]
    assert math.isclose(explicit, ((w * nll).sum() / w.sum()).item(), rel_tol=1e-6)
    assert math.isclose(weighted_cross_entropy(logits, batch["labels"], weights).item(), explicit, rel_tol=1e-6)
    optimizer = build_optimizer(model, cfg)
    stats = train_epoch(model, [batch], optimizer, build_scheduler(optimizer, cfg, 1), cfg, weights, CPU, None)
    assert math.isclose(stats["loss"], explicit, rel_tol=1e-6)
    assert (stats["sequences"], stats["steps"]) == (16, 1)
    assert stats["tokens"] == int(batch["attention_mask"].sum())


def test_only_adapter_and_head_parameters_change(fold):
    train, _ = fold
    model, cfg = _model(), _cfg(lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, cfg)
    batches = [_batch(train, np.arange(0, 16)), _batch(train, np.arange(16, 32))]  # 2 steps: lora_A moves once B has
    train_epoch(model, batches, optimizer, build_scheduler(optimizer, cfg, 2), cfg, None, CPU, None)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable), name
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)


def test_gradient_accumulation_equals_the_full_batch(fold):
    train, _ = fold
    rows = np.arange(0, 32, 2)
    updated = []
    for accum, batches in ((1, [_batch(train, rows)]), (2, [_batch(train, rows[:8]), _batch(train, rows[8:])])):
        model, cfg = _model(finetune="head"), _cfg(grad_accum_steps=accum)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)  # SGD: unlike Adam, a wrong loss scale shows in the update
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stats = train_epoch(model, batches, optimizer, scheduler, cfg, None, CPU, None)
        assert stats["steps"] == 1
        updated.append(torch.cat([p.detach().flatten() for p in params]))
    assert torch.allclose(updated[0], updated[1], atol=1e-6)


def test_loss_falls_when_overfitting_32_examples(fold):
    train, _ = fold
    model, cfg = _model(), _cfg(lr=1e-2, batch_size=32, scheduler="constant", weight_decay=0.0)
    data = local_train_data(train, train, cfg, N_CLASSES)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 30)
    losses = [train_epoch(model, data.train_batches(e), optimizer, scheduler, cfg, None, CPU, None)["loss"]
              for e in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    logits, labels = predict_logits(model, data.eval_batches(), CPU, None)
    assert accuracy(logits, labels)["acc"] == 1.0


def test_early_stopping_after_patience_epochs(fold, tmp_path):
    train, val = fold
    val_scores = iter([0.1, 0.5, 0.4, 0.45, 0.3, 0.9, 1.0])

    def score(logits, labels):  # validation (16 rows) follows a fixed sequence; the training sample scores 1
        return {"acc": next(val_scores) if len(labels) == 16 else 1.0}

    reports = []

    def report(metrics, directory):
        reports.append(metrics)
        shutil.copytree(directory, tmp_path / f"epoch{metrics['epoch']}")

    model, cfg = _model(), _cfg(epochs=7, patience=3)
    outcome = run_training(model, local_train_data(train, val, cfg, N_CLASSES), cfg, score, CPU, report)
    state = outcome.state
    assert (state.epoch, state.best_epoch, state.best_score, state.epochs_since_best) == (5, 2, 0.5, 3)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5] and len(state.history) == 5
    assert [r["gap_acc"] for r in reports] == pytest.approx([0.9, 0.5, 0.6, 0.55, 0.7])
    # The model ends holding epoch 2's weights, and its validation logits are the ones kept.
    epoch2 = load_file(str(tmp_path / "epoch2" / "trainable.safetensors"))
    final = trainable_state_dict(model)
    assert final.keys() == epoch2.keys() and all(torch.equal(final[k], epoch2[k]) for k in final)
    logits, labels = predict_logits(model, local_train_data(train, val, cfg, N_CLASSES).eval_batches(), CPU, None)
    assert np.array_equal(logits, outcome.best_eval_logits) and np.array_equal(labels, outcome.eval_labels)


def test_checkpoint_holds_only_trainable_weights_and_resume_replays_the_run(fold, tmp_path):
    train, val = fold
    cfg = _cfg(epochs=3, grad_accum_steps=2, class_weighting="inverse")
    kept = {}

    def keep(metrics, directory):
        kept[metrics["epoch"]] = shutil.copytree(directory, tmp_path / f"epoch{metrics['epoch']}")

    data = local_train_data(train, val, cfg, N_CLASSES)
    full_run = run_training(_model(dropout=0.1), data, cfg, accuracy, CPU, keep)
    ckpt = kept[1]
    assert {p.name for p in ckpt.iterdir()} == set(CHECKPOINT_FILES)
    model = _model(dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(load_file(str(ckpt / "trainable.safetensors"))) == trainable  # adapter + head, no base weight
    assert json.loads((ckpt / CKPT_STATE).read_text())["epoch"] == 1
    assert np.load(ckpt / CKPT_BEST_LOGITS, allow_pickle=False).shape == (16, N_CLASSES)

    resumed_reports = []
    resumed = run_training(model, data, cfg, accuracy, CPU, lambda m, d: resumed_reports.append(m), resume_dir=ckpt)
    assert [r["epoch"] for r in resumed_reports] == [2, 3]
    for key in ("loss", "acc", "train_acc", "best_epoch"):
        assert [h[key] for h in resumed.state.history] == pytest.approx([h[key] for h in full_run.state.history])
    assert resumed.state.best_epoch == full_run.state.best_epoch
    assert np.allclose(resumed.best_eval_logits, full_run.best_eval_logits, atol=1e-6)
    assert all(torch.allclose(resumed.best_state[k], full_run.best_state[k], atol=1e-6) for k in trainable)


def test_workers_other_than_the_chief_report_without_checkpoint(fold):
    train, val = fold
    cfg = _cfg(epochs=2)
    seen = []
    run_training(_model(), local_train_data(train, val, cfg, N_CLASSES), cfg, accuracy, CPU,
             lambda m, d: seen.append((m["epoch"], d)), is_chief=False)
    assert seen == [(1, None), (2, None)]


def test_scheduler_warms_up_then_decays():
    model = _model(finetune="head")
    for name, last in (("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)):
        cfg = _cfg(lr=1.0, scheduler=name, warmup_fraction=0.2)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, total_steps=10)
        lrs = []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0]) and lrs[-1] <= 1.0
        assert optimizer.param_groups[0]["lr"] == pytest.approx(last)


def test_no_weight_decay_on_biases_and_norms():
    model = _model(finetune="full")
    optimizer = build_optimizer(model, _cfg(weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"bias", "weight"}
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)].lower() for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_a_ddp_wrapped_model_trains_and_checkpoints_unprefixed_names(fold, tmp_path):
    import torch.distributed as dist

    train, val = fold
    cfg = _cfg(epochs=2, grad_accum_steps=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model()
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        kept = []
        outcome = run_training(ddp, local_train_data(train, val, cfg, N_CLASSES), cfg, accuracy, CPU,
                           lambda m, d: kept.append(set(load_file(str(d / "trainable.safetensors")))))
    finally:
        dist.destroy_process_group()
    assert kept == [names, names] and set(outcome.best_state) == names
    assert outcome.state.epoch == 2 and all(math.isfinite(h["loss"]) for h in outcome.state.history)


def test_cpu_runs_in_fp32_whatever_the_precision():
    from idengine.models.inference import autocast_dtype_for

    assert {autocast_dtype_for(_cfg(precision=p).precision, CPU) for p in ("auto", "bf16", "fp16", "fp32")} == {None}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_fold_trains_under_autocast_on_a_gpu(fold, precision):
    from idengine.models.inference import autocast_dtype_for
    from idengine.train.loop import train_local

    train, val = fold
    cfg = _cfg(epochs=2, precision=precision, lr=1e-2)
    cuda = torch.device("cuda")
    assert autocast_dtype_for(cfg.precision, cuda) == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    outcome = train_local(_model(), local_train_data(train, val, cfg, N_CLASSES), cfg, accuracy, cuda)
    assert all(math.isfinite(h["loss"]) for h in outcome.state.history)
    assert outcome.best_eval_logits.dtype == np.float32 and outcome.best_eval_logits.shape == (16, N_CLASSES)
    assert all(t.device.type == "cpu" for t in outcome.best_state.values())
