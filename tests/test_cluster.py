"""Real Ray processes: `ray start --head` + `ray job submit` of the tiny tune job, a simulated 2-node cluster running
one fold across both nodes, and a tune experiment interrupted and resumed without re-running finished trials."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

from idengine.config_io import load_config
from idengine.recipes.prepare import prepare_dataset

pytestmark = pytest.mark.integration
VENV_BIN = str(Path(sys.executable).parent)


def _env(tmp_path: Path) -> dict:
    # `python` in a job's entrypoint must be this interpreter, with idengine importable.
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "TOKENIZERS_PARALLELISM": "false", "HOME": os.environ.get("HOME", str(tmp_path))}


def _wait_for_dashboard(port: int, head: subprocess.Popen, seconds: float = 180) -> None:
    """`ray start --block` returns nothing when the head is ready: poll the job API until it answers."""
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the Ray dashboard on port {port} did not answer within {seconds} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_fold_prepared(tmp_path_factory) -> Path:
    """The bundled example with 2 folds: enough for a tune objective, half the time of 5."""
    config = load_config(REPO / "jobs" / "configs" / "tiny-cpu.yaml", [
        f"data.sequences={REPO / 'examples/12s-fish-mini/sequences.fasta.gz'}",
        f"data.labels={REPO / 'examples/12s-fish-mini/labels.csv'}", "data.n_folds=2"])
    return prepare_dataset(config, tmp_path_factory.mktemp("two-fold") / "prepared")


def _tune_args(prepared: Path, out: Path, storage: Path, *extra: str) -> list[str]:
    return ["--config", "jobs/configs/tiny-cpu.yaml", "--prepared", str(prepared), "--out", str(out),
            f"train.storage_path={storage}", "train.epochs=1", "train.train_eval_size=32", *extra]


def test_ray_job_submit_runs_the_tiny_tune_job_on_a_local_head(two_fold_prepared, tmp_path):
    port, dash = _free_port(), _free_port()
    temp = Path(f"/tmp/idg-head-{os.getpid()}")
    head = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--num-cpus=2", "--include-dashboard=true",
         # Ports of their own: another Ray on this machine (the test session's) may hold the defaults.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}", "--block"],
        cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_dashboard(dash, head)
        out = tmp_path / "tune"
        command = [f"{VENV_BIN}/ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                   "--", "python", "jobs/tune.py",
                   *_tune_args(two_fold_prepared, out, tmp_path / "ray", "tune.num_samples=2", "tune.scheduler=fifo")]
        for _ in range(12):  # the job agent starts some seconds after the dashboard answers
            submit = subprocess.run(command, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                                    timeout=900, start_new_session=True)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()  # "Job 'raysubmit_...' succeeded"
        trials = pd.read_csv(out / "trials.csv")
        assert len(trials) == 2 and (trials["status"] == "COMPLETE").all()
        assert list(trials["mean_pr_auc_macro"]) == sorted(trials["mean_pr_auc_macro"], reverse=True)
        best = load_config(out / "best_config.yaml")
        assert best.train.lr == pytest.approx(trials.iloc[0]["config/train.lr"])
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # killing the head's process group ends all its processes
        head.wait(timeout=60)


def test_a_fold_runs_with_workers_on_two_nodes(prepared_example, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "two_node_fold.py"),
                             str(prepared_example), str(tmp_path)], cwd=REPO, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["alive_nodes"] == 2 and summary["slots"] == 2
    assert summary["epochs"] == [1]
    assert summary["val_rows"] == summary["val_ids"] > 0


def _finished_trials(storage: Path) -> dict[str, int]:
    """Trial directory -> number of results in its result.json, for trials that reported every fold."""
    done = {}
    for result in storage.glob("idengine-tune/*/result.json"):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        if lines and lines[-1].get("folds_done") == 2:
            done[result.parent.name] = len(lines)
    return done


def test_an_interrupted_tune_resumes_without_rerunning_finished_trials(two_fold_prepared, tmp_path):
    storage, out = tmp_path / "ray", tmp_path / "tune"
    args = _tune_args(two_fold_prepared, out, storage, "tune.num_samples=3", "tune.scheduler=fifo")
    cmd = [f"{VENV_BIN}/idengine", "tune", *args]
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not _finished_trials(storage) and time.time() < deadline and first.poll() is None:
        time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)  # a crash, not a polite stop
    first.wait(timeout=60)
    finished = _finished_trials(storage)
    assert finished, "no trial finished before the interruption"
    assert not (out / "trials.csv").exists()
    time.sleep(2)
    resumed = subprocess.run([f"{VENV_BIN}/idengine", "tune", "--resume", *args], cwd=REPO, env=_env(tmp_path),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    after = _finished_trials(storage)
    assert len(after) == 3
    for trial, n_results in finished.items():
        assert after[trial] == n_results, f"{trial} was run again"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and (trials["status"] == "COMPLETE").all()
