"""Step 7d, probe: a linear or small MLP head on a frozen backbone's pooled embeddings (`features/embeddings.py`).

The lightweight path and a cheap tuning surrogate: `fit_probe` trains a head on cached embeddings, in torch (on the GPU
when there is one); the fitted `Probe` is plain arrays, saved as safetensors + JSON for an artifact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from idengine import layout as L
from idengine.config import PROBE_HEADS
from idengine.models.kmer import log_probs_all_classes

log = logging.getLogger(__name__)

LINEAR_C = 1.0  # inverse L2 strength of the linear probe, as scikit-learn's C (its default)
LBFGS_MAX_ITER = 500
MLP_HIDDEN, MLP_DROPOUT, MLP_LR, MLP_WEIGHT_DECAY = 512, 0.2, 1e-3, 1e-2
BATCH_ROWS, MAX_EPOCHS, PATIENCE = 256, 300, 20
"""mlp: epochs without a better held-out score before it stops (the best epoch's weights are kept)."""
HOLDOUT_FRACTION, MIN_ROWS_FOR_HOLDOUT = 0.1, 40
NO_HOLDOUT_EPOCHS = 50
"""mlp: epochs trained when the fold is too small to hold anything out."""


@dataclass
class Probe:
    """A fitted head as plain arrays: standardise, then Linear (+ ReLU + Linear for `mlp`), over present classes."""

    kind: str
    num_classes: int
    mean: np.ndarray
    scale: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]
    """(weight (out, in), bias (out,)) per Linear layer; the last one scores the present classes."""
    present: np.ndarray
    """(num_classes,) bool: the class had training records."""
    iterations: int = 0
    """L-BFGS iterations (linear) or the kept epoch (mlp)."""
    history: list[float] = field(default_factory=list)
    """mlp: held-out loss per epoch (empty when nothing was held out)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, num_classes) float32 log-probabilities; classes absent from training sit far below every other."""
        h = (np.asarray(x, dtype=np.float32) - self.mean) / self.scale
        for i, (weight, bias) in enumerate(self.layers):
            h = h @ weight.T + bias
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        scores = np.zeros((h.shape[0], self.num_classes), dtype=np.float64)
        scores[:, self.present] = h
        return log_probs_all_classes(scores, self.present).astype(np.float32)

    def save(self, directory: str | Path) -> Path:
        """Write probe.json (kind, sizes) + probe.safetensors (standardisation, layers, present classes; no pickle)."""
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "scale": self.scale, "present": self.present.astype(np.uint8)}
        for i, (weight, bias) in enumerate(self.layers):
            arrays[f"layer{i}.weight"], arrays[f"layer{i}.bias"] = weight, bias
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / L.PROBE_ARRAYS))
        meta = {"kind": self.kind, "num_classes": self.num_classes, "layers": len(self.layers),
                "iterations": self.iterations}
        (out / L.PROBE_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out


def load_probe(directory: str | Path) -> Probe:
    """Read a probe written by `Probe.save`; FileNotFoundError when its files are missing."""
    from safetensors.numpy import load_file

    src = Path(directory)
    for name in (L.PROBE_META, L.PROBE_ARRAYS):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} not found: not a directory written by Probe.save")
    meta = json.loads((src / L.PROBE_META).read_text(encoding="utf-8"))
    a = load_file(str(src / L.PROBE_ARRAYS))
    layers = [(a[f"layer{i}.weight"], a[f"layer{i}.bias"]) for i in range(int(meta["layers"]))]
    return Probe(meta["kind"], int(meta["num_classes"]), a["mean"], a["scale"], layers, a["present"].astype(bool),
                 int(meta.get("iterations", 0)))


def _fit_linear(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[nn.Linear, int]:
    """scikit-learn's multinomial LogisticRegression objective (mean cross-entropy + |W|^2 / (2 C n), bias free),
    minimised by full-batch L-BFGS in torch so it runs on the GPU: lbfgs in scikit-learn took 25 s per iteration
    at the real scale (10k x 2560 x 1,400 classes) on 2 loaded cores."""
    net = nn.Linear(x.shape[1], k).to(x.device)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)
    l2 = 1.0 / (LINEAR_C * len(y))
    optimizer = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=LBFGS_MAX_ITER, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y) + 0.5 * l2 * net.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return net, int(optimizer.state[net.weight].get("n_iter", 0))


def _holdout_mask(y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """About HOLDOUT_FRACTION of the rows for early stopping: at most one whole group per species that keeps two
    more in training, so no species vanishes from the fit and no duplicate sequence sits on both sides."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"y": y, "g": groups})
    candidates = [rng.choice(g) for g in frame.groupby("y")["g"].unique() if len(g) >= 3]
    rng.shuffle(candidates)
    sizes, chosen, count = frame.groupby("g").size(), [], 0
    for g in candidates:
        if count >= HOLDOUT_FRACTION * len(y):
            break
        chosen.append(g)
        count += int(sizes[g])
    return frame["g"].isin(chosen).to_numpy(copy=True)


def _fit_mlp(x: torch.Tensor, y: torch.Tensor, k: int, holdout: torch.Tensor, seed: int
             ) -> tuple[nn.Module, int, list[float]]:
    """One hidden layer, mini-batch AdamW; stop after PATIENCE epochs without a better held-out (accuracy, loss)
    and keep the best epoch's weights. Accuracy comes first, as in scikit-learn's MLPClassifier: the held-out loss
    rises as soon as the head grows confident, long before its calls get worse (calibrate.py fixes confidence)."""
    net = nn.Sequential(nn.Linear(x.shape[1], MLP_HIDDEN), nn.ReLU(), nn.Dropout(MLP_DROPOUT),
                        nn.Linear(MLP_HIDDEN, k)).to(x.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
    fit_x, fit_y, val_x, val_y = x[~holdout], y[~holdout], x[holdout], y[holdout]
    generator, has_val = torch.Generator().manual_seed(seed), bool(holdout.any())
    best, best_epoch, best_state, history = (-1.0, -float("inf")), 0, None, []
    for epoch in range(1, (MAX_EPOCHS if has_val else NO_HOLDOUT_EPOCHS) + 1):
        net.train()
        for idx in torch.randperm(len(fit_y), generator=generator).split(BATCH_ROWS):
            loss = F.cross_entropy(net(fit_x[idx.to(x.device)]), fit_y[idx.to(x.device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not has_val:
            continue
        net.eval()
        with torch.no_grad():
            val_logits = net(val_x)
            history.append(float(F.cross_entropy(val_logits, val_y)))
            score = (float((val_logits.argmax(dim=1) == val_y).float().mean()), -history[-1])
        if score[0] > best[0] or (score[0] == best[0] and score[1] > best[1] + 1e-4):
            best, best_epoch = score, epoch
            best_state = {name: v.detach().clone() for name, v in net.state_dict().items()}
        elif epoch - best_epoch >= PATIENCE:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    return net, (best_epoch if has_val else NO_HOLDOUT_EPOCHS), history


def fit_probe(kind: str, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0,
              groups: np.ndarray | None = None, device: str | None = None) -> Probe:
    """Train a head on standardised embeddings, in torch (on the GPU when there is one).

    Args:
        kind: `linear` (multinomial logistic regression, L2 with C = LINEAR_C, the optimum scikit-learn's
            LogisticRegression finds, on every training row) or `mlp` (one hidden layer, early-stopped on a held-out
            slice of the training rows).
        x: (n, hidden) training embeddings.
        y: (n,) int labels in 0..num_classes-1.
        num_classes: size of the whole label space (logits cover every class).
        seed: seed of the mlp's held-out slice, initial weights, shuffling and dropout (linear is deterministic).
        groups: (n,) group of each row (identical sequences share one), so the mlp never holds out a copy of a
            training row; when None, identical embeddings form the groups.
        device: where to train (`cuda` when there is one, else `cpu`, when None).

    Returns:
        The fitted Probe.

    Raises:
        ValueError: unknown kind, shapes disagree, labels out of range or fewer than two classes.
    """
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    if kind not in PROBE_HEADS:
        raise ValueError(f"unknown probe {kind!r}; choose one of {PROBE_HEADS}")
    if x.ndim != 2 or y.shape != (x.shape[0],) or len(y) == 0:
        raise ValueError(f"expected x (n, hidden) and y (n,) with n > 0, got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be integers in 0..{num_classes - 1}")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError("a probe needs at least two species in the training data")
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    xt = torch.from_numpy((x - mean) / scale).to(device)
    yt = torch.from_numpy(np.searchsorted(classes, y)).long().to(device)
    history: list[float] = []
    if kind == "linear":
        net, iterations = _fit_linear(xt, yt, classes.size)
    else:
        if groups is None:
            groups = np.unique(x, axis=0, return_inverse=True)[1].ravel()
        held = _holdout_mask(y, np.asarray(groups), seed) if len(y) >= MIN_ROWS_FOR_HOLDOUT else np.zeros_like(y, bool)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, iterations, history = _fit_mlp(xt, yt, classes.size, torch.from_numpy(held).to(device), seed)
    layers = [(m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy())
              for m in net.modules() if isinstance(m, nn.Linear)]
    present = np.zeros(num_classes, dtype=bool)
    present[classes] = True
    log.info("%s probe: %d rows, %d of %d classes, %d iterations/epochs", kind, len(y), classes.size, num_classes,
             iterations)
    return Probe(kind, num_classes, mean, scale, layers, present, iterations, history)
