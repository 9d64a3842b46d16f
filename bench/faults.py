"""Faults, measured (issue #14, part 3): crashes, tampering, a second process and full disks against the real command
line, with what each leaves behind. Writes bench/results/faults.json; tests/test_faults.py runs the cheap cases.

    python bench/faults.py --out bench/results/faults.json        # about 15 minutes on 2 cores
    python bench/faults.py --only out_of_space                    # one fault again, the others' results kept

1. predict killed (SIGKILL to its process group: driver, raylet, actor) at two points of a query file: no calls file
   and no errors file appear; a rerun removes the killed run's temporaries and writes byte-identical files.
2. Two predicts on one artifact at once, to two outputs and to one: both exit 0 with the reference's bytes.
3. train killed during export at three points (classifier written, engine written, manifest written): the previous
   artifact keeps every byte, loads and predicts; the next train removes the staging leftovers and publishes.
4. Every file of an artifact altered in turn: refused, naming that file; and through `idengine predict`.
5. Writes that run out of space: a small tmpfs (when this process may mount one) and a file-size limit
   (`ulimit -f`): exit code 2, a message naming the output, nothing left there.
The fold-worker and tune-driver kills are tests that already existed; they are listed, not rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_stream import IDENGINE, REPO, build_artifact, cli_env, mutated_records, write_queries  # noqa: E402
from run_bench import git_commit  # noqa: E402

N_QUERIES = 2500
BAD_RECORDS = ">protein_rec\nMKVLAAGIVGLLLAQEWRSTPYHDGGKVLAAGIVGLLLAQEWRSTPYHDGG\n>empty_rec\n\n"
FULL = "out of space / file too large"
EXISTING = [
    {"fault": "a fold worker killed mid-run resumes from its latest checkpoint and ends with the same history",
     "where": "tests/test_ray_train.py::test_a_worker_that_dies_after_a_checkpoint_resumes (Ray Train, 1 worker, "
              "train.max_failures); tests/test_loop.py::test_checkpoint_holds_only_trainable_weights_and_resume_"
              "replays_the_run (the resumed run's metrics and weights equal the uninterrupted run's)",
     "status": "existing test, kept"},
    {"fault": "a tune driver killed (SIGKILL) resumes without re-running finished trials",
     "where": "tests/test_cluster.py::test_an_interrupted_tune_resumes_without_rerunning_finished_trials",
     "status": "existing test, kept"},
]


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.glob(f".{name}.tmp-*"))


def start(argv: list[str], log: Path, preexec=None) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([IDENGINE, *argv], env=cli_env(), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=preexec)


def wait(process: subprocess.Popen, timeout_s: float = 900) -> int:
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def kill_when(process: subprocess.Popen, found, timeout_s: float = 900) -> dict:
    """SIGKILL the process group as soon as `found()` is true; what was seen then."""
    t0, deadline = time.perf_counter(), time.time() + timeout_s
    while time.time() < deadline and process.poll() is None:
        hit = found()
        if hit:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
            return {"killed_after_s": round(time.perf_counter() - t0, 1), "exit_code": code, "seen": hit}
        time.sleep(0.01)
    return {"killed_after_s": None, "exit_code": wait(process), "seen": None}


def predict_args(model: Path, queries: Path, out: Path) -> list[str]:
    return ["predict", "--model", str(model), "--sequences", str(queries), "--out", str(out)]


def timed_predict(model: Path, queries: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    code = wait(start(predict_args(model, queries, out), out.with_name(out.name + ".log")))
    return {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1), "calls_sha256": sha(out),
            "errors_sha256": sha(out.with_name(out.name + ".errors.csv"))}


def predict_killed(model: Path, queries: Path, work: Path, reference: dict) -> dict:
    """Kill predict once its temporary calls file holds its first rows, and once it holds half the records (calls
    arrive in blocks of up to ~1000 records, so later points are not reachable); then rerun it."""
    points = []
    for share in (0.0, 0.5):
        d = work / f"killed-{share}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        out = d / "calls.csv"

        def rows_written():
            temps = list(d.glob(".calls.csv.tmp-*"))
            rows = sum(1 for _ in open(temps[0])) - 1 if temps and temps[0].stat().st_size else 0
            return rows if rows >= max(1, share * N_QUERIES) else None

        for attempt in range(3):  # Ray may fail to start on a loaded machine ("node timed out during startup")
            kill = kill_when(start(predict_args(model, queries, out), d / "killed.log"), rows_written)
            if kill["exit_code"] == -9 or "timed out during startup" not in (d / "killed.log").read_text():
                break
        kill["ray_start_failures"] = attempt
        after_kill = {"calls_csv_exists": out.exists(), "errors_csv_exists": (d / "calls.csv.errors.csv").exists(),
                      "hidden_temporaries": len(leftovers(d, "calls.csv") + leftovers(d, "calls.csv.errors.csv"))}
        rerun = timed_predict(model, queries, out)
        log = (d / "calls.csv.log").read_text(errors="replace")
        points.append({"kill_when_rows_written": max(1, int(share * N_QUERIES)),
                       "rows_in_temporary_at_kill": kill["seen"],
                       "killed_after_s": kill["killed_after_s"], "killed_exit_code": kill["exit_code"],
                       "ray_start_failures_before": kill["ray_start_failures"], **after_kill,
                       "rerun_exit_code": rerun["exit_code"], "rerun_s": rerun["seconds"],
                       "rerun_removed_leftovers": "leftover(s) of interrupted runs" in log,
                       "left_after_rerun": leftovers(d, "calls.csv") + leftovers(d, "calls.csv.errors.csv"),
                       "rerun_byte_identical": rerun["calls_sha256"] == reference["calls_sha256"]
                       and rerun["errors_sha256"] == reference["errors_sha256"]})
    ok = all(p["killed_exit_code"] == -9 and not p["calls_csv_exists"] and not p["errors_csv_exists"]
             and p["rerun_byte_identical"] and not p["left_after_rerun"] for p in points)
    return {"fault": "idengine predict killed mid-file, then rerun", "ok": ok, "points": points}


def concurrent(model: Path, queries: Path, work: Path, reference: dict) -> dict:
    """Two predicts started together: to two outputs, then both to one output."""
    runs = {}
    for label, names in (("two_outputs", ["a.csv", "b.csv"]), ("one_output", ["same.csv", "same.csv"])):
        d = work / f"concurrent-{label}"
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        procs = [start(predict_args(model, queries, d / n), d / f"{i}.log") for i, n in enumerate(names)]
        codes = [wait(p) for p in procs]
        runs[label] = {"exit_codes": codes, "seconds_both": round(time.perf_counter() - t0, 1),
                       "identical_to_reference": [sha(d / n) == reference["calls_sha256"] for n in names],
                       "left_beside": sorted(p.name for p in d.iterdir() if p.name.startswith("."))}
    ok = all(r["exit_codes"] == [0, 0] and all(r["identical_to_reference"]) and not r["left_beside"]
             for r in runs.values())
    return {"fault": "two idengine predict processes on one artifact at the same time", "ok": ok, **runs}


def train_args(work: Path, out: Path) -> list[str]:
    return ["train", "--config", str(REPO / "jobs" / "configs" / "tiny-cpu.yaml"), "--prepared",
            str(work / "prepared"), "--cv", str(work / "cv"), "--out", str(out), "model.kind=kmer-nb",
            f"train.storage_path={work / 'ray'}"]


def artifact_usable(model: Path) -> dict:
    from idengine.deploy.artifact import load_artifact

    records = list(mutated_records(50, seed=3))
    calls = load_artifact(model).calls([r for r, _ in records], [s for _, s in records])
    return {"loads_with_every_sha256_checked": True, "calls_on_50_queries": len(calls)}


def tree_sha(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def train_killed(model: Path, work: Path) -> dict:
    """Kill train at three points of its export; the previous artifact must keep every byte and stay usable."""
    d = work / "train-killed"
    shutil.rmtree(d, ignore_errors=True)
    target = shutil.copytree(model, d / "model")
    before = tree_sha(target)
    points = []
    for what in ("classifier", "engine", "idengine.json"):
        earlier = set(d.glob(".model.tmp-*"))  # the previous point's leftover (removed by this run's start)

        def seen():
            return [p.name for p in d.glob(".model.tmp-*") if p not in earlier and (p / what).exists()] or None

        kill = kill_when(start(train_args(work, target), d / f"killed-{what}.log"), seen)
        points.append({"kill_when_staging_has": what, **kill, "previous_artifact_unchanged": tree_sha(target) == before,
                       **artifact_usable(target), "staging_leftovers": len(list(d.glob(".model.tmp-*")))})
    t0 = time.perf_counter()
    code = wait(start(train_args(work, target), d / "completed.log"))
    log = (d / "completed.log").read_text(errors="replace")
    completed = {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1),
                 "removed_leftovers": "leftover(s) of interrupted runs" in log,
                 "left_beside": sorted(p.name for p in d.iterdir() if p.name.startswith(".")),
                 "new_artifact": artifact_usable(target) if code == 0 else None}
    ok = all(p["exit_code"] == -9 and p["previous_artifact_unchanged"] for p in points) and code == 0 \
        and not completed["left_beside"]
    return {"fault": "idengine train killed during export", "ok": ok, "points": points, "then_a_full_train": completed}


def tampered(model: Path, work: Path, queries: Path) -> dict:
    """Flip one byte of each file in turn: load_artifact must refuse, naming it; once through the CLI too."""
    from idengine.deploy.artifact import load_artifact

    copy = shutil.copytree(model, work / "tampered" / "model", dirs_exist_ok=True)
    named, files = [], sorted(json.loads((copy / "idengine.json").read_text())["files"])
    for name in files:
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        try:
            load_artifact(copy)
            named.append({"file": name, "refused": False})
        except ValueError as err:
            named.append({"file": name, "refused": True, "named": f"'{name}'" in str(err)})
        (copy / name).write_bytes(data)
    victim = copy / "engine" / "reference.parquet"
    victim.write_bytes(victim.read_bytes() + b"\0")
    t0, out = time.perf_counter(), work / "tampered" / "calls.csv"
    code = wait(start(predict_args(copy, queries, out), work / "tampered" / "predict.log"))
    log = (work / "tampered" / "predict.log").read_text(errors="replace")
    cli = {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1), "calls_written": out.exists(),
           "message": next((line for line in log.splitlines() if "ERROR idengine" in line), None)}
    ok = all(n["refused"] and n["named"] for n in named) and code == 2 and not out.exists()
    return {"fault": "an artifact with one altered file", "ok": ok, "files_altered_in_turn": len(named),
            "refused_naming_the_file": sum(n["refused"] and n["named"] for n in named), "per_file": named,
            "through_idengine_predict": cli}


def _limit(max_bytes: int):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
    return limit


def full_disk_case(label: str, argv: list[str], out: Path, log: Path, preexec=None) -> dict:
    t0 = time.perf_counter()
    code = wait(start(argv, log, preexec), timeout_s=600)
    text = log.read_text(errors="replace")
    message = next((line for line in text.splitlines() if "ERROR idengine" in line), None)
    left = sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}"))
    return {"case": label, "exit_code": code, "seconds": round(time.perf_counter() - t0, 1), "message": message,
            "names_output_and_cause": bool(message and str(out) in message and FULL in message),
            "left_at_output": left, "traceback": "Traceback" in text,
            "ok": code == 2 and bool(message and FULL in message) and not left}


PREDICT_IN_PROCESS = """
import sys
from idengine.config import PredictConfig
from idengine.deploy.predict import predict_file
from idengine.errors import InputError
try:
    predict_file(sys.argv[1], sys.argv[2], sys.argv[3], PredictConfig(), use_ray=False)
except InputError as err:
    print("ERROR idengine:", err)
    sys.exit(2)
"""


def in_process_predict(model: Path, queries: Path, out: Path, limit_bytes: int) -> dict:
    """predict_file without Ray (Ray cannot start under a small file-size limit) past the limit."""
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PREDICT_IN_PROCESS, str(model), str(queries), str(out)],
                          env=cli_env(), capture_output=True, text=True, preexec_fn=_limit(limit_bytes))
    left = sorted(p.name for p in out.parent.iterdir())
    message = done.stdout.strip() or None
    return {"case": f"predict_file in process (no Ray), file-size limit {limit_bytes // 1024} KiB",
            "exit_code": done.returncode, "seconds": round(time.perf_counter() - t0, 1), "message": message,
            "names_output_and_cause": bool(message and str(out) in message and FULL in message),
            "left_at_output": left, "traceback": "Traceback" in done.stderr,
            "ok": done.returncode == 2 and bool(message and FULL in message) and not left}


def mount_tmpfs(path: Path, size_kib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def out_of_space(model: Path, work: Path, queries: Path) -> dict:
    d = work / "full"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    prepare = ["prepare", "--config", str(REPO / "jobs" / "configs" / "tiny-cpu.yaml"),
               f"data.sequences={REPO / 'examples/12s-fish-mini/sequences.fasta.gz'}",
               f"data.labels={REPO / 'examples/12s-fish-mini/labels.csv'}", "--out"]
    cases = [full_disk_case("prepare, file-size limit 32 KiB", [*prepare, str(d / "prepared")], d / "prepared",
                            d / "prepare-ulimit.log", _limit(32 * 1024)),
             in_process_predict(model, queries, d / "in-process" / "calls.csv", 256 * 1024)]
    ray_case = full_disk_case("idengine predict (with Ray), file-size limit 256 KiB", predict_args(
        model, queries, d / "calls.csv"), d / "calls.csv", d / "predict-ulimit.log", _limit(256 * 1024))
    # Ray itself cannot start under this limit (its session files go past it): idengine says so, exit code 2.
    ray_case.update(ok=ray_case["exit_code"] == 2 and "Ray could not start" in (ray_case["message"] or "")
                    and not ray_case["left_at_output"])
    cases.append(ray_case)
    disk = d / "tmpfs"
    for label, size_kib, argv, name in (
            ("prepare onto a 128 KiB tmpfs", 128, [*prepare, str(disk / "prepared")], "prepared"),
            ("predict onto a 256 KiB tmpfs", 256, predict_args(model, queries, disk / "calls.csv"), "calls.csv"),
            ("train onto a 512 KiB tmpfs", 512, train_args(work, disk / "model"), "model")):
        if not mount_tmpfs(disk, size_kib):
            cases.append({"case": label, "ok": None, "skipped": "cannot mount a tmpfs here (needs root)"})
            continue
        try:
            case = full_disk_case(label, argv, disk / name, d / f"{name}-tmpfs.log")
            case["tmpfs_bytes_used_after"] = shutil.disk_usage(disk).used
        finally:
            subprocess.run(["umount", str(disk)], check=False)
        cases.append(case)
    return {"fault": "a write that runs out of space", "ok": all(c["ok"] is not False for c in cases), "cases": cases}


FAULTS = {"predict_killed": "idengine predict killed mid-file, then rerun",
          "concurrent": "two idengine predict processes on one artifact at the same time",
          "train_killed": "idengine train killed during export",
          "tampered": "an artifact with one altered file",
          "out_of_space": "a write that runs out of space"}
"""The faults main() runs, in order, by the name --only takes and the "fault" their result carries."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-faults")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    parser.add_argument("--only", nargs="+", choices=sorted(FAULTS), help="rerun these faults only; the other "
                        "results in --out are kept (each result says its own commit)")
    args = parser.parse_args()
    model = build_artifact(args.work)
    queries = write_queries(args.work / "faults-queries.fasta", N_QUERIES)
    with open(queries, "a") as handle:
        handle.write(BAD_RECORDS)
    (args.work / "reference").mkdir(exist_ok=True)
    reference = timed_predict(model, queries, args.work / "reference" / "calls.csv")
    results = [{"fault": "reference: one uninterrupted predict", "ok": reference["exit_code"] == 0, **reference}]
    commit = git_commit()
    runs = {"predict_killed": lambda: predict_killed(model, queries, args.work, reference),
            "concurrent": lambda: concurrent(model, queries, args.work, reference),
            "train_killed": lambda: train_killed(model, args.work),
            "tampered": lambda: tampered(model, args.work, queries),
            "out_of_space": lambda: out_of_space(model, args.work, queries)}
    before = json.loads(args.out.read_text()) if args.only and args.out.exists() else {"results": []}
    kept = [{"commit": before.get("commit"), "date": before.get("date"), **r} for r in before["results"]]
    for name in FAULTS:
        if args.only and name not in args.only:
            results.append(next(r for r in kept if r["fault"] == FAULTS[name]))
            continue
        results.append({**runs[name](), "commit": commit,
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(json.dumps({k: results[-1][k] for k in ("fault", "ok")}), flush=True)
    report = {"command": " ".join(["python", "bench/faults.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
              "artifact": "examples/12s-fish-mini, model.kind=kmer-nb, engine over 415 reference records",
              "queries": f"{N_QUERIES} mutated 12S records + 2 unusable ones", "results": results,
              "existing": EXISTING, "all_ok": all(r["ok"] is not False for r in results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
