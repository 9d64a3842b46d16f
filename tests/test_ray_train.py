"""One fold as a Ray Train run: checkpoints reload to the reported logits, a dead worker resumes, DDP on 2 workers,
and the final-model mode that scores the test split once."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_test_config
from safetensors.torch import load_file

from idengine import layout as C
from idengine.data.prepared import read_prepared
from idengine.features.tokens import tokenized_table
from idengine.data.tokenize import load_tokenizer
from idengine.models.transformer import build_model, load_trainable_state
from idengine.train.loop import predict_logits
from idengine.evaluate.metrics import score_logits
from idengine.train.ray_train import InjectedFault, fit_final, fit_fold, shard_batches, split_tokens

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def example(ray_session, prepared_example, tmp_path_factory):
    config = tiny_test_config(tmp_path_factory.mktemp("tok"))
    records, labels = read_prepared(prepared_example)
    return tokenized_table(prepared_example, config), labels


def _fit(tmp_path, example, fold="0", *overrides, fault=None, name="run"):
    tokens, labels = example
    config = tiny_test_config(tmp_path, *overrides)
    id2label = dict(enumerate(labels.species))
    if fold == C.TEST_FOLD:
        return config, fit_final(config, tokens, id2label, score_logits, name)
    return config, fit_fold(config, tokens, fold, id2label, score_logits, name, fault=fault)


def _logits_from_checkpoint(config, run, labels, val_table):
    """Rebuild the model from the checkpoint's weights alone and score the validation rows without Ray."""
    import ray.train

    model = build_model(config.model, config.lora, labels.num_classes, dict(enumerate(labels.species)))
    with ray.train.Checkpoint(run.checkpoint_path).as_directory() as ckpt:
        load_trainable_state(model, load_file(f"{ckpt}/{C.CKPT_BEST}"))
    pad = load_tokenizer("tiny").pad_token_id
    import ray.data

    batches = shard_batches(ray.data.from_arrow(val_table.select([C.INPUT_IDS, C.LABEL])).iterator(), 32, pad)
    logits, labels_out = predict_logits(model.eval(), batches, torch.device("cpu"), None)
    return logits, labels_out


def test_checkpoint_reloads_to_the_reported_logits(example, tmp_path):
    tokens, labels = example
    config, run = _fit(tmp_path, example, "0", "train.epochs=3")
    _, val = split_tokens(tokens, "0")
    assert [h["epoch"] for h in run.history] == [1, 2, 3]
    assert run.best_epoch == 1 + int(np.argmax([h["pr_auc_macro"] for h in run.history]))
    assert list(run.eval_ids) == val.column(C.ID).to_pylist()
    logits, y = _logits_from_checkpoint(config, run, labels, val)
    np.testing.assert_array_equal(y, run.eval_labels)
    np.testing.assert_allclose(logits, run.eval_logits, atol=1e-5)


def test_a_worker_that_dies_after_a_checkpoint_resumes(example, tmp_path):
    marker = tmp_path / "died"
    _, run = _fit(tmp_path, example, "1", "train.epochs=3", "train.num_workers=1", "train.cpus_per_worker=0.5",
                  fault=InjectedFault(after_epoch=1, marker=str(marker)))
    assert marker.exists(), "the injected fault never fired"
    # Epoch 1 came from before the failure (restored from the checkpoint), epochs 2-3 from the restarted worker.
    assert [h["epoch"] for h in run.history] == [1, 2, 3]
    assert run.eval_logits.shape[0] == len(run.eval_ids)


def test_two_workers_train_data_parallel(example, tmp_path):
    tokens, _ = example
    _, run = _fit(tmp_path, example, "2", "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=0.5")
    _, val = split_tokens(tokens, "2")
    # Only the training fold is split; rank 0 scores the whole validation fold.
    assert run.eval_logits.shape == (val.num_rows, len(example[1].species))
    assert np.isfinite(run.eval_logits).all()


def test_final_mode_scores_the_test_split_once_after_the_last_epoch(example, tmp_path):
    tokens, _ = example
    _, run = _fit(tmp_path, example, C.TEST_FOLD, "train.epochs=2", "train.patience=1")
    _, test = split_tokens(tokens, C.TEST_FOLD)
    assert [h["epoch"] for h in run.history] == [1, 2]
    assert math.isnan(run.history[0]["pr_auc_macro"]) and "train_pr_auc_macro" not in run.history[0]
    assert not math.isnan(run.history[1]["pr_auc_macro"])
    assert run.best_epoch == 2
    assert sorted(run.eval_ids) == sorted(test.column(C.ID).to_pylist())


def test_a_restarted_driver_finds_its_finished_run_and_trains_nothing_again(example, tmp_path):
    """Deterministic run names: the same name and storage_path give the same run back (local mode resumes from
    the checkpoint it persisted), and every checkpoint holds the resolved config it was trained with."""
    import yaml

    config, first = _fit(tmp_path, example, "1", "train.epochs=2", name="again")
    checkpoints = sorted((tmp_path / "ray" / "again").glob("checkpoint_epoch_*"))
    assert [p.name for p in checkpoints] == ["checkpoint_epoch_001", "checkpoint_epoch_002"]
    saved = yaml.safe_load((checkpoints[-1] / C.CKPT_CONFIG).read_text())
    assert saved["train"]["epochs"] == 2 and saved["model"]["backbone"] == "tiny"
    _, second = _fit(tmp_path, example, "1", "train.epochs=2", name="again")
    assert second.history == first.history and second.best_epoch == first.best_epoch
    np.testing.assert_array_equal(second.eval_logits, first.eval_logits)


def test_fit_fold_refuses_the_test_split(example, tmp_path):
    with pytest.raises(ValueError, match="fit_final"):
        fit_fold(
            tiny_test_config(tmp_path), example[0], C.TEST_FOLD, {0: "a"}, score_logits, "x")
