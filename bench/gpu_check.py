"""The 2.5B Nucleotide Transformer at full size on one NVIDIA GPU (random weights, no network), run by gpu_check.sh.

1. build     the random 2.5B checkpoint in the hub cache layout (bench/hub_checkpoint.py; drawn on the GPU, seconds)
             in a throwaway HF_HOME, loaded afterwards offline through the trusted hub id, as production loads it.
2. grid      for an fp32 and a bf16 base (`model.base_dtype`) x gradient checkpointing on/off x batch {8, 32} x
             {128, 330, 1000} tokens: training tokens/s (`train/loop.train_epoch`, LoRA r=8, bf16 autocast) and peak
             CUDA memory (allocated and reserved); a shape that runs out of memory says so, and larger ones are skipped.
3. finetune  one fold (fold 0 of examples/12s-fish-mini, prepared by `idengine prepare`'s recipe) with LoRA for a few
             hundred optimizer steps through `train/loop.run_training`: loss per epoch, validation metrics, seconds.
4. pipeline  (when Ray is installed and time is left) bench/full_scale.py --device cuda on the same checkpoint:
             prepare -> cv -> train -> predict -> plain transformers + peft reload.
Writes bench/results/gpu_check.json (or --out). Stays inside --budget-s: a part that would not fit is recorded as
skipped. `--dry-run` runs the same code on the tiny model on the CPU (fewer steps) to check the script itself.

    bench/gpu_check.sh              # on the GPU machine
    bench/gpu_check.sh --dry-run    # here, on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from hub_checkpoint import HUB_SHARD_BYTES, apply_hub_env, random_masked_lm, write_hub_checkpoint  # noqa: E402

HUB_ID = "InstaDeepAI/nucleotide-transformer-2.5b-multi-species"
CONFIG = REPO / "jobs" / "configs" / "nt2.5b-1gpu.yaml"
EXAMPLE = REPO / "examples" / "12s-fish-mini"
BATCHES, LENGTHS, BASES = (8, 32), (128, 330, 1000), ("fp32", "bf16")
NUM_LABELS = 1377  # the species of 12s-fish: the head of the grid's model
GIB = 2 ** 30


class Clock:
    """The run's time budget: what is left, and whether a part of a given cost still fits."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def fits(self, seconds: float) -> bool:
        return self.left() > seconds


def cuda_peaks(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def reset_cuda(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(hf_home: Path, tiny: bool, device) -> dict:
    start = time.perf_counter()
    model = random_masked_lm(full_size=not tiny, device=device.type)
    build_s = time.perf_counter() - start
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    written = write_hub_checkpoint(hf_home / "hub", HUB_ID, model,
                                   max_shard_bytes=int(total * 0.97) if tiny else HUB_SHARD_BYTES)
    del model
    return {"build_s": round(build_s, 1), "write_s": written["seconds"], "parameters": written["parameters"],
            "shards": written["shards"]}


def load_model(base_dtype: str, ckpt: bool, device, overrides: list[str]):
    """build_model as production does (nt2.5b-1gpu.yaml, the hub id), moved to the GPU; returns (model, seconds)."""
    from idengine.config_io import load_config
    from idengine.models.transformer import build_model

    config = load_config(CONFIG, [f"model.backbone={HUB_ID}", f"model.base_dtype={base_dtype}",
                                  f"model.gradient_checkpointing={str(ckpt).lower()}", *overrides])
    start = time.perf_counter()
    model = build_model(config.model, config.lora, NUM_LABELS, {i: f"s{i}" for i in range(NUM_LABELS)}).to(device)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return model, config, round(time.perf_counter() - start, 1)


def measure_shape(model, config, batch: int, tokens: int, device, steps: int) -> dict:
    """One warm-up step, then `steps` timed optimizer steps of train_epoch on a (batch, tokens) random batch."""
    import torch

    from full_scale_stages import step_batch
    from idengine.models.inference import autocast_dtype_for
    from idengine.train.loop import build_optimizer, build_scheduler, grad_scaler_for, train_epoch

    cfg = dataclasses.replace(config.train, warmup_fraction=0.0, grad_accum_steps=1)
    autocast = autocast_dtype_for("bf16", device)
    data = step_batch(batch, tokens, NUM_LABELS)
    optimizer = build_optimizer(model, cfg)
    scheduler, scaler = build_scheduler(optimizer, cfg, steps + 1), grad_scaler_for(model, autocast, device)
    reset_cuda(device)
    run = functools.partial(train_epoch, model, optimizer=optimizer, scheduler=scheduler, cfg=cfg, weights=None,
                            device=device, autocast_dtype=autocast, scaler=scaler)
    try:
        run([data])
        timed = run([data] * steps, max_steps=steps)
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return {"batch": batch, "tokens": tokens, "status": "out of memory", **cuda_peaks(device)}
    return {"batch": batch, "tokens": tokens, "status": "ok", "steps": steps,
            "step_s": round(timed["seconds"] / steps, 3), "tokens_per_s": round(timed["tokens"] / timed["seconds"]),
            "loss": round(timed["loss"], 4), "finite": math.isfinite(timed["loss"]), **cuda_peaks(device)}


def grid(device, clock: Clock, steps: int, overrides: list[str], batches=BATCHES, lengths=LENGTHS) -> list[dict]:
    """Every base x checkpointing x batch x length; shapes beyond one that ran out of memory are skipped."""
    rows = []
    for base_dtype in BASES:
        for ckpt in (True, False):
            if not clock.fits(60):
                rows.append({"base_dtype": base_dtype, "gradient_checkpointing": ckpt, "status": "skipped: time"})
                continue
            reset_cuda(device)
            model, config, load_s = load_model(base_dtype, ckpt, device, overrides)
            failed: list[tuple[int, int]] = []
            for batch in batches:
                for tokens in lengths:
                    row = {"base_dtype": base_dtype, "gradient_checkpointing": ckpt, "load_s": load_s}
                    if any(batch >= b and tokens >= t for b, t in failed):
                        row.update(batch=batch, tokens=tokens, status="skipped: a smaller shape ran out of memory")
                    elif not clock.fits(20):
                        row.update(batch=batch, tokens=tokens, status="skipped: time")
                    else:
                        row.update(measure_shape(model, config, batch, tokens, device, steps))
                        if row["status"] == "out of memory":
                            failed.append((batch, tokens))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del model
    reset_cuda(device)
    return rows


def fold_data(config, work: Path):
    """Fold 0 of examples/12s-fish-mini: prepared by idengine's recipe (no Ray), tokenized by the hub tokenizer."""
    import numpy as np

    from idengine import layout as C
    from idengine.data.prepared import read_prepared
    from idengine.data.splits import fold_rows
    from idengine.data.tokenize import load_tokenizer, tokenize_batch
    from idengine.recipes.prepare import prepare_dataset

    prepared = prepare_dataset(config, work / "prepared")
    records, labels = read_prepared(prepared)
    tokens = tokenize_batch({C.SEQUENCE: records[C.SEQUENCE].to_numpy(dtype=object)}, load_tokenizer(HUB_ID),
                            config.model.max_tokens)[C.INPUT_IDS]
    y = records[C.LABEL].to_numpy(dtype=np.int64)
    train, val = fold_rows(records[C.FOLD], "0")
    return ({C.INPUT_IDS: tokens[train], C.LABEL: y[train]}, {C.INPUT_IDS: tokens[val], C.LABEL: y[val]}, labels)


def finetune(device, work: Path, target_steps: int, overrides: list[str]) -> dict:
    """A LoRA fine-tune of fold 0 for about target_steps optimizer steps (whole epochs), validation each epoch."""
    from idengine.config_io import load_config
    from idengine.evaluate.metrics import score_logits
    from idengine.models.transformer import build_model
    from idengine.train.loop import local_train_data, train_local

    config = load_config(CONFIG, [f"data.sequences={EXAMPLE / 'sequences.fasta.gz'}",
                                  f"data.labels={EXAMPLE / 'labels.csv'}", f"model.backbone={HUB_ID}",
                                  "model.max_tokens=330", "model.base_dtype=bf16", "model.gradient_checkpointing=false",
                                  "train.batch_size=8", "train.grad_accum_steps=1", "train.patience=0",
                                  "train.train_eval_size=64", "train.lr=3e-4", *overrides])
    train, val, labels = fold_data(config, work)
    steps_per_epoch = math.ceil(len(train["label"]) / config.train.batch_size)
    cfg = dataclasses.replace(config.train, epochs=max(1, round(target_steps / steps_per_epoch)))
    reset_cuda(device)
    start = time.perf_counter()
    model = build_model(config.model, config.lora, labels.num_classes, dict(enumerate(labels.species))).to(device)
    outcome = train_local(model, local_train_data(train, val, cfg, labels.num_classes), cfg,
                          functools.partial(score_logits, top_k=5), device)
    keep = ("epoch", "loss", "top1_acc", "pr_auc_macro", "log_loss", "seconds", "tokens_per_s")
    return {"train_records": len(train["label"]), "val_records": len(val["label"]), "species": labels.num_classes,
            "epochs": cfg.epochs, "optimizer_steps": cfg.epochs * steps_per_epoch, "batch": cfg.batch_size,
            "max_tokens": config.model.max_tokens, "base_dtype": "bf16", "precision": cfg.precision,
            "seconds": round(time.perf_counter() - start, 1),
            "history": [{k: h.get(k) for k in keep} for h in outcome.state.history], **cuda_peaks(device)}


def pipeline(work: Path, hf_home: Path, clock: Clock) -> dict:
    """bench/full_scale.py --device cuda (Ray Train, `idengine` commands) on the same checkpoint, if it fits."""
    if importlib.util.find_spec("ray") is None:
        return {"status": "skipped: ray is not installed here"}
    if not clock.fits(240):
        return {"status": f"skipped: {clock.left():.0f} s left of the budget"}
    out = work / "pipeline.json"
    cmd = [sys.executable, str(REPO / "bench" / "full_scale.py"), "--device", "cuda", "--work", str(work / "pipeline"),
           "--hf-home", str(hf_home), "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own process group: a timeout ends Ray's children too
    try:
        proc.wait(timeout=clock.left() - 10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = json.loads(out.read_text()) if out.exists() else {}
    status = "ok" if proc.returncode == 0 else f"failed or timed out (exit {proc.returncode})"
    return {"status": status, "summary": result.get("summary"), "stages": {
        k: {x: v.get(x) for x in ("seconds", "peak_pss_gb", "rc")} for k, v in result.get("stages", {}).items()}}


def environment(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                    bf16=torch.cuda.is_bf16_supported())
    for name in ("transformers", "peft"):
        info[name] = __import__(name).__version__
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/idengine-gpu-check", help="scratch directory (HF_HOME inside)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--budget-s", type=float, default=440.0, help="stop starting new parts after this")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per shape (after 1 warm-up)")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU: checks this script")
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="grid batch sizes")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="grid lengths (tokens)")
    args = parser.parse_args()
    work, hf_home = Path(args.work), Path(args.work) / "hf"
    apply_hub_env(hf_home)  # before transformers reads it: offline, from the throwaway cache only
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or `bench/gpu_check.sh --dry-run` to check the script on the CPU", file=sys.stderr)
        return 3
    device, clock = torch.device("cpu" if args.dry_run else "cuda"), Clock(args.budget_s)
    overrides = ["train.use_gpu=false", "train.precision=fp32"] if args.dry_run else ["train.use_gpu=true"]
    out = {"dry_run": args.dry_run, "environment": environment(device), "budget_s": args.budget_s}

    def save() -> None:
        out["seconds"] = round(time.perf_counter() - clock.start, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))

    out["build"] = build(hf_home, args.dry_run, device)
    save()
    out["grid"] = grid(device, clock, args.steps, overrides, args.batches, args.lengths)
    save()
    out["finetune"] = finetune(device, work, args.finetune_steps, overrides) if clock.fits(90) else \
        {"status": "skipped: time"}
    save()
    out["pipeline"] = {"status": "skipped: --no-pipeline"} if args.no_pipeline else pipeline(work, hf_home, clock)
    save()
    print(f"gpu_check: {out['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
