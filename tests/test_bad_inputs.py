"""A corpus of broken inputs fed to `idengine prepare`, `cv`, `train` and `predict` through the CLI (issue #14, part 2).

Every case must end with exit code 2, one error message that names the file, record or setting (and what to do),
and no output that looks complete. Broken files are made from the REAL rows of tests/data in tmp_path. Cases that
fail before Ray is needed run with `init_ray` made a no-op (guarded: a test fails if Ray starts anyway); the ones that
need Ray are integration tests.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from idengine import layout as C
from idengine.cli import main
from idengine.data.fasta import read_fasta

DATA = Path(__file__).parent / "data"
SAMPLE_FASTA = DATA / "12s_sample.fasta.gz"
SAMPLE_LABELS = DATA / "12s_sample_labels.csv"


def real_records() -> pd.DataFrame:
    return read_fasta(SAMPLE_FASTA)[0]


def fasta_text(records: pd.DataFrame) -> str:
    return "".join(f">{i}\n{s}\n" for i, s in zip(records[C.ID], records[C.SEQUENCE]))


def real_labels() -> pd.DataFrame:
    return pd.read_csv(SAMPLE_LABELS, dtype=str, keep_default_na=False)


def refused(argv: list[str], caplog, *named: str) -> str:
    """Run the CLI; assert exit code 2 and one error message naming each of `named`; return the message."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1, (code, errors)
    for name in named:
        assert name in errors[0], f"{name!r} not in the message: {errors[0]}"
    assert "Traceback" not in caplog.text
    return errors[0]


def nothing_complete(out: Path) -> None:
    """No output at `out`, and no staging directory left beside it."""
    assert not out.exists() or (out.is_dir() and not any(out.iterdir())), sorted(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


@contextlib.contextmanager
def without_ray() -> Iterator[list]:
    """The CLI's `init_ray` as a no-op (its calls are recorded), for work that must not need Ray; fails if Ray starts
    anyway (unless a Ray session was already running)."""
    import idengine.recipes.runtime as runtime

    ray = sys.modules.get("ray")
    before = bool(ray and ray.is_initialized())
    calls: list = []
    init_ray, runtime.init_ray = runtime.init_ray, calls.append
    try:
        yield calls
    finally:
        runtime.init_ray = init_ray
    ray = sys.modules.get("ray")
    if not before and ray and ray.is_initialized():
        ray.shutdown()
        pytest.fail("Ray started during work that should not need it")


@pytest.fixture
def no_ray() -> Iterator[list]:
    """For cases refused before Ray is needed: see `without_ray`."""
    with without_ray() as calls:
        yield calls


# ----------------------------------------------------------------------------------------------- prepare


def _write(path: Path, content: str | bytes, gz: bool = False) -> Path:
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def sequence_before_header(tmp: Path) -> tuple[list[str], list[str]]:
    records = real_records()
    fasta = _write(tmp / "seqs.fasta", records[C.SEQUENCE].iloc[0] + "\n" + fasta_text(records))
    return [f"data.sequences={fasta}"], [str(fasta), "line 1", "before the first '>' header"]


def binary_bytes(tmp: Path) -> tuple[list[str], list[str]]:
    records = real_records()
    lines = fasta_text(records).encode().split(b"\n")
    lines[7] = lines[7][:20] + b"\x00\x9c\xff" + lines[7][20:]  # line 8: the sequence of the 4th record
    fasta = _write(tmp / "seqs.fasta.gz", b"\n".join(lines), gz=True)
    return [f"data.sequences={fasta}"], [str(fasta), "line 8", repr(records[C.ID].iloc[3])]


def truncated_gzip(tmp: Path) -> tuple[list[str], list[str]]:
    raw = SAMPLE_FASTA.read_bytes()
    fasta = _write(tmp / "cut.fasta.gz", raw[: len(raw) // 2])
    return [f"data.sequences={fasta}"], [str(fasta), "truncated or corrupt", "record"]


def empty_fasta(tmp: Path) -> tuple[list[str], list[str]]:
    fasta = _write(tmp / "empty.fasta", b"")
    return [f"data.sequences={fasta}"], [str(fasta), "empty"]


def empty_labels(tmp: Path) -> tuple[list[str], list[str]]:
    labels = _write(tmp / "labels.csv", gzip.compress(b""))
    return [f"data.labels={labels}"], [str(labels), "empty"]


def missing_id_column(tmp: Path) -> tuple[list[str], list[str]]:
    labels = tmp / "labels.csv"
    real_labels().rename(columns={"id": "accession"}).to_csv(labels, index=False)
    return [f"data.labels={labels}"], [str(labels), "no 'id' column", "accession"]


def missing_species_column(tmp: Path) -> tuple[list[str], list[str]]:
    labels = tmp / "labels.csv"
    real_labels().drop(columns="species").to_csv(labels, index=False)
    return [f"data.labels={labels}"], [str(labels), "no 'species' column"]


def duplicate_ids(tmp: Path) -> tuple[list[str], list[str]]:
    records = real_records()
    twice = pd.concat([records, records.iloc[[5]].assign(sequence=records[C.SEQUENCE].iloc[6])])
    fasta = _write(tmp / "dup.fasta", fasta_text(twice))
    return [f"data.sequences={fasta}"], [str(fasta), repr(records[C.ID].iloc[5]), "data.drop_duplicate_ids=true"]


def unmatched_ids(tmp: Path) -> tuple[list[str], list[str]]:
    table = real_labels()
    gone = table[C.ID].iloc[3]
    labels = tmp / "labels.csv"
    pd.concat([table.drop(index=3), table.iloc[[0]].assign(id="XX000001")]).to_csv(labels, index=False)
    return [f"data.labels={labels}"], [str(labels), str(SAMPLE_FASTA), repr(gone), "'XX000001'",
                                       "data.drop_unmatched_ids=true"]


def one_species(tmp: Path) -> tuple[list[str], list[str]]:
    labels = tmp / "labels.csv"
    real_labels().assign(species="Thryssa setirostris", genus="Thryssa").to_csv(labels, index=False)
    return [f"data.labels={labels}"], [str(labels), "only 1 species", "at least 2"]


def labels_as_sequences(tmp: Path) -> tuple[list[str], list[str]]:
    return [f"data.sequences={SAMPLE_LABELS}"], [str(SAMPLE_LABELS), "line 1", "CSV given as the sequences"]


def fasta_as_labels(tmp: Path) -> tuple[list[str], list[str]]:
    return [f"data.labels={SAMPLE_FASTA}"], [str(SAMPLE_FASTA), "FASTA file given as the labels", "data.labels"]


def folds_file_with_an_empty_fold(tmp: Path) -> tuple[list[str], list[str]]:
    """The user's folds 0..4, with fold 3 renamed 4: fold 3 holds no record."""
    assert main(["prepare", "--out", str(tmp / "good"), *SAMPLE]) == 0
    records = pd.read_parquet(tmp / "good" / C.RECORDS_FILE)
    folds = tmp / "folds.csv"
    records[[C.ID, C.FOLD]].replace({C.FOLD: {"3": "4"}}).to_csv(folds, index=False)
    return [f"data.folds_file={folds}"], [str(folds), "fold(s) 3", "data.n_folds=4"]


def vectors_with_text(tmp: Path) -> tuple[list[str], list[str]]:
    ids = real_records()[C.ID]
    vectors = pd.DataFrame({C.ID: ids, "depth_m": [str(10 + i % 7) for i in range(len(ids))]})
    vectors.loc[10, "depth_m"] = "deep"
    path = tmp / "vectors.csv"
    vectors.to_csv(path, index=False)
    return [f"data.vectors={path}"], [str(path), "'depth_m'", "'deep'", repr(ids.iloc[10])]


def clusters_with_unknown_ids(tmp: Path) -> tuple[list[str], list[str]]:
    ids = real_records()[C.ID].tolist()
    clusters = pd.DataFrame({C.ID: ids + ["XX999999"], C.CLUSTER: [f"c{i // 3}" for i in range(len(ids) + 1)]})
    path = tmp / "clusters.csv"
    clusters.to_csv(path, index=False)
    return [f"data.clusters={path}"], [str(path), "'XX999999'", "have no sequence"]


def value_of_the_wrong_type(tmp: Path) -> tuple[list[str], list[str]]:
    return ["data.n_folds=2.5"], ["data.n_folds", "2.5", "whole number"]


def yaml_value_of_the_wrong_type(tmp: Path) -> tuple[list[str], list[str]]:
    config = _write(tmp / "c.yaml", "train:\n  epochs: [1]\nmodel:\n  trust_remote_code: yes please\n")
    return ["--config", str(config)], [str(config), "train.epochs", "[1]", "whole number"]


def broken_yaml(tmp: Path) -> tuple[list[str], list[str]]:
    config = _write(tmp / "c.yaml", "data:\n  n_folds: [5\n")
    return ["--config", str(config)], [str(config), "not a readable YAML config"]


SAMPLE = [f"data.sequences={SAMPLE_FASTA}", f"data.labels={SAMPLE_LABELS}"]
PREPARE_CASES: list[Callable[[Path], tuple[list[str], list[str]]]] = [
    sequence_before_header, binary_bytes, truncated_gzip, empty_fasta, empty_labels, missing_id_column,
    missing_species_column, duplicate_ids, unmatched_ids, one_species, labels_as_sequences, fasta_as_labels,
    folds_file_with_an_empty_fold, vectors_with_text, clusters_with_unknown_ids, value_of_the_wrong_type,
    yaml_value_of_the_wrong_type, broken_yaml,
]


@pytest.mark.parametrize("case", PREPARE_CASES, ids=lambda f: f.__name__)
def test_prepare_refuses_broken_input(tmp_path, caplog, case):
    args, named = case(tmp_path)
    out = tmp_path / "prepared"
    refused(["prepare", "--out", str(out), *SAMPLE, *args], caplog, *named)
    nothing_complete(out)


def test_a_config_value_of_the_wrong_type_names_key_value_and_type(tmp_path, caplog):
    message = refused(["prepare", "--out", str(tmp_path / "p"), "model.trust_remote_code=yes please"], caplog)
    assert message == "model.trust_remote_code must be true or false, not 'yes please' (str)"
    assert "train.epochs must be a whole number, not 'abc'" in refused(
        ["prepare", "--out", str(tmp_path / "p"), "train.epochs=abc"], caplog)


# ------------------------------------------------------------------------------------------- cv, train, predict


KMER = ["model.kind=kmer-nb", "engine.enabled=false"]
"""The config of the cv run, and of the train runs given it."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The sample prepared twice (seeds 0 and 1) and once without a test split, and a k-mer cv run on seed 0."""
    work = tmp_path_factory.mktemp("runs")
    for name, extra in (("prepared", []), ("reseeded", ["data.seed=1"]), ("no_test", ["data.test_fraction=0"])):
        assert main(["prepare", "--out", str(work / name), *SAMPLE, *extra]) == 0
    return work


@pytest.fixture(scope="module")
def kmer_cv(runs) -> Path:
    """`idengine cv` with a k-mer model (no Ray; no engine step, which takes minutes here) on the seed-0 set."""
    with without_ray():
        assert main(["cv", "--prepared", str(runs / "prepared"), "--out", str(runs / "cv"), *KMER]) == 0
    return runs / "cv"


def test_cv_refuses_a_directory_that_is_not_prepared(tmp_path, caplog, no_ray):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sequences.fasta").write_text(fasta_text(real_records().head(3)))
    out = tmp_path / "cv"
    refused(["cv", "--prepared", str(tmp_path / "mine"), "--out", str(out)], caplog,
            str(tmp_path / "mine"), "not a prepared directory", "idengine prepare")
    nothing_complete(out)
    assert no_ray == []  # refused before Ray would start


def test_cv_refuses_a_config_value_of_the_wrong_type(runs, tmp_path, caplog, no_ray):
    out = tmp_path / "cv"
    refused(["cv", "--prepared", str(runs / "prepared"), "--out", str(out), "train.epochs=[1]"], caplog,
            "train.epochs", "[1]", "whole number")
    nothing_complete(out)


def test_cv_refuses_a_prepared_directory_with_a_corrupt_table(runs, tmp_path, caplog, no_ray):
    import shutil

    broken = shutil.copytree(runs / "prepared", tmp_path / "prepared")
    table = broken / C.RECORDS_FILE
    table.write_bytes(table.read_bytes()[:200])
    out = tmp_path / "cv"
    refused(["cv", "--prepared", str(broken), "--out", str(out)], caplog, C.RECORDS_FILE)
    nothing_complete(out)


def test_train_refuses_a_directory_that_is_not_prepared(runs, kmer_cv, tmp_path, caplog, no_ray):
    out = tmp_path / "model"
    refused(["train", "--prepared", str(kmer_cv), "--cv", str(kmer_cv), "--out", str(out)], caplog,
            str(kmer_cv), "not a prepared directory")
    nothing_complete(out)


def test_train_refuses_a_cv_directory_that_is_not_one(runs, tmp_path, caplog, no_ray):
    out = tmp_path / "model"
    refused(["train", "--prepared", str(runs / "prepared"), "--cv", str(runs / "prepared"), "--out", str(out)],
            caplog, f"--cv {runs / 'prepared'}", "not a cv directory", "idengine cv")
    nothing_complete(out)


def test_train_refuses_a_prepared_set_without_a_test_split(runs, kmer_cv, tmp_path, caplog, no_ray):
    out = tmp_path / "model"
    refused(["train", "--prepared", str(runs / "no_test"), "--cv", str(kmer_cv), "--out", str(out), *KMER],
            caplog, str(runs / "no_test"), "no test split", "data.test_fraction")
    nothing_complete(out)


def test_train_refuses_a_cv_run_of_another_prepared_set(runs, kmer_cv, tmp_path, caplog, no_ray):
    """cv ran on the seed-0 folds; the reseeded set's test split holds records that cv validated (and so tuned on)."""
    out = tmp_path / "model"
    refused(["train", "--prepared", str(runs / "reseeded"), "--cv", str(kmer_cv), "--out", str(out), *KMER],
            caplog, str(kmer_cv), "cv")
    nothing_complete(out)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A real exported artifact of the tiny model over real species (no training: see test_export.make_artifact)."""
    from test_export import make_artifact

    return make_artifact(tmp_path_factory.mktemp("artifact") / "model")[0]


def test_predict_refuses_a_missing_model(tmp_path, caplog, no_ray):
    out = tmp_path / "out" / "calls.csv"
    refused(["predict", "--model", str(tmp_path / "nope"), "--sequences", str(SAMPLE_FASTA), "--out", str(out)],
            caplog, str(tmp_path / "nope"), "--model")
    nothing_complete(out.parent)


def test_predict_refuses_a_tampered_artifact(artifact, tmp_path, caplog, no_ray):
    import shutil

    model = shutil.copytree(artifact, tmp_path / "model")
    (model / C.LABEL_MAP_FILE).write_text((model / C.LABEL_MAP_FILE).read_text().replace("Thryssa", "Thrysa"))
    out = tmp_path / "out" / "calls.csv"
    refused(["predict", "--model", str(model), "--sequences", str(SAMPLE_FASTA), "--out", str(out)], caplog,
            str(model), C.LABEL_MAP_FILE)
    nothing_complete(out.parent)


def test_predict_refuses_a_query_that_is_not_fasta(tmp_path, caplog, no_ray):
    (tmp_path / "model").mkdir()  # checked before the model is read
    out = tmp_path / "out" / "calls.csv"
    refused(["predict", "--model", str(tmp_path / "model"), "--sequences", str(SAMPLE_LABELS), "--out", str(out)],
            caplog, str(SAMPLE_LABELS), "line 1", "CSV given as the sequences")
    nothing_complete(out.parent)


def test_predict_refuses_a_config_value_of_the_wrong_type(tmp_path, caplog, no_ray):
    out = tmp_path / "out" / "calls.csv"
    refused(["predict", "--model", str(tmp_path / "model"), "--sequences", str(SAMPLE_FASTA), "--out", str(out),
             "predict.top_k=five"], caplog, "predict.top_k", "'five'", "whole number")
    nothing_complete(out.parent)


PROTEINS = {  # real protein sequences (UniProt P69905 HBA_HUMAN, P68871 HBB_HUMAN, P0DP23 CALM1_HUMAN; N-termini)
    "HBA_HUMAN": "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL",
    "HBB_HUMAN": "MVHLTPEEKSAVTALWGKVNVDEVGGEALGRLLVVYPWTQRFFESFGDLSTPDAVMGNPKVKAHGKKVLGAFSDGLAHLDNLKGTFATLSEL",
    "CALM1_HUMAN": "MADQLTEEQIAEFKEAFSLFDKDGDGTITTKELGTVMRSLGQNPTEAELQDMINEVDADGNGTIDFPEFLTMMARKMKDTDSEEEIREAFRV",
}


@pytest.mark.integration
def test_predict_refuses_a_query_of_protein_sequences(ray_session, artifact, tmp_path, caplog):
    query = _write(tmp_path / "proteins.fasta", "".join(f">{k} protein\n{v}\n" for k, v in PROTEINS.items()))
    out = tmp_path / "out" / "calls.csv"
    refused(["predict", "--model", str(artifact), "--sequences", str(query), "--out", str(out)], caplog,
            str(query), "HBA_HUMAN", "protein")
    nothing_complete(out.parent)
