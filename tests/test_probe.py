"""probe: frozen-backbone embeddings (exact, padding-free, cached) and the linear / MLP heads trained on them."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import tiny_test_config

from idengine import layout as C
from idengine.features import embeddings as E
from idengine.models import probe as P
from idengine.config import PROBE_HEADS, ModelConfig
from idengine.config_io import with_values
from idengine.models.inference import embed_rows, pool_hidden
from idengine.models.transformer import load_backbone
from idengine.data.prepared import read_prepared
from idengine.data.tokenize import nt_token_ids
from idengine.evaluate.metrics import classification_metrics, softmax

MAX_TOKENS = 400  # jobs/configs/tiny-cpu.yaml


def _token_rows(records: pd.DataFrame) -> list[np.ndarray]:
    return [ids[:MAX_TOKENS] for ids in nt_token_ids(records[C.SEQUENCE].tolist())]


def _reference_embedding(esm, ids: np.ndarray) -> np.ndarray:
    """One record alone (no padding at all): the mean of its last hidden states after CLS."""
    with torch.no_grad():
        hidden = esm(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).last_hidden_state[0]
    return hidden[1:].mean(dim=0).numpy()


@pytest.fixture(scope="module")
def example(prepared_example):
    """Records, label space and in-process tiny embeddings of the bundled example (no Ray)."""
    records, labels = read_prepared(prepared_example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = embed_rows(load_backbone(ModelConfig(backbone="tiny")), _token_rows(records), batch_size=64)
    torch.set_num_threads(threads)
    return records, labels, x


def _fold(records: pd.DataFrame, fold: str) -> tuple[np.ndarray, np.ndarray]:
    f = records[C.FOLD].to_numpy()
    return (f != fold) & (f != C.TEST_FOLD), f == fold


@pytest.mark.usefixtures("one_torch_thread")
def test_mean_pool_excludes_cls_and_padding():
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])  # CLS, two tokens, one pad
    assert pool_hidden(hidden, mask).tolist() == [[2.0, 3.0]]
    assert pool_hidden(hidden, mask, "cls").tolist() == [[9.0, 9.0]]


@pytest.mark.usefixtures("one_torch_thread")
def test_embeddings_equal_a_direct_mean_pool_and_ignore_padding(example, tiny_model_dir):
    from transformers import EsmForMaskedLM

    records, _, x = example
    rows = _token_rows(records)
    esm = EsmForMaskedLM.from_pretrained(str(tiny_model_dir)).esm.eval()  # the checkpoint path, loaded another way
    lengths = np.array([len(r) for r in rows])
    picks = np.unique(np.r_[np.argsort(lengths)[:5], np.argsort(lengths)[-5:], np.arange(0, len(rows), 17)])
    for i in picks:
        np.testing.assert_allclose(x[i], _reference_embedding(esm, rows[i]), atol=1e-5, err_msg=records[C.ID][i])
    # The shortest record alone and padded to the longest one's length in a shared batch.
    short, long = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[long] > 3 * lengths[short]
    model = load_backbone(ModelConfig(backbone="tiny"))
    alone = embed_rows(model, [rows[short]], batch_size=1)
    padded = embed_rows(model, [rows[long], rows[short]], batch_size=2)
    np.testing.assert_allclose(padded[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(padded[0], x[long], atol=1e-5)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_checkpoint_dir_backbone_embeds_like_tiny(example, tiny_model_dir):
    records, _, x = example
    model = load_backbone(ModelConfig(backbone=str(tiny_model_dir)))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert not any("pooler" in name for name, _ in model.named_parameters())
    got = embed_rows(model, _token_rows(records)[:40], batch_size=16)
    np.testing.assert_allclose(got, x[:40], atol=1e-5)


@pytest.mark.usefixtures("one_torch_thread")
def test_linear_probe_is_scikit_learns_logistic_regression(example):
    from sklearn.linear_model import LogisticRegression

    records, labels, x = example
    train, val = _fold(records, "0")
    y = records[C.LABEL].to_numpy()
    probe = P.fit_probe("linear", x[train], y[train], labels.num_classes)
    standardise = lambda a: (a - x[train].mean(axis=0)) / x[train].std(axis=0)  # noqa: E731
    reference = LogisticRegression(C=P.LINEAR_C, tol=1e-8, max_iter=10_000).fit(standardise(x[train]), y[train])
    expected = reference.predict_proba(standardise(x[val]))
    got = softmax(probe.logits(x[val]))[:, reference.classes_]
    np.testing.assert_allclose(got, expected, atol=5e-3)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kind", PROBE_HEADS)
def test_probabilities_cover_every_class_and_sum_to_one(example, kind):
    records, labels, x = example
    train, val = _fold(records, "1")
    y = records[C.LABEL].to_numpy()
    keep = train & (y >= 5)  # species 0-4 get no training record
    logits = P.fit_probe(kind, x[keep], y[keep], labels.num_classes, seed=3).logits(x[val])
    assert logits.shape == (int(val.sum()), labels.num_classes) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert (logits[:, :5].max(axis=1) < logits[:, 5:].min(axis=1)).all()
    np.testing.assert_allclose(softmax(logits).sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kind, floor", [("linear", 0.3), ("mlp", 0.2)])
def test_probes_learn_the_example(example, kind, floor):
    records, labels, x = example
    y, groups = records[C.LABEL].to_numpy(), records[C.GROUP].to_numpy()
    top1 = []
    for fold in ("0", "1", "2"):
        train, val = _fold(records, fold)
        probe = P.fit_probe(kind, x[train], y[train], labels.num_classes, groups=groups[train])
        top1.append(classification_metrics(y[val], softmax(probe.logits(x[val])))["top1_acc"])
    # A random tiny backbone, 32 species: chance is 1/32; the k-mer baselines reach about 0.9.
    assert np.mean(top1) > floor, f"{kind} held-out top-1 {top1}"


def test_mlp_holdout_keeps_whole_groups_and_every_species():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(40), rng.integers(2, 12, size=40))
    groups = np.array([f"{label}-{i // 2}" for i, label in enumerate(y)])  # pairs of duplicates
    held = P._holdout_mask(y, groups, seed=1)
    assert 0.05 * len(y) <= held.sum() <= 0.2 * len(y)
    assert not set(groups[held]) & set(groups[~held])
    frame = pd.DataFrame({"y": y, "g": groups})
    groups_left = frame[~held].groupby("y")["g"].nunique().reindex(np.arange(40), fill_value=0)
    assert (groups_left >= frame.groupby("y")["g"].nunique().clip(upper=2)).all()


def test_bad_inputs_are_refused():
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="unknown probe"):
        P.fit_probe("forest", x, y, 2)
    with pytest.raises(ValueError, match="at least two species"):
        P.fit_probe("linear", x, np.zeros(4, int), 2)
    with pytest.raises(ValueError, match="labels must be integers"):
        P.fit_probe("linear", x, np.array([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="expected x"):
        P.fit_probe("linear", x, y[:3], 2)


@pytest.fixture(scope="module")
def embedded(ray_session, prepared_example, tmp_path_factory):
    """A private copy of the prepared example and its first embed_table call (computed with Ray Data)."""
    prepared = tmp_path_factory.mktemp("probe") / "prepared"
    shutil.copytree(prepared_example, prepared, ignore=shutil.ignore_patterns("tokens", C.EMBEDDINGS_DIR))
    config = tiny_test_config(tmp_path_factory.mktemp("probe-runs"))
    return prepared, config, E.embed_table(prepared, config)


@pytest.mark.integration
def test_embed_table_matches_in_process_embeddings(embedded, example):
    prepared, _, table = embedded
    records, _, x = example
    assert table.schema.field(C.EMBEDDING).type == pa.list_(pa.float32(), 64)
    assert table.column(C.ID).to_pylist() == records[C.ID].tolist()
    assert table.column(C.LABEL).to_pylist() == records[C.LABEL].tolist()
    assert table.column(C.FOLD).to_pylist() == records[C.FOLD].tolist()
    np.testing.assert_allclose(E.embedding_matrix(table), x, atol=1e-5)
    (cache,) = (prepared / C.EMBEDDINGS_DIR).iterdir()  # one complete cache, no temporary directory left
    assert {p.name for p in cache.iterdir()} == {"embeddings.parquet", "_COMPLETE.json"}


@pytest.mark.integration
def test_a_second_call_reads_the_cache(embedded, monkeypatch):
    prepared, config, table = embedded
    (cache,) = (prepared / C.EMBEDDINGS_DIR).iterdir()
    written = (cache / "embeddings.parquet").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("embeddings were computed again")

    monkeypatch.setattr(E, "_embed_with_ray", must_not_run)
    again = E.embed_table(prepared, config)
    assert again.equals(table)
    assert (cache / "embeddings.parquet").stat().st_mtime_ns == written
    # Another pooling is another cache entry.
    cls = with_values(config, {"model.pooling": "cls"})
    assert E.embedding_cache_key(prepared, cls, use_gpu=False) != cache.name


@pytest.mark.integration
def test_probe_fold_returns_what_a_kmer_fold_returns(embedded):
    from idengine.data.prepared import read_unknown
    from idengine.features.embeddings import record_embeddings
    from idengine.recipes.folds import backbone_embeddings, kmer_fold, probe_fold

    prepared, config, _ = embedded
    records, labels = read_prepared(prepared)
    rare = read_unknown(prepared).head(7)  # set-aside rare species: scored by the fold's model, never its classes
    rare_x = backbone_embeddings(config, rare[C.SEQUENCE].tolist())
    result = probe_fold(config, record_embeddings(prepared, config, records), records, labels, "2", rare, rare_x)
    kmer = kmer_fold(with_values(config, {"model.kind": "kmer-nb"}), records, labels, "2", rare)
    assert set(result.summary()) == set(kmer.summary()) and set(result.val) == set(kmer.val)
    assert result.rare_ids.tolist() == rare[C.ID].tolist() == kmer.rare_ids.tolist()
    assert result.rare_logits.shape == kmer.rare_logits.shape == (len(rare), labels.num_classes)
    val = records[records[C.FOLD] == "2"]
    assert result.ids.tolist() == val[C.ID].tolist() and result.labels.tolist() == val[C.LABEL].tolist()
    assert result.logits.shape == (len(val), labels.num_classes)
    again = classification_metrics(result.labels, softmax(result.logits), top_k=5)
    assert again["pr_auc_macro"] == pytest.approx(result.val["pr_auc_macro"])
    assert result.gap == pytest.approx(result.train["pr_auc_macro"] - result.val["pr_auc_macro"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_gpu_embeddings_and_probe_agree_with_the_cpu(example):
    records, labels, x = example
    device = torch.device("cuda")
    model = load_backbone(ModelConfig(backbone="tiny")).to(device)
    got = embed_rows(model, _token_rows(records), 64, device=device, autocast_dtype=torch.bfloat16)
    cosine = (got * x).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(x, axis=1)
    assert cosine.min() > 0.99
    train, val = _fold(records, "0")
    y = records[C.LABEL].to_numpy()
    probs = [softmax(P.fit_probe("linear", x[train], y[train], labels.num_classes, device=d).logits(x[val]))
             for d in ("cuda", "cpu")]
    np.testing.assert_allclose(probs[0], probs[1], atol=5e-3)
