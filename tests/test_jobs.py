"""The README's main job, run as a user runs it: `python jobs/run_example.py` on the bundled example, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from idengine import layout as C
from idengine.data.fasta import read_fasta

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "12s-fish-mini"

PROMISED = {  # the README's "Outputs of the main job" paragraph
    "prepared": {C.RECORDS_FILE, C.UNKNOWN_FILE, C.LABEL_MAP_FILE, C.DROPPED_FILE, C.REPORT_JSON, C.REPORT_MD,
                 C.CLASS_SIZES_PNG, C.CONFIG_FILE},
    "cv": {C.METRICS_FILE, C.OOF_FILE, C.SUMMARY_FILE, C.CONFIG_FILE, C.FOLD_HISTORY_DIR},
    "model": {C.MANIFEST, C.CALIBRATION, C.LABEL_MAP_FILE, C.CONFIG_FILE, C.METRICS_FILE, C.RELIABILITY_PNG,
              C.FINAL_REPORT_MD, C.README},
}


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> Path:
    """`python jobs/run_example.py --config jobs/configs/tiny-cpu.yaml --out <tmp>` from the repo root."""
    out = tmp_path_factory.mktemp("main-job") / "example"
    ray_tmp = Path(tempfile.mkdtemp(prefix="idj-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": str(ray_tmp)}
    command = [sys.executable, "jobs/run_example.py", "--config", "jobs/configs/tiny-cpu.yaml", "--out", str(out),
               f"train.storage_path={out.parent / 'ray'}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


@pytest.mark.integration
def test_main_job_writes_what_the_readme_promises(main_job):
    for directory, files in PROMISED.items():
        present = {p.name for p in (main_job / directory).iterdir()}
        assert files <= present, f"{directory}/ lacks {sorted(files - present)}"
    assert not [p for p in main_job.iterdir() if p.name.startswith(".")]  # no staging directory left behind
    metrics = json.loads((main_job / "cv" / C.METRICS_FILE).read_text())
    assert len(metrics["folds"]) == 5 and metrics["kind"] == "transformer"


@pytest.mark.integration
def test_main_job_calls_every_input_record_once_in_file_order(main_job):
    fasta, _ = read_fasta(EXAMPLE / "sequences.fasta.gz")
    calls = pd.read_csv(main_job / "calls.csv", keep_default_na=False)
    errors = pd.read_csv(main_job / f"calls.csv{C.ERRORS_SUFFIX}", keep_default_na=False)
    assert len(calls) + len(errors) == len(fasta) == 415
    assert calls["id"].tolist() == [i for i in fasta[C.ID] if i not in set(errors["id"])]
    assert calls["record"].tolist() == sorted(calls["record"])
    assert {"call", "call_rank", "call_prob", "top1_species", "top1_prob"} <= set(calls.columns)
