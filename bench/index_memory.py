"""What the reference index adds to predict's peak memory (issue #12, part 7), on an artifact trained on a whole
reference (e.g. all of 12s-fish: 24,934 records).

    python bench/index_memory.py runs/full12s/model --out bench/results/index_memory.json

Each measurement runs in a fresh Python process and reads its own peak RSS (VmHWM, /proc/self/status):

1. **classifier only**: the artifact copied without engine/ (its files otherwise the same), loaded, and
   `Artifact.call_chunk` on `--queries` mutated 12S records in blocks as predict's actor gets them;
2. **with the engine**: the same on the whole artifact: the index is searched for every query;
3. **the index alone**: `load_index` of the artifact's reference.parquet (the prefilter rebuilt), RSS before/after.

(2) - (1) is what the engine (index, neighbours, decision model, its own k-mer model when the classifier is not
one) adds to one predict actor's peak. Then `idengine predict` end to end on the same queries, every process
sampled (bench/predict_stream.py's `run_measured`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from predict_stream import run_measured, write_queries  # noqa: E402
from run_bench import git_commit  # noqa: E402

CHILD = """
import json, re, sys, time
from pathlib import Path

def rss(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

mode, model, queries = sys.argv[1:]
from idengine.deploy.artifact import load_artifact
from idengine.deploy.predict import CHUNK_RECORDS, iter_chunks
from idengine.reference.index import load_index
from idengine import layout as L
out = {"rss_after_imports_mib": rss("VmRSS")}
t0 = time.perf_counter()
if mode == "index":
    index = load_index(Path(model) / "engine" / L.REFERENCE_FILE)
    out.update(seconds=time.perf_counter() - t0, n_ref=index.n_ref)
else:
    artifact = load_artifact(model, verify=False)
    out.update(load_s=time.perf_counter() - t0, rss_after_load_mib=rss("VmRSS"), engine=artifact.engine is not None)
    t0, n = time.perf_counter(), 0
    for chunk in iter_chunks(queries, artifact.config.data, CHUNK_RECORDS):
        n += len(artifact.call_chunk(chunk, 5, 64))
    out.update(call_s=time.perf_counter() - t0, queries=n)
out.update(rss_end_mib=rss("VmRSS"), peak_rss_mib=rss("VmHWM"))
print(json.dumps(out))
"""


def child(mode: str, model: Path, queries: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, mode, str(model), str(queries)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in json.loads(run.stdout.splitlines()[-1]).items()}


def without_engine(model: Path, into: Path) -> Path:
    """A copy of the artifact without engine/ (loaded with verify=False: the manifest still lists engine files)."""
    shutil.copytree(model, into, ignore=lambda d, names: ["engine", "merged"] if Path(d) == model else [])
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an artifact written by `idengine train` with its engine")
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "index_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        queries = write_queries(tmp / "queries.fasta", args.queries, seed=7)
        rows = {"index_alone": child("index", args.model, queries),
                "classifier_only": child("call", without_engine(args.model, tmp / "no-engine"), queries),
                "with_engine": child("call", args.model, queries)}
        rows["engine_adds_to_peak_mib"] = round(rows["with_engine"]["peak_rss_mib"] -
                                                rows["classifier_only"]["peak_rss_mib"], 1)
        rows["index_alone"]["index_adds_mib"] = round(rows["index_alone"]["rss_end_mib"] -
                                                      rows["index_alone"]["rss_after_imports_mib"], 1)
        rows["predict_end_to_end"] = run_measured(["predict", "--model", str(args.model), "--sequences",
                                                   str(queries), "--out", str(tmp / "calls.csv")],
                                                  tmp / "predict.log")
    manifest = json.loads((args.model / "idengine.json").read_text())
    report = {"command": " ".join(["python", "bench/index_memory.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
              "artifact": str(args.model), "model_kind": manifest.get("kind"), "num_labels": manifest.get("num_labels"),
              "queries": f"{args.queries} mutated records of examples/12s-fish-mini (bench/predict_stream.py)",
              **rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
