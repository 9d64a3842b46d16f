"""Issue #12 part 1: the reference index (idengine.reference.index) against VSEARCH on 12s-fish's protocol folds.

    python bench/index_check.py --folds 0 1 2 3 4 [--prepared DIR] [--work runs/bench/index]
    # -> bench/results/index_check.json and index_check.md

1. Prepare ../shared/data/12s-fish with idengine's own prepare (protocol folds, no test split), or reuse --prepared.
2. ONE index over every prepared record (records.parquet, then unknown.parquet). Fold f's queries are its records;
   they search that index with Exclusions(fold=f), so their reference is every other record: the other folds and
   every rare-species record.
3. VSEARCH with bench/peers.py's settings (--usearch_global --id 0.97 --maxaccepts 20, default --maxrejects 32 and
   --iddef 2) on FASTA files of the same records, the reference in index-row order so that its tie rule (earlier
   target) is ours (lower row). Its outputs are cached under the work dir, keyed by the inputs and the command.
4. Agreement over the queries with a VSEARCH hit: strict (same species of the two top hits) and tie-aware (ours is
   among VSEARCH's tied-best species), |identity difference| of the two top hits; over all queries: the same call at
   97 % and top-1 at 97 % against the true species for both tools.
5. Speed, in the same run on the same queries (fold --speed-fold): 1 VSEARCH thread vs 1 of our processes, then
   2 threads vs 2 forked processes over query halves; wall and CPU seconds. Memory of the index.

Requirement: same best species for >= 98 % of queries, median identity difference <= 0.5 percentage points.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core means one core: no BLAS threads behind our back
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import peers  # noqa: E402
from run_bench import machine_info  # noqa: E402

from idengine import layout as C  # noqa: E402
from idengine.reference.index import Exclusions, ReferenceIndex, build_index, search  # noqa: E402

log = logging.getLogger("bench.index_check")

DATA = REPO.parent / "shared" / "data" / "12s-fish"
CUTOFF = 100 * peers.IDENTITY
USERFIELDS = "query+target+id+alnlen+ids+mism+gaps+qcov+ql+tl"
"""alnlen is VSEARCH's internal alignment length (terminal gaps excluded), so ids / alnlen is its exact identity;
the printed id is rounded to 0.1."""
_STATE: dict = {}
"""The index and queries of the speed runs, inherited by forked workers (copy-on-write) instead of pickled."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="sequences.fasta.gz + labels.csv + protocol-folds.csv")
    p.add_argument("--prepared", type=Path, default=None, help="a prepared directory to reuse")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "index", help="scratch + VSEARCH cache")
    p.add_argument("--folds", nargs="+", default=["0", "1", "2", "3", "4"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sampling", type=int, default=2)
    p.add_argument("--n", type=int, default=16, help="candidates aligned per query")
    p.add_argument("--min-overlap", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=2, help="VSEARCH threads of the agreement runs")
    p.add_argument("--speed-fold", default="0", help="fold whose queries are timed ('' = no speed runs)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "index_check.json")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> Path:
    """idengine's prepare of the data set with the protocol folds (reused when already there)."""
    from idengine.config_io import load_config
    from idengine.recipes.prepare import prepare_dataset

    out = args.prepared or args.work / "prepared"
    if (out / C.RECORDS_FILE).exists() and (out / C.REPORT_JSON).exists():
        log.info("reusing %s", out)
        return out
    overrides = [f"data.sequences={args.data / 'sequences.fasta.gz'}", f"data.labels={args.data / 'labels.csv'}",
                 f"data.folds_file={(args.data / 'protocol-folds.csv').resolve()}", "data.test_fraction=0"]
    return prepare_dataset(load_config(REPO / "jobs" / "configs" / "tiny-cpu.yaml", overrides), out)


def reference_table(prepared: Path) -> pd.DataFrame:
    """Every prepared record: records.parquet (with its fold) then unknown.parquet (no fold: never a query)."""
    from idengine.data.prepared import read_prepared, read_unknown

    records, _ = read_prepared(prepared)
    return pd.concat([records, read_unknown(prepared)], ignore_index=True)


def _status_kib(field: str) -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field + ":")))


def build(table: pd.DataFrame, k: int, sampling: int) -> tuple[ReferenceIndex, dict]:
    """The index, with its build time, its size and two build peaks: resident (the process's VmHWM above its RSS
    before, the high-water mark reset through /proc/self/clear_refs) and allocated (tracemalloc: numpy reports its
    buffers, including pages it never touches, which cost no memory)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    index = build_index(table, k=k, sampling=sampling)
    build_s = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    resident = (_status_kib("VmHWM") - before) * 1024
    return index, {"records": index.n_ref, "build_s": round(build_s, 2), "build_peak_mb": round(resident / 1e6, 1),
                   "build_alloc_peak_mb": round(peak / 1e6, 1),
                   "prefilter_mb": round(index.nbytes(False) / 1e6, 1), "total_mb": round(index.nbytes() / 1e6, 1),
                   "distinct_kmers": int(index.vocab.size), "postings": int(index.post_refs.size)}


def search_peak_mb(index: ReferenceIndex, queries: list[str], fold: str) -> float:
    """tracemalloc peak of the prefilter's dense working set: one chunk of queries (the alignments allocate little)."""
    from idengine.reference.index import candidates

    tracemalloc.start()
    candidates(index, queries, 16, Exclusions(fold=fold))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return round(peak / 1e6, 1)


def run_timed(cmd: list[str]) -> dict:
    """Run a command; wall seconds, CPU seconds and peak RSS (MiB) of it, from os.wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {stderr.decode()[-500:]}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_mib": usage.ru_maxrss / 1024}


def vsearch_command(queries: Path, db: Path, out: Path, threads: int) -> list[str]:
    """bench/peers.py's usearch_global settings, with the fields needed for exact identities."""
    return ["vsearch", "--usearch_global", str(queries), "--db", str(db), "--id", str(peers.IDENTITY),
            "--maxaccepts", str(peers.MAX_HITS), "--userout", str(out), "--userfields", USERFIELDS,
            "--threads", str(threads), "--quiet"]


def write_inputs(work: Path, table: pd.DataFrame, query_rows: np.ndarray, ref_rows: np.ndarray) -> tuple[Path, Path]:
    """queries.fa (q<i>) and ref.fa (r<i>, index-row order) with peers.write_fasta."""
    work.mkdir(parents=True, exist_ok=True)
    q_fa, db_fa = work / "queries.fa", work / "ref.fa"
    peers.write_fasta(q_fa, "q", table.iloc[query_rows].assign(_genus="NA"))
    peers.write_fasta(db_fa, "r", table.iloc[ref_rows].assign(_genus="NA"))
    return q_fa, db_fa


def cached_vsearch(work: Path, q_fa: Path, db_fa: Path, threads: int) -> tuple[Path, dict | None]:
    """VSEARCH's userout for these inputs: reused when the inputs and command match the cached run's key."""
    out = work / "peers.tsv"
    cmd = vsearch_command(q_fa, db_fa, out, threads)
    digest = hashlib.sha256(" ".join(cmd[1:]).encode())
    for path in (q_fa, db_fa):
        digest.update(path.read_bytes())
    key = work / "peers.key"
    if out.exists() and key.exists() and key.read_text() == digest.hexdigest():
        log.info("reusing %s", out)
        return out, None
    timing = run_timed(cmd)
    key.write_text(digest.hexdigest())
    return out, timing


def vsearch_best(path: Path, query_rows: np.ndarray, ref_rows: np.ndarray, species: np.ndarray) -> pd.DataFrame:
    """Per query row with a hit: VSEARCH's top target row, exact identity (%), species and tied-best species."""
    hits = pd.read_csv(path, sep="\t", header=None, names=USERFIELDS.split("+"))
    hits["query"] = query_rows[hits["query"].str[1:].astype(int)]
    hits["target"] = ref_rows[hits["target"].str[1:].astype(int)]
    hits["id_exact"] = 100.0 * hits["ids"] / hits["alnlen"].clip(lower=1)
    top = hits.groupby("query")["id_exact"].transform("max")
    tied = hits[np.isclose(hits["id_exact"], top, rtol=0, atol=1e-9)]
    first = hits.groupby("query").head(1).set_index("query")  # VSEARCH lists the best hit first
    out = pd.DataFrame({"target": first["target"], "id": first["id_exact"]})
    out["species"] = species[out["target"].to_numpy()]
    out["tied_species"] = tied.groupby("query")["target"].apply(lambda t: set(species[t.to_numpy()].tolist()))
    return out


def ours_best(index: ReferenceIndex, query_rows: np.ndarray, fold: str, args: argparse.Namespace) -> tuple:
    """Per query row: our top hit (target row, identity %, species, tied-best species), and the search seconds."""
    queries = index.sequences[query_rows].tolist()
    start = time.perf_counter()
    hits = search(index, queries, n=args.n, min_overlap=args.min_overlap, exclude=Exclusions(fold=fold))
    seconds = time.perf_counter() - start
    found = hits.ref[:, 0] >= 0
    top = np.where(hits.ref >= 0, hits.identity, -1.0)
    tied = [set(index.species[r[(t == t[0]) & (r >= 0)]].tolist()) for r, t in zip(hits.ref, top)]
    out = pd.DataFrame({"target": hits.ref[:, 0], "id": 100 * hits.identity[:, 0],
                        "species": np.where(found, index.species[np.maximum(hits.ref[:, 0], 0)], None),
                        "tied_species": tied}, index=query_rows)
    assert not np.isin(index.fold_code[hits.ref[hits.ref >= 0]], [int(fold)]).any(), "a masked fold was searched"
    return out[found], seconds


def compare(ours: pd.DataFrame, vs: pd.DataFrame, truth: pd.Series) -> dict:
    """Agreement (over the queries VSEARCH has a hit for) and accuracy at 97 % (over all of truth's queries)."""
    both = ours.merge(vs, left_index=True, right_index=True, suffixes=("_ours", "_vs"))
    only_vs = vs.index.difference(ours.index)
    strict = (both["species_ours"] == both["species_vs"]).sum()
    tie_aware = sum(a in b for a, b in zip(both["species_ours"], both["tied_species_vs"]))
    # rounded: 100 * ids / alnlen and our 100 * matches / columns differ by float noise (1e-14) when equal
    diff = np.round(np.concatenate([(both["id_ours"] - both["id_vs"]).abs(), vs.loc[only_vs, "id"]]), 9)
    universe = truth.index
    call_ours = universe.isin(ours.index[ours["id"] >= CUTOFF])
    call_vs = universe.isin(vs.index[vs["id"] >= CUTOFF])
    right = {name: universe.isin(t.index[(t["id"] >= CUTOFF) & (t["species"] == truth.loc[t.index])])
             for name, t in (("ours", ours), ("vsearch", vs))}
    n = len(vs)
    return {"queries": len(universe), "vsearch_hits": n, "ours_without_hit": len(only_vs),
            "species_strict": strict / n, "species_tie_aware": tie_aware / n,
            "same_target": float((both["target_ours"] == both["target_vs"]).sum() / n),
            "id_diff_median_pp": float(np.median(diff)), "id_diff_p95_pp": float(np.percentile(diff, 95)),
            "id_diff_max_pp": float(diff.max()), "ours_higher_id": float((both["id_ours"] > both["id_vs"] + 1e-9).sum() / n),
            "ours_lower_id": float((both["id_ours"] < both["id_vs"] - 1e-9).sum() / n),
            "call_at_97_agreement": float(np.mean(call_ours == call_vs)),
            "calls_at_97": {"ours": int(call_ours.sum()), "vsearch": int(call_vs.sum())},
            "top1_at_97_truth": {k: float(v.mean()) for k, v in right.items()},
            "_diff": diff.tolist()}


def check_fold(index: ReferenceIndex, table: pd.DataFrame, fold: str, args: argparse.Namespace) -> dict:
    """One fold: our hits and VSEARCH's (cached) on the same queries and reference, compared."""
    query_rows = np.flatnonzero(index.fold_code == int(fold))
    ref_rows = np.flatnonzero(index.fold_code != int(fold))
    work = args.work / f"fold{fold}"
    q_fa, db_fa = write_inputs(work, table, query_rows, ref_rows)
    out, vs_time = cached_vsearch(work, q_fa, db_fa, args.threads)
    vs = vsearch_best(out, query_rows, ref_rows, index.species)
    ours, ours_s = ours_best(index, query_rows, fold, args)
    truth = pd.Series(index.species[query_rows], index=query_rows)
    result = {"fold": fold, "references": int(ref_rows.size), **compare(ours, vs, truth),
              "ours_search_s": round(ours_s, 1), "ours_queries_per_s": round(len(query_rows) / ours_s, 1),
              "vsearch_run": vs_time or "cached"}
    log.info("fold %s: strict %.4f, tie-aware %.4f, id diff median %.3f pp, %.0f q/s", fold,
             result["species_strict"], result["species_tie_aware"], result["id_diff_median_pp"],
             result["ours_queries_per_s"])
    return result


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _search_part(part: int) -> int:
    """Search one share of the speed queries in a forked worker (the index is inherited, not pickled)."""
    queries = _STATE["queries"][part::_STATE["procs"]]
    hits = search(_STATE["index"], queries, exclude=Exclusions(fold=_STATE["fold"]))
    return int((hits.ref[:, 0] >= 0).sum())


def ours_timed(procs: int) -> dict:
    """Wall and CPU seconds of our search of the speed queries on `procs` processes (forked over query halves)."""
    start, cpu = time.perf_counter(), _cpu()
    _STATE["procs"] = procs
    if procs == 1:
        _search_part(0)
    else:
        with get_context("fork").Pool(procs) as pool:
            pool.map(_search_part, range(procs))
    return {"wall_s": time.perf_counter() - start, "cpu_s": _cpu() - cpu}


def speed(index: ReferenceIndex, table: pd.DataFrame, fold: str, work: Path) -> list[dict]:
    """Both tools on the same queries in the same run, alternating: 1 core each, then 2 threads vs 2 processes."""
    query_rows = np.flatnonzero(index.fold_code == int(fold))
    q_fa, db_fa = write_inputs(work / f"fold{fold}", table, query_rows, np.flatnonzero(index.fold_code != int(fold)))
    _STATE.update(index=index, queries=index.sequences[query_rows].tolist(), fold=fold)
    rows = []
    for cores in (1, 2):
        vs = run_timed(vsearch_command(q_fa, db_fa, work / f"speed_{cores}.tsv", cores))
        mine = ours_timed(cores)
        nq = len(query_rows)
        rows.append({"cores": cores, "queries": nq, "vsearch_qps": nq / vs["wall_s"], "ours_qps": nq / mine["wall_s"],
                     "vsearch_q_per_cpu_s": nq / vs["cpu_s"], "ours_q_per_cpu_s": nq / mine["cpu_s"],
                     "vsearch_peak_mib": vs["peak_mib"], "load_avg": os.getloadavg()[0]})
        log.info("speed %s", rows[-1])
    return rows


def git_commit() -> str:
    """HEAD, and whether idengine/ or bench/ differ from it (untracked files included)."""
    run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    dirty = run("status", "--porcelain", "idengine", "bench/index_check.py", "bench/index_scale.py")
    return run("rev-parse", "--short", "HEAD") + (" + uncommitted changes in idengine/ or bench/" if dirty else "")


def summarise(folds: list[dict]) -> dict:
    """Pooled numbers over the folds and the requirement, per fold and pooled."""
    n, nq = sum(f["vsearch_hits"] for f in folds), sum(f["queries"] for f in folds)
    diff = np.concatenate([f.pop("_diff") for f in folds])
    pooled = {"vsearch_hits": n, "species_strict": sum(f["species_strict"] * f["vsearch_hits"] for f in folds) / n,
              "species_tie_aware": sum(f["species_tie_aware"] * f["vsearch_hits"] for f in folds) / n,
              "id_diff_median_pp": float(np.median(diff)), "id_diff_p95_pp": float(np.percentile(diff, 95)),
              "call_at_97_agreement": sum(f["call_at_97_agreement"] * f["queries"] for f in folds) / nq,
              "top1_at_97_truth": {k: sum(f["top1_at_97_truth"][k] * f["queries"] for f in folds) / nq
                                   for k in ("ours", "vsearch")}}
    ok = [f["species_strict"] >= 0.98 and f["id_diff_median_pp"] <= 0.5 for f in folds]
    pooled["pass"] = bool(all(ok) and pooled["species_strict"] >= 0.98 and pooled["id_diff_median_pp"] <= 0.5)
    pooled["requirement"] = "strict species agreement >= 0.98 and median |identity difference| <= 0.5 pp, every fold"
    return pooled


def render_markdown(report: dict) -> str:
    """The results page: settings, the agreement table per fold, speed and memory."""
    m, s, idx = report["machine"], report["summary"], report["index"]
    lines = ["# Reference index vs VSEARCH (12s-fish, protocol folds)", "",
             f"- Machine: {m.get('cores')} cores, {m.get('ram_gib', '?')} GiB, {m.get('cpu', '?')}; load average at "
             f"start {', '.join(f'{x:.1f}' for x in m.get('load_avg_at_start', []))}",
             f"- Date: {report['date']}; commit {report['commit']}; `{report['command']}`",
             f"- Index: k={report['settings']['k']}, sampling 1/{report['settings']['sampling']}, "
             f"{report['settings']['n']} candidates, overlap >= {report['settings']['min_overlap']}; "
             f"{report['vsearch']}, {report['vsearch_settings']}",
             f"- Requirement ({s['requirement']}): **{'PASS' if s['pass'] else 'FAIL'}**", "",
             "| fold | queries | VSEARCH hits | strict | tie-aware | id diff median / p95 (pp) | call@97 agree | "
             "top-1@97 ours / VSEARCH |", "|---|---|---|---|---|---|---|---|"]
    for f in report["folds"] + [dict(s, fold="all", queries=sum(f["queries"] for f in report["folds"]))]:
        lines.append(f"| {f['fold']} | {f['queries']} | {f['vsearch_hits']} | {f['species_strict']:.4f} | "
                     f"{f['species_tie_aware']:.4f} | {f['id_diff_median_pp']:.3f} / {f['id_diff_p95_pp']:.3f} | "
                     f"{f['call_at_97_agreement']:.4f} | {f['top1_at_97_truth']['ours']:.4f} / "
                     f"{f['top1_at_97_truth']['vsearch']:.4f} |")
    lines += ["", "| cores | VSEARCH q/s | ours q/s | VSEARCH q per CPU-s | ours q per CPU-s | load |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['cores']} | {r['vsearch_qps']:.1f} | {r['ours_qps']:.1f} | {r['vsearch_q_per_cpu_s']:.1f} | "
              f"{r['ours_q_per_cpu_s']:.1f} | {r['load_avg']:.1f} |" for r in report["speed"]]
    lines += ["", f"Index of {idx['records']:,} records: prefilter {idx['prefilter_mb']} MB, with sequences "
              f"{idx['total_mb']} MB; build {idx['build_s']} s (peak {idx['build_peak_mb']} MB resident); search peak "
              f"{idx['search_peak_mb']} MB per chunk (tracemalloc); VSEARCH peak RSS "
              f"{max([r['vsearch_peak_mib'] for r in report['speed']] or [0]):.0f} MiB. VSEARCH's wall time includes "
              "reading and indexing its database (about 1 s); ours excludes the build. Speed queries: fold "
              f"{report['settings']['speed_fold']}. On a shared machine (see load) queries per CPU-second is the "
              "per-core comparison that other users' load distorts least."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if peers.missing_binaries("vsearch"):
        raise SystemExit("vsearch is not installed (apt-get install vsearch): nothing to compare with")
    machine = machine_info()
    table = reference_table(prepare(args))
    index, index_info = build(table, args.k, args.sampling)
    speed_fold = args.speed_fold or args.folds[0]
    sample = index.sequences[np.flatnonzero(index.fold_code == int(speed_fold))][:256].tolist()
    index_info["search_peak_mb"] = search_peak_mb(index, sample, speed_fold)
    folds = [check_fold(index, table, fold, args) for fold in args.folds]
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
              "command": "python " + " ".join(sys.argv),
              "machine": machine, "settings": {**{k: str(v) for k, v in vars(args).items()}, "k": args.k,
                                               "sampling": args.sampling, "n": args.n,
                                               "min_overlap": args.min_overlap, "speed_fold": speed_fold},
              "vsearch": peers.tool_version("vsearch"), "vsearch_settings": " ".join(vsearch_command(
                  Path("q.fa"), Path("ref.fa"), Path("out"), args.threads)[5:9]),
              "index": index_info, "folds": folds, "summary": summarise(folds),
              "speed": speed(index, table, speed_fold, args.work) if args.speed_fold else [],
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=float))
    args.out.with_suffix(".md").write_text(render_markdown(report))
    log.info("wrote %s and %s: %s", args.out, args.out.with_suffix(".md"), "PASS" if report["summary"]["pass"]
             else "FAIL")
    return report


if __name__ == "__main__":
    main()
