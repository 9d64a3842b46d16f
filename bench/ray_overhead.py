"""What does Ray Train cost per epoch? The same fold, model and loop, with and without Ray.

Three runs of `idengine.train.loop.run_fold` on the same training records, each timed by the loop itself (tokens/s
of `train_epoch`, so start-up, scoring and checkpoints are excluded):
  - plain:     no Ray at all: in-memory batches (`loop.local_fold_data`), `loop.train_fold_local`;
  - local:     Ray Train local mode (`train.num_workers=0`): batches stream from Ray Data in the driver;
  - 1 worker:  a Ray Train worker actor (`train.num_workers=1`): Ray Data shard, DDP-ready `prepare_model`.
Every run uses one torch thread, so the comparison is of the plumbing, not of thread counts. The ratio of median
epoch throughputs goes to the results file; the goal is Ray costing at most 15% per epoch.

    python bench/ray_overhead.py --prepared runs/bench/12s-fish/prepared --max-train-records 3000 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from idengine import layout as C  # noqa: E402
from idengine.config_io import load_config, with_values  # noqa: E402
from idengine.data.prepared import read_prepared
from idengine.recipes.prepare import prepare_dataset  # noqa: E402
from idengine.features.tokens import tokenized_table  # noqa: E402
from idengine.evaluate.metrics import classification_metrics, softmax  # noqa: E402
from idengine.models.transformer import build_model  # noqa: E402
from idengine.train.loop import local_fold_data, train_fold_local  # noqa: E402
from idengine.train.ray_train import fit_fold, fold_tables  # noqa: E402


def subset(tokens: pa.Table, fold: str, max_train: int, seed: int) -> pa.Table:
    """The validation fold plus at most max_train training records (same rows for every run)."""
    train, val = fold_tables(tokens, fold)
    rows = np.sort(np.random.default_rng(seed).permutation(train.num_rows)[:max_train])
    return pa.concat_tables([train.take(pa.array(rows)), val])


def plain_run(config, tokens: pa.Table, fold: str, labels) -> list[float]:
    train, val = fold_tables(tokens, fold)
    columns = lambda t: {C.INPUT_IDS: np.array([np.asarray(x, dtype=np.int64) for x in t.column(C.INPUT_IDS)
                                                .to_pylist()], dtype=object),
                         C.LABEL: np.asarray(t.column(C.LABEL))}
    data = local_fold_data(columns(train), columns(val), config.train, labels.num_classes)
    model = build_model(config.model, config.lora, labels.num_classes, dict(enumerate(labels.species)))
    outcome = train_fold_local(model, data, config.train,
                               lambda z, y: classification_metrics(y, softmax(z), top_k=5), torch.device("cpu"))
    return [h["tokens_per_s"] for h in outcome.state.history]


def ray_run(config, tokens: pa.Table, fold: str, labels, name: str) -> list[float]:
    run = fit_fold(config, tokens, fold, labels.num_classes, dict(enumerate(labels.species)), name)
    return [h["tokens_per_s"] for h in run.history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", help="a prepared directory (default: prepare the bundled example)")
    parser.add_argument("--max-train-records", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ray_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = REPO / "runs" / "bench" / "ray_overhead"
    overrides = [f"train.storage_path={work / 'ray'}", f"train.epochs={args.epochs}", "train.patience=0",
                 "train.cpus_per_worker=1", "train.train_eval_size=64", "model.finetune=lora"]
    config = load_config(REPO / "jobs" / "configs" / "tiny-cpu.yaml", overrides)
    prepared = Path(args.prepared) if args.prepared else prepare_dataset(config, work / "prepared")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2)
    _, labels = read_prepared(prepared)
    tokens = subset(tokenized_table(prepared, config), "0", args.max_train_records, config.train.seed)
    results = {"plain (no Ray)": plain_run(config, tokens, "0", labels)}
    results["Ray Train local mode"] = ray_run(with_values(config, {"train.num_workers": 0}), tokens, "0", labels,
                                              f"local-{time.time():.0f}")
    results["Ray Train, 1 worker actor"] = ray_run(with_values(config, {"train.num_workers": 1}), tokens, "0",
                                                   labels, f"worker-{time.time():.0f}")
    write_results(args, results, tokens, prepared)


def write_results(args, results: dict[str, list[float]], tokens: pa.Table, prepared: Path) -> None:
    base = statistics.median(results["plain (no Ray)"])
    rows = {name: {"tokens_per_s_per_epoch": [round(x, 1) for x in tps], "median_tokens_per_s": round(
        statistics.median(tps), 1), "ratio_to_plain": round(statistics.median(tps) / base, 3),
        "ray_cost_pct": round(100 * (1 - statistics.median(tps) / base), 1)} for name, tps in results.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit, "machine": machine(),
              "prepared": str(prepared), "train_records": int(pc.sum(pc.not_equal(tokens.column(C.FOLD), "0")).as_py()),
              "epochs": args.epochs, "torch_threads": 1, "goal": "Ray costs at most 15% per epoch", "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}"


if __name__ == "__main__":
    main()
