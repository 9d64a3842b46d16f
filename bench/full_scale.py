"""The 2.5B Nucleotide Transformer at its real size (random weights) through idengine's production path, on CPU.

1. build    a random EsmForMaskedLM with the public 2.5B config (2,547,801,226 parameters), written as the hub cache
            holds the published checkpoint (two pickled `.bin` shards + index, refs/main, tokenizer) into a
            throwaway HF_HOME (bench/hub_checkpoint.py). Every later stage runs with HF_HUB_OFFLINE=1.
2. data     a small 12S subset of examples/12s-fish-mini (short MiFish amplicons: a step costs ~tokens) and 20
            other sequences to predict.
3. prepare, cv, train, predict: the `idengine` commands with jobs/configs/nt2.5b-1gpu.yaml + CPU overrides and
            model.backbone = the hub id (not a path), so the loader's trusted-pickle branch is what runs. `idengine cv`
            runs both folds of a 2-fold split (its minimum), each a few optimizer steps in a Ray Train worker.
4. reload   the artifact through plain transformers + peft and through idengine's loader: max abs logit difference.
5. steps    seconds per optimizer step (`train/loop.train_epoch`) at batch 2 x 128 tokens with gradient checkpointing
            on and off; an fp32, an fp16 and a bf16 base (`model.base_dtype`) at batch 1 x 4 tokens (this CPU has
            AVX2 only: a half-precision backward matmul runs ~140x slower than fp32 there, so 2 x 128 would take
            hours); load seconds and resident memory, trainable parameters (LoRA and head apart) for the 1,377
            species of 12s-fish, the fp16 GradScaler's scale after the step.
   activations  bytes autograd keeps per token per layer, and cast weight copies, for fp32 / half bases with and
            without autocast (one full-width layer: a 2-layer minus a 1-layer model; forward only).
6. sizes    the Ray Train checkpoints (adapter + head + optimizer: no base weight in any) and the artifact.
Each stage is a child process (bench/full_scale_stages.py, or `idengine`) whose peak memory (PSS and RSS summed over
its process tree, Ray workers included) is sampled twice a second. Writes bench/results/full_scale.json: 16 GB of
RAM, ~30 min on 2 cores for stages 1-4 and the fp32 steps, about an hour with the half-base and activation stages.
`--stages NAME ...` reruns only those stages in the existing --work directory and merges them into the existing JSON
(each such run is listed under "runs", with its commit). `--tiny` runs the same path on the tiny model of the same
architecture (minutes); `--device cuda` runs stages 1-4 and 6 on one GPU (bench/gpu_check.sh does, after its own
measurements).

    python bench/full_scale.py                       # full size: needs ~16 GB free RAM and ~11 GB of disk
    python bench/full_scale.py --stages bf16_ckpt_off_1x4 sizes    # one stage, merged into the JSON
    python bench/full_scale.py --tiny --out /tmp/full_scale_tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from full_scale_stages import HUB_ID  # noqa: E402
from hub_checkpoint import hub_env  # noqa: E402

CONFIG = REPO / "jobs" / "configs" / "nt2.5b-1gpu.yaml"
EXAMPLE = REPO / "examples" / "12s-fish-mini"
STAGES = REPO / "bench" / "full_scale_stages.py"
GB = 1e9
STEP_RUNS = (  # (name, base_dtype, checkpointing, batch, tokens, optimizer steps); the first step is cold
    ("fp32_ckpt_on_2x128", "fp32", True, 2, 128, 2),
    ("fp32_ckpt_off_2x128", "fp32", False, 2, 128, 1),
    ("fp32_ckpt_off_2x32", "fp32", False, 2, 32, 1),
    ("fp32_ckpt_off_1x4", "fp32", False, 1, 4, 1),
    ("fp16_ckpt_off_1x4", "fp16", False, 1, 4, 1),
    ("bf16_ckpt_off_1x4", "bf16", False, 1, 4, 1),
)
PIPELINE = ("build", "prepare", "cv", "train", "predict", "reload")
SIZES = "sizes"
"""Not a child process: the checkpoints' and the artifact's files, and predict's rate, read from --work."""


def overrides(work: Path, device: str) -> list[str]:
    """nt2.5b-1gpu.yaml cut to a benchmark: the subset, 128 tokens, batch 2, 1 epoch, one Ray Train worker (on the
    CPU, or on the GPU with the config's own precision)."""
    data = work / "data"
    where = ["train.use_gpu=true", "train.cpus_per_worker=2"] if device == "cuda" else \
        ["train.use_gpu=false", "train.cpus_per_worker=1", "train.precision=fp32"]
    return [f"data.sequences={data / 'subset.fasta'}", f"data.labels={data / 'labels.csv'}",
            "data.min_seqs_per_species=3", "data.n_folds=2", "data.test_fraction=0.2",
            f"model.backbone={HUB_ID}", "model.max_tokens=128", *where, "train.num_workers=1",
            "train.batch_size=2", "train.grad_accum_steps=1", "train.epochs=1", "train.patience=0",
            "train.train_eval_size=2", f"train.storage_path={work / 'ray'}", "predict.batch_size=8"]


# ---------------------------------------------------------------------------------------------------------- memory
class PeakMemory(threading.Thread):
    """Samples a process tree (a stage and everything it starts, Ray's workers included) until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.done = pid, interval_s, threading.Event()
        self.peaks = {"peak_pss_gb": 0.0, "peak_rss_sum_gb": 0.0, "peak_rss_max_process_gb": 0.0}

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        pss = rss = top = 0
        for proc in procs:
            try:
                mem = proc.memory_full_info()
            except psutil.Error:
                continue
            pss, rss, top = pss + mem.pss, rss + mem.rss, max(top, mem.rss)
        for key, value in zip(self.peaks, (pss, rss, top)):
            self.peaks[key] = max(self.peaks[key], round(value / GB, 2))

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()


def run_stage(name: str, cmd: list[str], work: Path, env: dict) -> dict:
    """Run one stage as a child process: wall seconds, peak memory, and the JSON it left in results/<name>.json."""
    log_path = work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])[:160]}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = PeakMemory(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.done.set()
    out = {"seconds": round(time.perf_counter() - start, 1), "rc": rc, **sampler.peaks, "log": str(log_path)}
    result = work / "results" / f"{name}.json"
    if result.exists():
        out["result"] = json.loads(result.read_text())
    print(f"    {out['seconds']} s, peak PSS {out['peak_pss_gb']} GB, rc {rc}", flush=True)
    if rc != 0:
        raise RuntimeError(f"stage {name} failed (exit {rc}): see {log_path}")
    return out


# ------------------------------------------------------------------------------------------------- parent: 2. data
def write_subset(work: Path, n_species: int = 3, per_species: int = 4, n_predict: int = 20) -> dict:
    """The 12S subset (short amplicons: a step costs ~tokens) + 2 records of a 4th species (the open-set queries),
    and n_predict other short sequences for `idengine predict`."""
    import pandas as pd

    from idengine.data.fasta import read_fasta

    records = read_fasta(EXAMPLE / "sequences.fasta.gz")[0][["id", "sequence"]]
    labels = pd.read_csv(EXAMPLE / "labels.csv")
    table = labels.merge(records, on="id")
    table = table[table["sequence"].str.len() <= 200].drop_duplicates("sequence")
    counts = table["species"].value_counts()
    kept = list(counts.index[:n_species])
    rare = next(s for s in counts.index[n_species:] if counts[s] >= 2)
    chosen = pd.concat([table[table["species"] == s].head(per_species) for s in kept] +
                       [table[table["species"] == rare].head(2)])
    rest = table[~table["id"].isin(chosen["id"])]
    predict = rest.assign(length=rest["sequence"].str.len()).sort_values(["length", "id"]).head(n_predict)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for path, frame in ((data / "subset.fasta", chosen), (data / "predict.fasta", predict)):
        path.write_text("".join(f">{i}\n{s}\n" for i, s in zip(frame["id"], frame["sequence"])))
    chosen[labels.columns].to_csv(data / "labels.csv", index=False)
    return {"records": len(chosen), "species": kept, "open_set_species": rare, "predict_sequences": len(predict),
            "length_bp": [int(chosen["sequence"].str.len().min()), int(chosen["sequence"].str.len().max())],
            "predict_length_bp": [int(predict["length"].min()), int(predict["length"].max())]}


# ------------------------------------------------------------------------------------------------ parent: 6. sizes
def _tensor_numel(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_tensor_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_numel(v) for v in obj)
    return 0


def inspect_checkpoints(work: Path, base_bytes: int) -> dict:
    """Every Ray Train checkpoint of the run: files and bytes, and which weights it holds (adapter + head only?)."""
    import torch
    from safetensors import safe_open

    from idengine import layout as L

    found = []
    for directory in sorted(p.parent for p in (work / "ray").rglob(L.CKPT_TRAINABLE)):
        keys, numel = [], 0
        for name in (L.CKPT_TRAINABLE, L.CKPT_BEST):
            with safe_open(str(directory / name), "pt") as handle:
                for key in handle.keys():
                    keys.append(key)
                    numel += math.prod(handle.get_slice(key).get_shape())
        # optimizer.pt is idengine's own file (written by train/checkpoint.py); read tensors only
        optimizer = torch.load(directory / L.CKPT_OPTIMIZER, map_location="cpu", weights_only=True)
        files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
        found.append({"dir": str(directory.relative_to(work)), "bytes": sum(files.values()), "files": files,
                      "weights_numel": numel, "optimizer_numel": _tensor_numel(optimizer),
                      "base_weights": [k for k in keys if "lora_" not in k and "modules_to_save" not in k]})
    largest = max((c["bytes"] for c in found), default=0)
    return {"checkpoints": found, "count": len(found), "largest_bytes": largest,
            "base_in_any": any(c["base_weights"] for c in found), "base_fp32_bytes": base_bytes,
            "largest_vs_base": round(largest / base_bytes, 5) if base_bytes else None}


def directory_bytes(path: Path) -> dict:
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    return {"bytes": sum(files.values()), "files": files}


def predict_rate(log_path: str) -> dict:
    """`idengine predict`'s own count and seconds (its last log line), and records/s from them (the log rounds the
    rate to an integer: "0 records/s" at full size on a CPU)."""
    import re

    found = re.findall(r"predict: (\d+) records called.* in ([\d.]+) s", Path(log_path).read_text())
    if not found:
        return {}
    n, seconds = int(found[-1][0]), float(found[-1][1])
    return {"records": n, "seconds": seconds, "records_per_s": round(n / seconds, 3)}


# ----------------------------------------------------------------------------------------------------- the driver
def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / GB, 1),
            "available_gb_at_start": round(psutil.virtual_memory().available / GB, 1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarise(out: dict) -> dict:
    """The numbers the README and the config headers quote, from the stages measured so far."""
    s = out["stages"]
    step = {name: s[name]["result"] for name, *_ in STEP_RUNS if "result" in s.get(name, {})}
    build = s.get("build", {}).get("result", {})
    return {
        "parameters": build.get("parameters"), "build_s": build.get("build_s"), "write_s": build.get("write_s"),
        "load_s": {name: r["load_s"] for name, r in step.items()},
        "peak_pss_gb": {name: v["peak_pss_gb"] for name, v in s.items()},
        "peak_rss_max_process_gb": {name: v["peak_rss_max_process_gb"] for name, v in s.items()},
        "rss_after_load_gb": {name: r.get("rss_after_load_gb") for name, r in step.items()},
        "trainable_1377_species": step.get("fp32_ckpt_on_2x128", {}).get("parameters"),
        "step_s": {name: [x["seconds"] for x in r["steps"]] for name, r in step.items()},
        "step_finite": {name: r["finite"] for name, r in step.items()},
        "eval_forward_s": {name: r["eval_forward_s"] for name, r in step.items()},
        "saved_activation_bytes": {name: r["saved_activation_bytes"] for name, r in step.items()
                                   if r["saved_activation_bytes"] is not None},
        "checkpoint_largest_bytes": out.get("checkpoints", {}).get("largest_bytes"),
        "base_in_any_checkpoint": out.get("checkpoints", {}).get("base_in_any"),
        "artifact_bytes": out.get("artifact", {}).get("bytes"),
        "max_abs_logit_diff": s.get("reload", {}).get("result", {}).get("max_abs_logit_diff"),
        "predict": out.get("predict"), "stage_seconds": {name: v["seconds"] for name, v in s.items()},
    }


def stage_commands(args, work: Path, hf_home: Path, ov: list[str]) -> dict[str, list]:
    """Every child-process stage's command line, in run order (the step runs on the CPU only)."""
    child, cli = [sys.executable, STAGES], [sys.executable, "-m", "idengine.cli"]
    prepared = ["--prepared", work / "prepared"]
    cmds = {
        "build": [*child, "build", "--work", work, "--hf-home", hf_home, *(["--tiny"] if args.tiny else [])],
        "prepare": [*cli, "prepare", "--config", CONFIG, "--out", work / "prepared", *ov],
        "cv": [*cli, "cv", "--config", CONFIG, *prepared, "--out", work / "cv", *ov],
        "train": [*cli, "train", "--config", CONFIG, *prepared, "--cv", work / "cv", "--out", work / "model", *ov],
        "predict": [*cli, "predict", "--config", CONFIG, "--model", work / "model", "--sequences",
                    work / "data" / "predict.fasta", "--out", work / "calls.csv", *ov],
        "reload": [*child, "reload", "--work", work],
    }
    for name, base_dtype, ckpt, batch, tokens, steps in STEP_RUNS if args.device == "cpu" else ():
        cmds[name] = [*child, "step", "--work", work, "--name", name, "--base-dtype", base_dtype,
                      "--ckpt" if ckpt else "--no-ckpt", "--batch", batch, "--tokens", tokens, "--steps", steps,
                      *[x for o in ov for x in ("--set", o)]]
    if args.device == "cpu":
        cmds["activations"] = [*child, "activations", "--work", work, "--name", "activations", "--batch", 2,
                               "--tokens", 32, *[x for o in ov for x in ("--set", o)]]
    return cmds


def measure_sizes(out: dict, work: Path) -> None:
    """Stage 6, from what the stages left in `work`: checkpoints, artifact, predict's rate."""
    if (work / "ray").is_dir():
        base_bytes = out["stages"].get("build", {}).get("result", {}).get("fp32_bytes", 0)
        out["checkpoints"] = inspect_checkpoints(work, base_bytes)
    if (work / "model").is_dir():
        out["artifact"] = directory_bytes(work / "model")
    if "predict" in out["stages"]:
        n, seconds = out["data"]["predict_sequences"], out["stages"]["predict"]["seconds"]
        out["predict"] = {"sequences": n, "stage_seconds": seconds, "stage_seqs_per_s": round(n / seconds, 3),
                          **predict_rate(out["stages"]["predict"]["log"])}


def new_record(args, work: Path, ov: list[str]) -> dict:
    return {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "commit": commit(), "machine": machine(), "tiny": args.tiny, "device": args.device,
            "config": str(CONFIG.relative_to(REPO)), "overrides": [o.replace(str(work), "<work>") for o in ov],
            "stages": {}}


def run_all(args) -> dict:
    """The chosen stages in order (all by default, in a fresh --work); the JSON is rewritten after each, so a
    failure keeps what was measured. With --stages the existing --work and JSON are kept and merged into."""
    work = Path(args.work).resolve()
    hf_home = Path(args.hf_home).resolve() if args.hf_home else work / "hf"
    ov, start = overrides(work, args.device), time.perf_counter()
    cmds = stage_commands(args, work, hf_home, ov)
    chosen = args.stages or [*cmds, SIZES]
    unknown = sorted(set(chosen) - {*cmds, SIZES})
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {' '.join([*cmds, SIZES])}")
    if not args.stages and work.exists():
        shutil.rmtree(work)
    record = new_record(args, work, ov)
    out = json.loads(Path(args.out).read_text()) if args.stages and Path(args.out).exists() else record
    if args.stages:
        run = {k: v for k, v in record.items() if k in ("command", "date", "commit", "machine")}
        out.setdefault("runs", []).append({**run, "stages": list(chosen)})
    (work / "results").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **hub_env(hf_home), "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # else Ray gives its 1-CPU worker 1 torch thread
    out["data"] = write_subset(work)  # seeded by the example's order: the same files every time
    for name, cmd in cmds.items():
        if name not in chosen or (name == "build" and not args.stages and (hf_home / "hub").is_dir()):
            continue
        if name != "build" and not (hf_home / "hub").is_dir():
            raise SystemExit(f"no checkpoint in {hf_home}/hub: run the build stage first (or pass --hf-home)")
        out["stages"][name] = run_stage(name, [str(c) for c in cmd], work, env)
        Path(args.out).write_text(json.dumps(out, indent=1))
    if SIZES in chosen:
        measure_sizes(out, work)
    if args.stages:
        out["runs"][-1]["seconds"] = round(time.perf_counter() - start, 1)
    else:
        out["total_seconds"] = round(time.perf_counter() - start, 1)
    out["summary"] = summarise(out)
    if not args.stages and not args.keep and not args.hf_home:
        shutil.rmtree(hf_home, ignore_errors=True)  # the throwaway hub cache (10 GB at full size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "runs" / "full_scale"),
                        help="scratch directory (replaced, unless --stages)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "full_scale.json"))
    parser.add_argument("--tiny", action="store_true", help="the tiny model of the same architecture (minutes)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the pipeline on one GPU, without the CPU step measurements (bench/gpu_check.py)")
    parser.add_argument("--hf-home", help="an HF_HOME that already holds the checkpoint (skips the build, kept)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway hub cache (10 GB at full size)")
    parser.add_argument("--stages", nargs="+", metavar="NAME",
                        help=f"only these, in --work as it is, merged into --out; the hub cache is kept. Names: "
                             f"{' '.join(PIPELINE)} {' '.join(n for n, *_ in STEP_RUNS)} {SIZES}")
    args = parser.parse_args()
    out = run_all(args)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
