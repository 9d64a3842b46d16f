"""Large query files stream (issue #14, part 4): `idengine predict` on generated query FASTAs of growing size, with the
peak memory of every process it starts, so that a flat peak can be read off.

    python bench/predict_stream.py --sizes 10000 100000 --out bench/results/predict_stream.json

1. An artifact: the bundled example (examples/12s-fish-mini) prepared, cross-validated and trained with
   `model.kind=kmer-nb` through the real command line (about 3 minutes here), once, in `--work`.
2. For each size, a query FASTA of real 12S records of the example, mutated (substitutions at 0-5%, a short indel in
   a third of them, seeded), so the engine searches its reference for every one.
3. `idengine predict` in a child process; a sampler reads /proc every 0.5 s for the driver and every process under it
   (Ray's GCS, raylet, the reader task, the PredictBatch actor): RSS and PSS (shared pages split between processes).
   The result holds, per size: seconds, records/s, the progress lines predict logged, the calls written, and the
   peaks (driver, largest single process, whole tree).
bench/faults.py reuses `build_artifact`, `write_queries`, `run_measured` and `cli_env`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from run_bench import git_commit  # bench/ is on the path: this script's folder, or added by tests

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "12s-fish-mini"
VENV_BIN = Path(sys.executable).parent
IDENGINE = str(VENV_BIN / "idengine")
PROGRESS = re.compile(r"predict: (\d+) records done .*?, (\d+) records/s \((\d+) since the start\)")
OBJECT_STORE = re.compile(r"Active & requested resources: .*?([\d.]+)(KiB|MiB|GiB|B)/([\d.]+)(KiB|MiB|GiB) object store")
UNIT_MIB = {"B": 2**-20, "KiB": 2**-10, "MiB": 1, "GiB": 1024}


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a child `idengine`: this venv first on PATH, Ray without token auth, no tokenizer threads."""
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def build_artifact(work: Path) -> Path:
    """prepare -> cv -> train of the bundled example with kmer-nb (the engine included) in work/; reused if there."""
    model = work / "model"
    if (model / "idengine.json").is_file():
        return model
    work.mkdir(parents=True, exist_ok=True)
    common = ["--config", str(REPO / "jobs" / "configs" / "tiny-cpu.yaml")]
    kmer = ["model.kind=kmer-nb", f"train.storage_path={work / 'ray'}"]
    steps = [["prepare", *common, "--out", str(work / "prepared"), f"data.sequences={EXAMPLE / 'sequences.fasta.gz'}",
              f"data.labels={EXAMPLE / 'labels.csv'}"],
             ["cv", *common, "--prepared", str(work / "prepared"), "--out", str(work / "cv"), *kmer],
             ["train", *common, "--prepared", str(work / "prepared"), "--cv", str(work / "cv"), "--out", str(model),
              *kmer]]
    for step in steps:
        with open(work / f"{step[0]}.log", "w") as log:
            subprocess.run([IDENGINE, *step], env=cli_env(), stdout=log, stderr=subprocess.STDOUT, check=True)
    return model


def mutated_records(n: int, seed: int = 0, source: Path = EXAMPLE / "sequences.fasta.gz"
                    ) -> Iterator[tuple[str, str]]:
    """n (id, sequence) pairs: real records of `source`, drawn at random, each with 0-5% substitutions and, one time
    in three, a 1-3 base deletion. Ids name the source record."""
    from idengine.data.fasta import read_fasta

    table = read_fasta(source)[0]
    ids, seqs = table["id"].tolist(), [np.frombuffer(s.upper().encode(), np.uint8) for s in table["sequence"]]
    rng, bases = np.random.default_rng(seed), np.frombuffer(b"ACGT", np.uint8)
    for i in range(n):
        j = int(rng.integers(len(seqs)))
        seq = seqs[j].copy()
        hit = rng.random(seq.size) < rng.uniform(0.0, 0.05)
        seq[hit] = bases[rng.integers(0, 4, int(hit.sum()))]
        if rng.random() < 1 / 3:
            at = int(rng.integers(seq.size))
            seq = np.delete(seq, np.s_[at:at + int(rng.integers(1, 4))])
        yield f"q{i:07d}_{ids[j]}", seq.tobytes().decode()


def write_queries(path: Path, n: int, seed: int = 0) -> Path:
    """A query FASTA of n mutated records (gzip when the name ends in .gz), sequence lines wrapped at 80."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        for rid, seq in mutated_records(n, seed):
            handle.write(f">{rid} mutated 12S\n" + "\n".join(seq[k:k + 80] for k in range(0, len(seq), 80)) + "\n")
    return path


def _descendants(root: int) -> list[int]:
    """root and every process under it (read from /proc: Ray's daemons and workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _memory_kib(pid: int) -> tuple[str, int, int]:
    """(name, RSS KiB, PSS KiB) of one process; ("", 0, 0) once it is gone."""
    try:
        name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
        pss = int(re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        return "", 0, 0
    return _short_name(name), rss, pss


def _short_name(cmdline: str) -> str:
    if "idengine" in cmdline and (" predict" in cmdline or " train" in cmdline):
        return "driver (idengine " + ("predict" if " predict" in cmdline else "train") + ")"
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "client.server"):
        if daemon in cmdline:
            return daemon
    return cmdline.split()[0].rsplit("/", 1)[-1] if cmdline else "?"


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree every `every_s` seconds until `stop()`; keeps the peaks."""

    def __init__(self, root: int, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every_s, self.done = root, every_s, threading.Event()
        self.peak_rss_kib: dict[str, int] = {}
        self.peak_tree_rss_kib = self.peak_tree_pss_kib = self.samples = 0

    def run(self) -> None:
        while not self.done.is_set():
            rows = [_memory_kib(pid) for pid in _descendants(self.root)]
            for name, rss, _ in rows:
                if name:
                    self.peak_rss_kib[name] = max(self.peak_rss_kib.get(name, 0), rss)
            self.peak_tree_rss_kib = max(self.peak_tree_rss_kib, sum(r[1] for r in rows))
            self.peak_tree_pss_kib = max(self.peak_tree_pss_kib, sum(r[2] for r in rows))
            self.samples += 1
            self.done.wait(self.every_s)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        mib = {name: round(kib / 1024, 1) for name, kib in sorted(self.peak_rss_kib.items())}
        return {"peak_tree_rss_mib": round(self.peak_tree_rss_kib / 1024, 1),
                "peak_tree_pss_mib": round(self.peak_tree_pss_kib / 1024, 1),
                "peak_rss_mib_by_process": mib, "samples": self.samples}


def run_measured(argv: list[str], log_path: Path, env: dict | None = None, timeout_s: float | None = None) -> dict:
    """Run `idengine ARGV` with its process tree sampled; exit code, seconds, memory peaks, driver's ru_maxrss."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen([IDENGINE, *argv], env=env or cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        sampler = TreeSampler(child.pid)
        sampler.start()
        try:
            _, status, usage = os.wait4(child.pid, 0) if timeout_s is None else _wait4_timeout(child, timeout_s)
        finally:
            memory = sampler.stop()
    return {"exit_code": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - start, 1),
            "driver_max_rss_mib": round(usage.ru_maxrss / 1024, 1), **memory}


def _wait4_timeout(child: subprocess.Popen, timeout_s: float):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        time.sleep(0.2)
    os.killpg(child.pid, 9)
    return os.wait4(child.pid, 0)


def progress_lines(log_path: Path) -> list[dict]:
    """The progress lines predict logged: records done, records/s in the last interval, records/s since the start."""
    return [{"done": int(m[1]), "records_per_s": int(m[2]), "since_start_per_s": int(m[3])}
            for m in PROGRESS.finditer(log_path.read_text(errors="replace"))]


def object_store_mib(text: str) -> dict:
    """Peak object-store use of the predict dataset, and its cap, from Ray Data's progress lines."""
    seen = [(float(m[1]) * UNIT_MIB[m[2]], float(m[3]) * UNIT_MIB[m[4]]) for m in OBJECT_STORE.finditer(text)]
    return {"peak_object_store_mib": round(max(u for u, _ in seen), 1) if seen else None,
            "object_store_cap_mib": seen[-1][1] if seen else None}


def measure_size(model: Path, work: Path, n: int) -> dict:
    """One query file of n records through `idengine predict`: time, memory, progress, what was written."""
    start = time.perf_counter()
    queries = write_queries(work / f"queries-{n}.fasta", n)
    made_s = time.perf_counter() - start
    out, log_path = work / f"calls-{n}.csv", work / f"predict-{n}.log"
    run = run_measured(["predict", "--model", str(model), "--sequences", str(queries), "--out", str(out)], log_path)
    text = log_path.read_text(errors="replace")
    final = re.search(r"predict: (\d+) records called, (\d+) reported .* in ([\d.]+) s \((\d+) records/s\)", text)
    calls = sum(1 for _ in open(out)) - 1 if out.exists() else None
    progress = progress_lines(log_path)
    result = {"records": n, "query_file_mib": round(queries.stat().st_size / 2**20, 1),
              "query_file_written_s": round(made_s, 1), **run, "calls_rows": calls,
              "predict_s": float(final[3]) if final else None, "records_per_s": int(final[4]) if final else None,
              **object_store_mib(text),
              "progress_lines": len(progress), "progress_first": progress[:1], "progress_last": progress[-1:],
              "spilled": re.findall(r"Spilled [^\n]*", text)[:3]}
    queries.unlink()  # gigabytes at the largest sizes; regenerated the same from the seed
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-faults")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict_stream.json")
    args = parser.parse_args()
    commit = git_commit()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    model = build_artifact(args.work)
    rows = []
    for n in args.sizes:
        rows.append(measure_size(model, args.work, n))
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": " ".join(["python", "bench/predict_stream.py", *sys.argv[1:]]), "started": started,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
              "artifact": "examples/12s-fish-mini, model.kind=kmer-nb, engine over 415 reference records",
              "sizes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
