"""Faults, measured (issue #14, part 3): what a crash, a tampered file, a second process or a full disk leaves behind.

Cheap cases run here; `bench/faults.py` repeats the slow ones at more kill points and writes bench/results/faults.json.
Kept where they were (listed in that JSON too): a fold worker killed mid-run resumes
(tests/test_ray_train.py::test_a_worker_that_dies_after_a_checkpoint_resumes, tests/test_loop.py's resume replay) and
a killed tune driver resumes without re-running finished trials
(tests/test_cluster.py::test_an_interrupted_tune_resumes_without_rerunning_finished_trials).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, tiny_test_config

from idengine import layout as C
from idengine.config import PredictConfig
from idengine.deploy.artifact import load_artifact, verify_artifact
from idengine.storage import building, file_sha256, remove_stale_temps

sys.path.insert(0, str(REPO / "bench"))
from predict_stream import PROGRESS, cli_env, mutated_records, write_queries  # noqa: E402

VENV_BIN = Path(sys.executable).parent
EXAMPLE = REPO / "examples" / "12s-fish-mini"
FULL = "out of space / file too large"
BAD_RECORDS = ">protein_rec\nMKVLAAGIVGLLLAQEWRSTPYHDGGKVLAAGIVGLLLAQEWRSTPYHDGG\n>empty_rec\n\n"

READER = """
import os, sys
path, stop = sys.argv[1:]
looks = misses = 0
open(stop + ".ready", "w").close()
while not os.path.exists(stop):
    looks += 1
    misses += not os.path.exists(path)
print(looks, misses)
"""


def test_a_reader_never_finds_the_directory_missing_while_it_is_replaced(tmp_path):
    """publish_dir swaps the new directory in (renameat2 RENAME_EXCHANGE): a reader in another process looking all
    the while sees the old one or the new one, never nothing, and nothing is left beside it."""
    out, stop = tmp_path / "model", tmp_path / "stop"
    with building(out) as tmp:
        (tmp / C.MANIFEST).write_text("0")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out / C.MANIFEST), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not Path(f"{stop}.ready").exists() and time.time() < deadline:
        time.sleep(0.01)
    for i in range(1, 301):
        with building(out) as tmp:
            (tmp / C.MANIFEST).write_text(str(i))
    stop.touch()
    looks, misses = map(int, reader.communicate(timeout=60)[0].split())
    assert looks > 300 and misses == 0, (looks, misses)
    assert (out / C.MANIFEST).read_text() == "300"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stop", "stop.ready"]


def test_the_leftovers_of_a_killed_run_are_removed_and_a_live_runs_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host, out = socket.gethostname(), tmp_path / "calls.csv"
    stale_file = tmp_path / f".calls.csv.tmp-{dead}@{host}-0a1b2c3d"  # a killed predict's calls so far
    stale_dir = tmp_path / f".calls.csv.tmp-{dead}@{host}-x1"  # a killed run's staging directory
    stale_file.write_text("id,call\nq1,Gadus morhua\n")
    (stale_dir / "engine").mkdir(parents=True)
    kept = [tmp_path / f".calls.csv.tmp-{os.getpid()}@{host}-0a1b2c3e",  # a run still going: this one
            tmp_path / f".calls.csv.tmp-{dead}@another-host-0a1b2c3f",  # another machine's (shared disk)
            tmp_path / f".calls.csv.errors.csv.tmp-{dead}@{host}-0a1b2c40",  # another output's
            tmp_path / ".calls.csv.tmp-q2c5t_9z"]  # no owner in the name
    for path in kept:
        path.write_text("")
    assert sorted(remove_stale_temps(out)) == sorted([stale_file, stale_dir])
    assert all(p.exists() for p in kept) and not stale_file.exists() and not stale_dir.exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A real exported artifact of the tiny transformer (no training, no engine: see test_export.make_artifact)."""
    from test_export import make_artifact

    return make_artifact(tmp_path_factory.mktemp("tiny") / "model")[0]


def _flip_last_byte(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return data


def test_an_artifact_with_any_one_file_altered_or_missing_is_refused_naming_it(tiny_model, tmp_path):
    directory = shutil.copytree(tiny_model, tmp_path / "model")
    names = sorted(verify_artifact(directory)["files"])
    assert {"adapter_model.safetensors", C.LABEL_MAP_FILE, C.CALIBRATION, "base/model.safetensors"} <= set(names)
    for name in names:
        original = _flip_last_byte(directory / name)
        with pytest.raises(ValueError, match=rf"sha256 mismatch for \['{re.escape(name)}'\]"):
            load_artifact(directory)
        (directory / name).write_bytes(original)
    (directory / C.CALIBRATION).unlink()
    with pytest.raises(ValueError, match=rf"missing \['{C.CALIBRATION}'\]"):
        load_artifact(directory)
    manifest = directory / C.MANIFEST
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match=C.MANIFEST):
        load_artifact(directory)


def test_predict_logs_records_done_and_records_per_second(tiny_model, tmp_path, monkeypatch, caplog):
    import logging

    from idengine.deploy import predict

    queries = write_queries(tmp_path / "q.fasta", 250)
    monkeypatch.setattr(predict, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(predict, "CHUNK_RECORDS", 100)
    with caplog.at_level(logging.INFO, logger="idengine.deploy.predict"):
        predict.predict_file(tiny_model, queries, tmp_path / "calls.csv", PredictConfig(), use_ray=False)
    lines = [(int(m[1]), int(m[2]), int(m[3])) for m in PROGRESS.finditer(caplog.text)]
    # one line per block of records here (at most every PROGRESS_SECONDS otherwise)
    assert [done for done, _, _ in lines] == [100, 200, 250]
    assert all(rate > 0 and since > 0 for _, rate, since in lines)
    assert "predict: 250 records called, 0 reported" in caplog.text


def _limited(max_bytes: int):
    """preexec_fn: a file-size limit (`ulimit -f`), with SIGXFSZ ignored so that a write past it fails with EFBIG."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return limit


def test_prepare_past_the_file_size_limit_fails_clearly_and_leaves_nothing(tmp_path):
    out = tmp_path / "prepared"
    cmd = [str(VENV_BIN / "idengine"), "prepare", "--config", str(REPO / "jobs/configs/tiny-cpu.yaml"), "--out",
           str(out), f"data.sequences={EXAMPLE / 'sequences.fasta.gz'}", f"data.labels={EXAMPLE / 'labels.csv'}"]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(32 * 1024))
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(rf"ERROR idengine: {re.escape(str(out))}: {FULL}", done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no prepared/, no staging directory beside it


SAFETENSORS_UNDER_LIMIT = """
import sys
import numpy as np
from safetensors.numpy import save_file
from idengine.errors import InputError
from idengine.storage import building
try:
    with building(sys.argv[1]) as tmp:
        save_file({"w": np.zeros(100_000, dtype=np.float32)}, str(tmp / "model.safetensors"))
except InputError as err:
    print(err)
    sys.exit(2)
"""


def test_a_library_that_words_a_full_disk_its_own_way_is_still_understood(tmp_path):
    """safetensors raises its own SafetensorError ("... (os error 27)"), not OSError: `building` still names the
    output and the cause, and removes the staging directory."""
    out = tmp_path / "model"
    done = subprocess.run([sys.executable, "-c", SAFETENSORS_UNDER_LIMIT, str(out)], capture_output=True, text=True,
                          timeout=120, preexec_fn=_limited(64 * 1024))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.startswith(f"{out}: {FULL}") and "(File too large)" in done.stdout, done.stdout
    assert list(tmp_path.iterdir()) == []


PREDICT_UNDER_LIMIT = """
import sys
from idengine.config import PredictConfig
from idengine.deploy.predict import predict_file
from idengine.errors import InputError
try:
    predict_file(sys.argv[1], sys.argv[2], sys.argv[3], PredictConfig(), use_ray=False)
except InputError as err:
    print(err)
    sys.exit(2)
"""


def test_predict_past_the_file_size_limit_fails_clearly_and_leaves_nothing(tiny_model, tmp_path):
    from idengine.deploy.predict import predict_file

    queries = write_queries(tmp_path / "q.fasta", 150)
    out = tmp_path / "out" / "calls.csv"
    done = subprocess.run([sys.executable, "-c", PREDICT_UNDER_LIMIT, str(tiny_model), str(queries), str(out)],
                          env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=_limited(16 * 1024))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.startswith(f"{out}: {FULL}"), done.stdout
    assert list(out.parent.iterdir()) == []  # no calls.csv, no errors file, no temporary
    # without the limit the same call writes every record: the limit, not the input, was the problem
    predict_file(tiny_model, queries, out, PredictConfig(), use_ray=False)
    assert len(pd.read_csv(out)) == 150 and out.stat().st_size > 16 * 1024


# ---- integration: `idengine predict` / `idengine train` processes, each with its own Ray -------------------------

N_QUERIES = 1500


@pytest.fixture(scope="module")
def engine_model(prepared_example, tmp_path_factory):
    """cv + train of the bundled example with kmer-nb (the engine included): the artifact the faults hit."""
    from idengine.recipes.cv import run_cv
    from idengine.recipes.train import train_final

    work = tmp_path_factory.mktemp("faults")
    config = tiny_test_config(work, "model.kind=kmer-nb")
    cv = run_cv(config, prepared_example, work / "cv")
    return {"prepared": prepared_example, "cv": cv, "model": train_final(config, prepared_example, cv, work / "model"),
            "storage": work / "ray"}


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """Mutated real 12S records, then two records predict must report as unusable."""
    path = write_queries(tmp_path_factory.mktemp("queries") / "q.fasta", N_QUERIES)
    with open(path, "a") as handle:
        handle.write(BAD_RECORDS)
    return path


def _predict(model: Path, sequences: Path, out: Path) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "idengine"), "predict", "--model", str(model), "--sequences", str(sequences), "--out",
           str(out)]
    log = open(out.with_name(out.name + ".log"), "w")
    return subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log(out: Path) -> str:
    return out.with_name(out.name + ".log").read_text(errors="replace")


@pytest.fixture(scope="module")
def two_at_once(engine_model, queries, tmp_path_factory) -> list[Path]:
    """Two `idengine predict` processes started together on one artifact; their calls files."""
    work = tmp_path_factory.mktemp("two")
    outs = [work / "a.csv", work / "b.csv"]
    runs = [_predict(engine_model["model"], queries, out) for out in outs]
    for run, out in zip(runs, outs):
        assert run.wait(timeout=900) == 0, _log(out)[-3000:]
    return outs


@pytest.mark.integration
def test_two_predicts_on_one_artifact_at_once_both_succeed_with_identical_calls(two_at_once, engine_model):
    a, b = two_at_once
    assert a.read_bytes() == b.read_bytes()
    assert (a.with_name(a.name + C.ERRORS_SUFFIX).read_bytes() == b.with_name(b.name + C.ERRORS_SUFFIX).read_bytes())
    calls = pd.read_csv(a)
    assert calls["id"].tolist() == [rid for rid, _ in mutated_records(N_QUERIES)]
    assert "nearest_identity" in calls.columns  # the engine made these calls
    verify_artifact(engine_model["model"])  # neither process changed the artifact


def _wait_for(found, process: subprocess.Popen, seconds: float = 900):
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        hit = found()
        if hit:
            return hit
        time.sleep(0.01)
    raise AssertionError(f"never found what was awaited (exit code {process.poll()})")


@pytest.mark.integration
def test_predict_killed_mid_file_leaves_no_calls_file_and_a_rerun_is_byte_identical(engine_model, queries,
                                                                                     two_at_once, tmp_path):
    out = tmp_path / "calls.csv"
    run = _predict(engine_model["model"], queries, out)
    partial = _wait_for(lambda: [p for p in tmp_path.glob(".calls.csv.tmp-*") if p.stat().st_size > 0], run)
    os.killpg(run.pid, signal.SIGKILL)  # a crash: driver, raylet and actor at once
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists() and not out.with_name(out.name + C.ERRORS_SUFFIX).exists()
    rows = sum(1 for _ in open(partial[0])) - 1
    assert 0 < rows < N_QUERIES, rows  # it was killed mid-file, and what it wrote is only a hidden temporary
    rerun = _predict(engine_model["model"], queries, out)
    assert rerun.wait(timeout=900) == 0, _log(out)[-3000:]
    assert "leftover(s) of interrupted runs" in _log(out)
    assert out.read_bytes() == two_at_once[0].read_bytes()
    errors = two_at_once[0].with_name(two_at_once[0].name + C.ERRORS_SUFFIX)
    assert out.with_name(out.name + C.ERRORS_SUFFIX).read_bytes() == errors.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.csv", "calls.csv.errors.csv", "calls.csv.log"]


@pytest.mark.integration
def test_train_killed_during_export_leaves_the_previous_artifact_intact_and_usable(engine_model, queries, tmp_path):
    from idengine.deploy.predict import predict_file

    model = shutil.copytree(engine_model["model"], tmp_path / "model")
    before = {p.relative_to(model).as_posix(): file_sha256(p) for p in model.rglob("*") if p.is_file()}
    cmd = [str(VENV_BIN / "idengine"), "train", "--config", str(REPO / "jobs/configs/tiny-cpu.yaml"), "--prepared",
           str(engine_model["prepared"]), "--cv", str(engine_model["cv"]), "--out", str(model), "model.kind=kmer-nb",
           f"train.storage_path={engine_model['storage']}", "train.epochs=2", "train.patience=0",
           "train.num_workers=0", "train.train_eval_size=64"]
    with open(tmp_path / "train.log", "w") as log:
        run = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # write_artifact saves the classifier, then engine/, then the small files, the manifest, then the export check
    staging = _wait_for(lambda: [p for p in tmp_path.glob(".model.tmp-*") if (p / "engine").is_dir()], run)
    os.killpg(run.pid, signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "train.log").read_text()[-3000:]
    after = {p.relative_to(model).as_posix(): file_sha256(p) for p in model.rglob("*") if p.is_file()}
    assert after == before
    artifact = load_artifact(model)  # every sha256 checked again
    records = list(mutated_records(40, seed=1))
    assert len(artifact.calls([r for r, _ in records], [s for _, s in records])) == 40
    calls = predict_file(model, queries, tmp_path / "calls.csv", PredictConfig(), use_ray=False)
    assert len(pd.read_csv(calls)) == N_QUERIES
    assert remove_stale_temps(model) == staging  # the killed run's staging directory goes with the next run


@pytest.mark.parametrize("failures", [1, 2])
def test_a_local_ray_that_fails_to_start_is_tried_again_then_named_with_what_to_check(monkeypatch, failures):
    """Ray failing to start (as it does under a small `ulimit -f`: bench/faults.py runs that for real, 3 minutes of
    startup timeouts) is tried once more; a second failure is an InputError (exit code 2) saying what to check."""
    import ray

    import idengine.recipes.runtime as runtime
    from idengine.errors import InputError

    tries = []

    def init(**kwargs):
        tries.append(kwargs)
        if len(tries) <= failures:
            raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(runtime, "RETRY_WAIT_S", 0.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(runtime.WORKER_NICENESS, "")  # recorded, so that teardown restores the real environment
    monkeypatch.delenv(runtime.WORKER_NICENESS)
    if failures < runtime.START_TRIES:
        runtime.init_ray(None)
    else:
        with pytest.raises(InputError, match=r"Ray could not start .*timed out during startup.*ulimit -f.*RAY_TMPDIR"):
            runtime.init_ray(None)
    assert len(tries) == min(failures + 1, runtime.START_TRIES)
    assert all(t == {"address": "local", "dashboard_host": "127.0.0.1"} for t in tries)
    assert os.environ[runtime.WORKER_NICENESS] == "0"  # its workers run at the command's own priority
