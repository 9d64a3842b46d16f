"""Measure the k-mer baselines on 12s-fish's protocol folds (PEERS.md): fit time, speed, metrics, peak RSS.

Usage: python bench/kmer_baselines_check.py [kind ...] [--fold 0] [--k 8] [--sgd-alpha 3e-6]
Each kind runs in its own process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "12s-fish"


def load_records() -> pd.DataFrame:
    """protocol-folds.csv joined to upper-case sequences with every non-ACGT base as N."""
    seqs, name, parts = {}, None, []
    with gzip.open(DATA / "sequences.fasta.gz", "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                if name:
                    seqs[name] = "".join(parts)
                name, parts = line[1:].split()[0], []
            else:
                parts.append(re.sub("[^ACGT]", "N", line.strip().upper()))
    seqs[name] = "".join(parts)
    folds = pd.read_csv(DATA / "protocol-folds.csv")
    folds["sequence"] = folds["id"].map(seqs)
    folds["label"] = folds["species"].map({s: i for i, s in enumerate(sorted(folds["species"].unique()))})
    return folds


def measure(kind: str, fold: int, k: int, sgd_alpha: float | None) -> dict:
    from idengine.models import kmer as baselines
    from idengine.models.kmer import fit_kmer_model
    from idengine.evaluate.metrics import classification_metrics, softmax

    if sgd_alpha is not None:  # exploration only: the package's value is baselines.SGD_ALPHA
        baselines.SGD_ALPHA = sgd_alpha
    df = load_records()
    num_classes = int(df["label"].max()) + 1
    train, val = df[df["fold"] != fold], df[df["fold"] == fold]
    wall, cpu = time.perf_counter(), time.process_time()
    model = fit_kmer_model(kind, train["sequence"].to_numpy(), train["label"].to_numpy(), num_classes, k=k)
    fit_s, fit_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    logits = model.logits(val["sequence"].to_numpy()).astype(np.float64)
    predict_s, predict_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    y = val["label"].to_numpy()
    metrics = classification_metrics(y, softmax(logits))
    nll = lambda t: float(-log_softmax(logits / t, axis=1)[np.arange(y.size), y].mean())  # noqa: E731
    best = minimize_scalar(nll, bounds=(0.01, 100), method="bounded")
    alpha = baselines.SGD_ALPHA if kind == "kmer-linear" else None
    return {"kind": kind, "fold": fold, "k": k, "sgd_alpha": alpha, "n_train": len(train), "n_val": len(val),
            "fit_s": round(fit_s, 1), "fit_cpu_s": round(fit_cpu_s, 1),
            "predict_seqs_per_s": round(len(val) / predict_s),
            "predict_seqs_per_cpu_s": round(len(val) / predict_cpu_s), **{m: round(v, 4) for m, v in metrics.items()},
            "log_loss_at_best_T(fold-fitted)": round(best.fun, 4), "best_T": round(float(best.x), 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kinds", nargs="*", default=["kmer-nb", "kmer-linear"])
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sgd-alpha", type=float, default=None)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(measure(args.kinds[0], args.fold, args.k, args.sgd_alpha)))
        return
    for kind in args.kinds:
        cmd = [sys.executable, __file__, kind, "--fold", str(args.fold), "--k", str(args.k), "--inner"]
        cmd += ["--sgd-alpha", str(args.sgd_alpha)] if args.sgd_alpha is not None else []
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
