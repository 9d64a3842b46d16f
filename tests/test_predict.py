"""Predict: every good record of a FASTA with broken records is written, every bad one reported with id and reason."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idengine.config import DataConfig, PredictConfig
from idengine.data.clean import normalise_sequence
from idengine.data.fasta import read_fasta
from idengine.errors import InputError
from idengine.deploy.artifact import load_artifact
from idengine.deploy.predict import iter_chunks, predict_file
from idengine.layout import ERRORS_SUFFIX
from test_export import make_artifact

DATA = Path(__file__).parent / "data"
BAD = {  # id -> (record text after the header line, expected reason)
    "empty_rec": ("", "empty_sequence"),
    "protein_rec": ("MKVLAAGIVGLLLAQEWRSTPYHDGGKVLAAGIVGLLLAQEWRSTPYHDGG\n", "invalid_characters"),
    "short_rec": ("ACGTACGTAC\n", "too_short"),
    "n_rec": ("N" * 60 + "ACGT" * 10 + "\n", "too_many_n"),
    "gaps_only": ("----....----\n", "empty_sequence"),
}


def real_records(n: int = 30) -> pd.DataFrame:
    return read_fasta(DATA / "12s_sample.fasta.gz")[0].iloc[:n].reset_index(drop=True)


def broken_fasta(path: Path, n_good: int = 30) -> tuple[list[str], dict[str, str]]:
    """A gzip FASTA of real records (wrapped, some lower-case / CRLF, a BOM) with broken records between them.

    Returns:
        The good ids in file order and {bad id: reason}; the header-less record is reported with id "".
    """
    good = real_records(n_good)
    chunks, bad_reasons = [b"\xef\xbb\xbf"], {}
    bad_items = list(BAD.items())
    for i, (rid, seq) in enumerate(zip(good["id"], good["sequence"])):
        seq = seq.lower() if i % 7 == 3 else seq
        wrapped = "\n".join(seq[j : j + 60] for j in range(0, len(seq), 60)) + "\n"
        text = f">{rid} a real 12S record\n{wrapped}"
        chunks.append(text.replace("\n", "\r\n").encode() if i % 5 == 2 else text.encode())
        if i % 5 == 4 and bad_items:
            bad_id, (body, reason) = bad_items.pop(0)
            chunks.append(f">{bad_id}\n{body}".encode())
            bad_reasons[bad_id] = reason
    chunks.append(b">binary_rec junk line inside\nACGTACGT\x00\x9c\xff\xfe\x01binary\nACGTACGTACGT\n")
    chunks.append(b">\n" + good["sequence"][0].encode() + b"\n")
    bad_reasons.update({"binary_rec": "binary_data", "": "no_id"})
    path.write_bytes(gzip.compress(b"".join(chunks)))
    return good["id"].tolist(), bad_reasons


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("predict") / "model", threshold=0.5)[0]


def test_iter_chunks_streams_and_flags_every_bad_record(tmp_path):
    fasta = tmp_path / "q.fasta.gz"
    good_ids, bad = broken_fasta(fasta)
    chunks = list(iter_chunks(fasta, DataConfig(), chunk_records=8))
    assert all(len(c) <= 8 for c in chunks) and len(chunks) > 3
    table = pd.concat(chunks, ignore_index=True)
    assert table["record"].tolist() == list(range(1, len(good_ids) + len(bad) + 1))
    assert table.loc[table["reason"] == "", "id"].tolist() == good_ids
    assert dict(zip(table.loc[table["reason"] != "", "id"], table.loc[table["reason"] != "", "reason"])) == bad
    # wrapping, CRLF, BOM and lower case are undone; IUPAC codes become N as in prepare
    expected = [normalise_sequence(s)[0] for s in real_records()["sequence"]]
    assert table.loc[table["reason"] == "", "sequence"].tolist() == expected


def check_calls(calls: pd.DataFrame, probs: np.ndarray, threshold: float, top_k: int) -> None:
    """The written calls agree with Artifact.probabilities and with the threshold rule."""
    for j in range(1, top_k + 1):
        assert (calls[f"top{j}_prob"].to_numpy() <= calls["top1_prob"].to_numpy() + 1e-12).all()
    np.testing.assert_allclose(calls["top1_prob"], probs.max(axis=1), rtol=1e-5)
    species_call = calls["call_rank"] == "species"
    assert (calls.loc[species_call, "call"] == calls.loc[species_call, "top1_species"]).all()
    assert ((calls["top1_prob"] >= threshold) == species_call).all()
    assert (calls.loc[~species_call & (calls["call_rank"] != "unassigned"), "call_prob"] >= threshold).all()


def test_predict_in_process_writes_every_good_record_and_reports_every_bad_one(tmp_path, artifact_dir):
    fasta = tmp_path / "q.fasta.gz"
    good_ids, bad = broken_fasta(fasta)
    out = predict_file(artifact_dir, fasta, tmp_path / "calls.csv", PredictConfig(top_k=3), use_ray=False)
    calls = pd.read_csv(out, keep_default_na=False, na_values=[])
    errors = pd.read_csv(tmp_path / f"calls.csv{ERRORS_SUFFIX}", keep_default_na=False, na_values=[])
    assert calls["id"].tolist() == good_ids
    assert dict(zip(errors["id"], errors["reason"])) == bad and (errors["detail"] != "").all()
    assert list(calls.columns) == ["id", "record", "length_bp", "call", "call_rank", "call_prob", "top1_species",
                                   "top1_prob", "top2_species", "top2_prob", "top3_species", "top3_prob"]
    artifact = load_artifact(artifact_dir)
    probs = artifact.probabilities(real_records()["sequence"].tolist())
    species = np.asarray(artifact.label_space.species)
    assert (calls["top1_species"].to_numpy() == species[probs.argmax(axis=1)]).all()
    check_calls(calls, probs, artifact.threshold, 3)
    assert set(calls["call_rank"]) == {"species", "genus", "unassigned"}  # this model and threshold give all three
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.csv", "calls.csv.errors.csv", "q.fasta.gz"]


def test_artifact_calls_match_its_probabilities(artifact_dir):
    artifact = load_artifact(artifact_dir)
    records = real_records(12)
    frame = artifact.calls(records["id"].tolist(), records["sequence"].tolist(), top_k=2)
    probs = artifact.probabilities(records["sequence"].tolist())
    top = np.sort(probs, axis=1)[:, ::-1]
    assert np.array_equal(frame["top1_prob"].to_numpy(), top[:, 0])
    assert np.array_equal(frame["top2_prob"].to_numpy(), top[:, 1])


def test_a_gzip_truncated_midway_keeps_the_records_before_it(tmp_path, artifact_dir):
    full = tmp_path / "full.fasta.gz"
    good_ids, _ = broken_fasta(full)
    cut = tmp_path / "cut.fasta.gz"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    out = predict_file(artifact_dir, cut, tmp_path / "calls.parquet", PredictConfig(top_k=2), use_ray=False)
    calls = pd.read_parquet(out)
    errors = pd.read_csv(tmp_path / f"calls.parquet{ERRORS_SUFFIX}", keep_default_na=False)
    assert errors["reason"].iloc[-1] == "truncated_file" and "truncated" in errors["detail"].iloc[-1]
    assert 0 < len(calls) < len(good_ids) and calls["id"].tolist() == good_ids[: len(calls)]
    assert errors["record"].iloc[-1] == calls["record"].max() + 1 or errors["record"].iloc[-1] > len(calls)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "binary data"),
    (b"ACGTACGT\n>r1\nACGT\n", "text before the first"),
    (gzip.compress(b">r1\n" + b"ACGT" * 5000)[:12], "gzip stream is truncated or corrupt"),
])
def test_files_that_are_not_fasta_at_all_are_fatal(tmp_path, artifact_dir, content, message):
    bad = tmp_path / "bad.fasta"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=message):
        predict_file(artifact_dir, bad, tmp_path / "out" / "calls.csv", PredictConfig(), use_ray=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.integration
def test_ray_workers_run_at_the_priority_of_the_command_that_started_them(ray_session):
    """Ray lowers its workers' priority by 15 nice levels unless told otherwise (`runtime.local_ray_environment`):
    predict's actor then starved on a machine busy with other work."""
    import os

    import ray

    assert ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()) == os.nice(0)


@pytest.mark.integration
def test_predict_with_ray_data_actors_matches_in_process(ray_session, tmp_path, artifact_dir):
    fasta = tmp_path / "q.fasta.gz"
    good_ids, bad = broken_fasta(fasta)
    cfg = PredictConfig(top_k=3, batch_size=4, num_actors=1)
    ray_out = predict_file(artifact_dir, fasta, tmp_path / "ray.csv", cfg, use_ray=True)
    local_out = predict_file(artifact_dir, fasta, tmp_path / "local.csv", cfg, use_ray=False)
    ray_calls, local_calls = pd.read_csv(ray_out), pd.read_csv(local_out)
    assert ray_calls["id"].tolist() == good_ids  # file order is kept
    pd.testing.assert_frame_equal(ray_calls.drop(columns=[c for c in ray_calls if c.endswith("_prob")]),
                                  local_calls.drop(columns=[c for c in local_calls if c.endswith("_prob")]))
    for column in [c for c in ray_calls if c.endswith("_prob")]:
        np.testing.assert_allclose(ray_calls[column], local_calls[column], atol=1e-6)
    errors = pd.read_csv(tmp_path / f"ray.csv{ERRORS_SUFFIX}", keep_default_na=False)
    assert dict(zip(errors["id"], errors["reason"])) == bad
