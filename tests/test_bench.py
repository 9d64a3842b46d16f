"""bench/run_bench.py end to end on the bundled example: table and JSON hold every column and the cv numbers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import peers  # noqa: E402
import run_bench  # noqa: E402

HEADER = ["model", "top-1", "macro F1", "top-5", "macro PR-AUC", "log loss", "ECE", "known: species calls",
          "open set: overclassified", "novel sp.: genus right", "train s/fold", "classify seqs/s", "peak MiB"]
ENGINE_ROW = "idengine engine (classifier kmer-nb)"


def run_cli(tmp: Path, models: list[str], folds_file: Path | None = None, timeout: int = 300) -> dict:
    """bench/run_bench.py on examples/12s-fish-mini through its real command line; the table, JSON and work dir."""
    out, work = tmp / "mini.md", tmp / "work"
    cmd = [sys.executable, str(REPO / "bench" / "run_bench.py"), "--data", str(REPO / "examples" / "12s-fish-mini"),
           "--models", *models, "--out", str(out), "--work", str(work), "--peer-queries-per-fold", "20"]
    cmd += ["--folds-file", str(folds_file)] if folds_file else []
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=timeout)
    return {"md": out.read_text(), "json": json.loads(out.with_suffix(".json").read_text()), "work": work}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """kmer-nb on examples/12s-fish-mini with a fold file, no peers."""
    tmp = tmp_path_factory.mktemp("bench")
    # A fold file: the example's computed folds, written as id,fold (what protocol-folds.csv is for 12s-fish).
    from idengine.config_io import load_config
    from idengine.recipes.prepare import build_prepared

    config = load_config(run_bench.BASE_CONFIG, ["data.test_fraction=0"])
    records = build_prepared(config)["records"]
    folds_file = tmp / "folds.csv"
    records[["id", "species", "fold"]].to_csv(folds_file, index=False)
    return {**run_cli(tmp, ["kmer-nb"], folds_file), "records": records}


def test_table_has_every_column_and_row(bench_run):
    # The row's note gives the open-set cutoff the model chose (or that none reached the precision target).
    assert re.search(r"^- kmer-nb: .*open set: \d+ queries, (calibrated p >= [0-9.]+|no threshold reaches)",
                     bench_run["md"], re.MULTILINE)
    lines = bench_run["md"].splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == HEADER
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| model")]
    names = [line.split("|")[1].strip() for line in body]
    assert names[0] == ENGINE_ROW and names[1].startswith("index alone") and names[2:] == ["kmer-nb"]
    assert all(len(line.strip("|").split("|")) == len(HEADER) for line in body)
    for key in ("Machine:", "cores", "GiB RAM", "idengine commit", "folds from file"):
        assert key in bench_run["md"]


def test_numbers_equal_cv_metrics(bench_run):
    row = next(r for r in bench_run["json"]["rows"] if r["name"] == "kmer-nb")
    cv = json.loads((bench_run["work"] / "cv" / "kmer-nb" / "metrics.json").read_text())
    for key, _ in run_bench.METRIC_COLUMNS:
        assert row["metrics"][key] == cv["mean"][key]
    line = next(line for line in bench_run["md"].splitlines() if line.startswith("| kmer-nb"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == f"{cv['mean']['top1_acc']['mean']:.3f} ± {cv['mean']['top1_acc']['sd']:.3f}"
    assert cells[4] == f"{cv['mean']['pr_auc_macro']['mean']:.3f} ± {cv['mean']['pr_auc_macro']['sd']:.3f}"
    assert row["train_s_per_fold"]["mean"] >= 0 and row["peak_mib"] > 50 and row["classify_seqs_per_s"] > 0
    assert 0.0 <= row["open_set"]["overclassified"] <= 1.0
    assert row["open_set"]["n"] == bench_run["json"]["dataset"]["unknown"]


def test_engine_rows_are_the_cv_engine_metrics(bench_run):
    """The engine's row and the index-alone row are the nested cv numbers `idengine cv` writes, on the same folds."""
    rows = {r["name"]: r for r in bench_run["json"]["rows"]}
    cv = json.loads((bench_run["work"] / "cv" / "kmer-nb" / "metrics.json").read_text())["engine"]
    engine = rows[ENGINE_ROW]
    for key, _ in run_bench.METRIC_COLUMNS:
        assert engine["metrics"][key] == cv["engine"][key]
    assert engine["open_world"]["known: species calls"] == cv["engine"]["known_called_species"]
    assert engine["open_world"]["open set: overclassified"] == cv["engine"]["over_classification"]
    index = next(r for name, r in rows.items() if name.startswith("index alone"))
    assert index["metrics"]["top1_acc"] == cv["index"]["top1_acc"]
    assert engine["classify_seqs_per_s"] > 0
    assert (bench_run["work"] / "cv" / "kmer-nb" / "engine").is_dir()  # what `idengine train` would need
    line = next(line for line in bench_run["md"].splitlines() if line.startswith(f"| {ENGINE_ROW}"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7] == f"{cv['engine']['known_called_species']['mean']:.3f} ± " \
        f"{cv['engine']['known_called_species']['sd']:.3f}"


def test_folds_come_from_the_file(bench_run):
    from idengine.data.prepared import read_prepared

    records, _ = read_prepared(bench_run["work"] / "prepared")
    given = dict(zip(bench_run["records"]["id"], bench_run["records"]["fold"].astype(str)))
    assert (records["fold"] == records["id"].map(given)).all()
    assert "test" not in set(records["fold"])


def test_engine_ceiling_reads_the_cv_and_counts_each_query_once(bench_run, tmp_path):
    """bench/engine_ceiling.py on the cv's engine outputs: shares that partition each scenario, checked per query."""
    import numpy as np

    from idengine.recipes.engine import read_engine
    from idengine.reference.evidence import FEATURES

    cv, out = bench_run["work"] / "cv" / "kmer-nb", tmp_path / "ceiling.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "engine_ceiling.py"), str(cv), "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    scenarios, options, _ = read_engine(cv)
    div, has_hit = FEATURES.index("sp_div"), FEATURES.index("sp_has_hit")
    alone = []
    for q in np.flatnonzero((scenarios["scenario"] == "known").to_numpy()):
        rows = (options.query == q) & (options.kind == 0) & (options.features[:, has_hit] > 0)
        best = options.features[rows, div].min() if rows.any() else None
        at_best = set(options.name[rows][options.features[rows, div] <= best + 1e-9]) if rows.any() else set()
        alone.append(at_best == {scenarios["truth_species"].iloc[q]})
    known = report["resolvability"]["known"]
    assert known["queries"] == len(alone) > 0
    assert known["truth_alone_at_best_identity"] == round(float(np.mean(alone)), 4)
    shares = ("truth_alone_at_best_identity", "truth_tied_at_best_identity", "truth_not_at_best_identity")
    assert abs(sum(known[k] for k in shares) - 1) < 1e-3
    is_known = scenarios["scenario"] == "known"
    for row in report["tradeoff_pooled"]:
        assert row["known_called"] == round(float((scenarios.loc[is_known, "species_prob"] >= row["threshold"])
                                                  .mean()), 4)


@pytest.mark.integration
@pytest.mark.skipif(any(peers.missing_binaries(p) for p in peers.PEERS), reason="BLAST+/VSEARCH not installed")
def test_peers_scored_on_the_same_folds(tmp_path):
    """With the tools installed: every peer row is measured on 20 queries per fold (slow on a loaded machine)."""
    run = run_cli(tmp_path, list(peers.PEERS), timeout=900)
    rows = {r["name"]: r for r in run["json"]["rows"]}
    for peer in peers.PEERS:
        assert rows[peer]["status"] == "ok" and 0.0 <= rows[peer]["metrics"]["top1_acc"]["mean"] <= 1.0
        assert rows[peer]["metrics"]["n"]["mean"] == 20 and 0.0 <= rows[peer]["open_set"]["overclassified"] <= 1.0
    assert "top5_acc" in rows["vsearch"]["metrics"] and "ece" in rows["sintax"]["metrics"]


def test_peer_row_skipped_without_binaries(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    rows = peers.run_peers(list(peers.PEERS), tmp_path / "absent-prepared", tmp_path, 10, 1, 0)
    assert [(r["name"], r["status"]) for r in rows] == [(p, "skipped") for p in peers.PEERS]
    assert all("not installed" in r["note"] for r in rows)
    assert all("| skipped |" in run_bench.table_row(r) for r in rows)


def test_top_label_ece_matches_idengine():
    import numpy as np

    from idengine.evaluate.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=200)
    y = rng.integers(0, 4, size=200)
    ours = peers.top_label_ece(probs.max(axis=1), probs.argmax(axis=1) == y)
    assert ours == pytest.approx(expected_calibration_error(y, probs), abs=1e-12)


@pytest.mark.integration
def test_probe_and_transformer_rows_with_open_set(tmp_path):
    """probe and tiny (1 epoch) each fill the open-set column: the probe refitted on all records, the transformer
    from each fold's checkpoint; both are rates of the example's set-aside species."""
    run = run_cli(tmp_path, ["probe", "tiny", "--epochs", "1", "--tiny-open-set"], timeout=900)
    rows = {r["name"]: r for r in run["json"]["rows"]}
    unknown = pd.read_parquet(run["work"] / "prepared" / "unknown.parquet")
    for name in ("probe", "tiny"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["open_set"]["n"] == len(unknown) > 0
        assert 0.0 <= row["open_set"]["overclassified"] <= 1.0
        if row["open_set"]["reachable"]:
            assert 0.0 < row["open_set"]["threshold"] <= 1.0
        else:  # too little training to reach the OOF precision target: nothing may be called
            assert row["open_set"]["threshold"] > 1.0 and row["open_set"]["overclassified"] == 0.0
    per_fold = rows["tiny"]["open_set"]["overclassified_per_fold"]
    assert len(per_fold) == len(rows["tiny"]["folds"]) == 5
    assert rows["tiny"]["open_set"]["overclassified"] == pytest.approx(sum(per_fold) / len(per_fold))
    md_rows = [line for line in run["md"].splitlines() if line.startswith(("| probe", "| tiny"))]
    assert len(md_rows) == 2 and all(line.split("|")[9].strip() not in ("", "–") for line in md_rows)
