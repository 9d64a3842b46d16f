"""Fixtures of the tokenizer/model/loop tests: the NT tokenizer built offline, the tiny backbone saved as a checkpoint
directory (loaded through the same `from_pretrained` path as a real one), and real 12S records: the bundled example
and tests/data (always present), or the full development set beside the repo (the `full_data` tier).

conftest.py imports the fixtures (`from fixtures_tiny import *`); tests import the helper functions directly.
Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

__all__ = ["nt_tokenizer", "one_torch_thread", "records_12s", "tiny_model_dir"]  # the fixtures, for conftest

REPO = Path(__file__).resolve().parents[1]
SHARED_12S_DIR = REPO.parent / "shared" / "data" / "12s-fish"
REPO_SETS = (REPO / "examples" / "12s-fish-mini", REPO / "tests" / "data")
"""Real 12S records in the repo: the bundled example (415 records, 32 species with 8-15) and tests/data (248)."""
FULL_DATA_SKIP = (f"needs the full 12s-fish development set at {SHARED_12S_DIR} (a fresh clone has none; this is "
                  "the full_data tier)")
_NOT_ACGT = re.compile(r"[^ACGT]")


def clean_for_test(sequence: str) -> str:
    """The cleaning `data/clean.py` applies before tokenizing, reduced to what these tests need."""
    s = re.sub(r"[\s\-.]", "", sequence.upper()).replace("U", "T")
    return _NOT_ACGT.sub("N", s)


def read_repo_records() -> pd.DataFrame:
    """`id`, cleaned `sequence` and `species` of every real record in the repo (example + tests/data)."""
    frames = []
    for directory in REPO_SETS:
        fasta = directory / "sequences.fasta.gz" if (directory / "sequences.fasta.gz").exists() else \
            directory / "12s_sample.fasta.gz"
        labels = directory / "labels.csv" if (directory / "labels.csv").exists() else directory / "12s_sample_labels.csv"
        frames.append(_read_pair(fasta, labels, None))
    return pd.concat(frames, ignore_index=True).drop_duplicates("id").reset_index(drop=True)


def read_12s_records(limit: int | None = None) -> pd.DataFrame:
    """`id`, cleaned `sequence` and `species` of the first `limit` records of the full 12S set (skips if absent)."""
    fasta, labels = SHARED_12S_DIR / "sequences.fasta.gz", SHARED_12S_DIR / "labels.csv"
    if not fasta.exists() or not labels.exists():
        pytest.skip(FULL_DATA_SKIP)
    return _read_pair(fasta, labels, limit)


def _read_pair(fasta: Path, labels: Path, limit: int | None) -> pd.DataFrame:
    ids, seqs, chunks = [], [], []
    with gzip.open(fasta, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                if chunks:
                    seqs.append(clean_for_test("".join(chunks)))
                if limit is not None and len(ids) == limit:
                    chunks = []
                    break
                ids.append(line[1:].split()[0])
                chunks = []
            else:
                chunks.append(line.strip())
    if chunks:
        seqs.append(clean_for_test("".join(chunks)))
    species = pd.read_csv(labels, usecols=["id", "species"]).set_index("id")["species"]
    return pd.DataFrame({"id": ids, "sequence": seqs, "species": species.reindex(ids).to_numpy()})


def labelled_tokens(records: pd.DataFrame, tokenizer, n_species: int, per_species: int, max_tokens: int,
                    skip: int = 0) -> dict[str, np.ndarray]:
    """Tokenized columns (+ int `label`) of `per_species` records (after `skip`) of the `n_species` largest species."""
    from idengine.data.tokenize import tokenize_batch

    top = records["species"].value_counts().index[:n_species]
    rows = pd.concat([records[records["species"] == s].iloc[skip : skip + per_species] for s in top])
    batch = {"id": rows["id"].to_numpy(), "sequence": rows["sequence"].to_numpy(dtype=object)}
    out = tokenize_batch(batch, tokenizer, max_tokens)
    out["label"] = rows["species"].map({s: i for i, s in enumerate(top)}).to_numpy(dtype=np.int64)
    return out


@pytest.fixture(scope="session")
def nt_tokenizer():
    """The Nucleotide Transformer tokenizer, built offline from the in-code vocabulary."""
    from idengine.data.tokenize import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny backbone as a checkpoint directory: config.json, model.safetensors, vocab.txt, tokenizer_config.json."""
    from idengine.models.tiny import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-backbone"))


@pytest.fixture(scope="session")
def records_12s() -> pd.DataFrame:
    """Every real 12S record in the repo, cleaned: the bundled example and tests/data (663 records)."""
    return read_repo_records()


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: the tiny model gains nothing from more, and a loaded 2-core box loses a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
