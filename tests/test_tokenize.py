"""Tokenizer: the offline NT vocab is InstaDeepAI's, the vectorised ids equal EsmTokenizer's; batches and padding."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch

from fixtures_tiny import nt_tokenizer, read_12s_records, records_12s  # noqa: F401 (fixtures)
from idengine.data.tokenize import (
    NT_VOCAB_SHA256,
    PAD_ID,
    collate,
    load_tokenizer,
    nt_token_ids,
    nt_vocab,
    tokenize_batch,
    write_offline_tokenizer,
)


def _reference_ids(tokenizer, sequences):
    return [list(ids) for ids in tokenizer(list(sequences))["input_ids"]]


def test_vocab_is_the_published_one(tmp_path):
    vocab = nt_vocab()
    assert len(vocab) == 4107
    assert vocab[:4] == ["<unk>", "<pad>", "<mask>", "<cls>"]
    assert vocab[4:6] == ["AAAAAA", "AAAAAT"] and vocab[4099] == "GGGGGG"
    assert vocab[4100:] == ["A", "T", "C", "G", "N", "<eos>", "<bos>"]
    assert hashlib.sha256("\n".join(vocab).encode()).hexdigest() == NT_VOCAB_SHA256
    written = write_offline_tokenizer(tmp_path) / "vocab.txt"
    assert hashlib.sha256(written.read_bytes()).hexdigest() == NT_VOCAB_SHA256


def test_published_example(nt_tokenizer, tmp_path):
    assert nt_tokenizer("ATTCCGATTCCGATTCCG")["input_ids"] == [3, 367, 367, 367]
    assert nt_token_ids(["ATTCCGATTCCGATTCCG"])[0].tolist() == [3, 367, 367, 367]
    out = tokenize_batch({"sequence": np.array(["ATTCCGATTCCGATTCCG"], dtype=object)}, nt_tokenizer, 1000)
    assert out["input_ids"][0].tolist() == [3, 367, 367, 367]
    reloaded = load_tokenizer(str(write_offline_tokenizer(tmp_path)))
    assert reloaded("ATTCCGATTCCGATTCCG")["input_ids"] == [3, 367, 367, 367]
    assert (reloaded.pad_token_id, reloaded.cls_token_id, reloaded.mask_token_id, reloaded.eos_token) == (1, 3, 2, None)
    assert reloaded.model_max_length == 1000


def test_fast_ids_identical_on_every_real_sequence_in_the_repo(nt_tokenizer, records_12s):
    assert len(records_12s) > 600 and records_12s["sequence"].str.contains("N").sum() > 0  # IUPAC codes became N
    fast = nt_token_ids(records_12s["sequence"].tolist())
    assert [f.tolist() for f in fast] == _reference_ids(nt_tokenizer, records_12s["sequence"])


@pytest.mark.full_data
def test_fast_ids_identical_on_2000_real_sequences(nt_tokenizer):
    records = read_12s_records(limit=2000)
    assert len(records) == 2000 and records["sequence"].str.contains("N").sum() > 0  # IUPAC codes became N
    fast = nt_token_ids(records["sequence"].tolist())
    assert [f.tolist() for f in fast] == _reference_ids(nt_tokenizer, records["sequence"])
    assert all(f.dtype == np.int32 for f in fast)


def test_fast_ids_identical_on_edge_cases(nt_tokenizer):
    rng = random.Random(0)
    cases = ["", "A", "N", "NNNNNNNN", "ACGTA", "ACGTAC", "ACGTACG", "ACGTACNACGTAC", "NACGTACGTACGT", "ACGTACN",
             "ACGTACGTACGTA" * 7, "GGGGGGN" * 5, "ACNNNNNNNNNNNNNNNNNNNNNNNNNNGT"]
    cases += ["".join(rng.choice("ACGT") for _ in range(length)) for length in range(1, 40)]
    # N runs of every length at every offset mod 6, and short random strings rich in N.
    cases += ["ACGTACGTAC"[: i % 7] + "N" * (i // 7 + 1) + "TTGACCA" * 3 for i in range(60)]
    cases += ["".join(rng.choice("ACGTNN") for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    fast = nt_token_ids(cases)
    assert [f.tolist() for f in fast] == _reference_ids(nt_tokenizer, cases)


def test_fast_path_inside_one_batch_matches_single_calls():
    seqs = ["ACGTACGT", "", "NNACGTACGTACGTN", "T"]
    joined = nt_token_ids(seqs)
    assert [j.tolist() for j in joined] == [nt_token_ids([s])[0].tolist() for s in seqs]  # no leak across rows
    assert nt_token_ids([]) == []


def test_empty_batch(nt_tokenizer):
    out = tokenize_batch({"sequence": np.array([], dtype=object)}, nt_tokenizer, 100)
    assert len(out["input_ids"]) == len(out["n_tokens"]) == len(out["truncated"]) == 0


def test_tokenize_batch_truncates_and_flags(nt_tokenizer, records_12s):
    rows = records_12s.iloc[:300]
    batch = {"sequence": rows["sequence"].to_numpy(dtype=object), "id": rows["id"].to_numpy(), "x": np.arange(300)}
    full = _reference_ids(nt_tokenizer, rows["sequence"])
    out = tokenize_batch(batch, nt_tokenizer, max_tokens=40)
    assert set(out) == {"sequence", "id", "x", "input_ids", "n_tokens", "truncated"}
    assert np.array_equal(out["x"], np.arange(300)) and out["input_ids"].dtype == object
    assert out["n_tokens"].dtype == np.int32 and out["truncated"].dtype == bool
    for ids, n, cut, ref in zip(out["input_ids"], out["n_tokens"], out["truncated"], full):
        assert ids.tolist() == ref[:40] and ids[0] == 3 and n == len(ids) == min(len(ref), 40)
        assert cut == (len(ref) > 40)
    assert 0 < out["truncated"].sum() < 300
    untouched = tokenize_batch(batch, nt_tokenizer, max_tokens=1000)
    assert not untouched["truncated"].any()  # 12S barcodes of up to ~1,900 bp fit in 1000 tokens


def test_uncleaned_sequence_is_refused_with_its_id(nt_tokenizer):
    batch = {"sequence": np.array(["ACGT", "ACGTRY"], dtype=object), "id": np.array(["ok1", "MZ12345"])}
    with pytest.raises(ValueError, match="MZ12345"):
        tokenize_batch(batch, nt_tokenizer, 100)


def test_another_vocabulary_uses_the_tokenizer_itself(tmp_path):
    from transformers import EsmTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["<cls>", "<pad>", "<eos>", "<unk>", "A", "C", "G", "T", "N", "<mask>"]))
    tokenizer = EsmTokenizer(str(vocab))
    out = tokenize_batch({"sequence": np.array(["ACGTN", "GG"], dtype=object)}, tokenizer, max_tokens=4)
    assert [ids.tolist() for ids in out["input_ids"]] == [[0, 4, 5, 6], [0, 6, 6, 2]]
    assert out["truncated"].tolist() == [True, False]


def test_collate_pads_to_the_longest_row():
    ids = np.empty(3, dtype=object)
    ids[:] = [np.array(row, dtype=np.int32) for row in ([3, 10, 11], [3], [3, 5, 6, 7, 8])]
    batch = {"input_ids": ids, "label": np.array([2, 0, 1]), "sequence": np.array(["a", "b", "c"])}
    out = collate(batch, pad_id=PAD_ID)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].tolist() == [[3, 10, 11, 1, 1], [3, 1, 1, 1, 1], [3, 5, 6, 7, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [2, 0, 1]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_without_labels_and_from_a_2d_array():
    out = collate({"input_ids": np.array([[3, 4], [3, 5]], dtype=np.int32)}, pad_id=PAD_ID)
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == (2, 2) and out["attention_mask"].sum() == 4
