"""Step 10c, decision: a scorer over each query's options (evidence.py), a softmax per query, calibrated.

The model is a conditional logit (as PROTAX's, with a small MLP as its scorer): one score per option from the option's
features, probabilities = softmax over the query's own options. It is fitted by maximum likelihood on out-of-fold
evidence with simulated novelty (scenarios.py), then its temperature is fitted on out-of-fold outputs, so that a
probability means what it says. Stored as plain arrays (safetensors + JSON): no pickle.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from idengine import layout as L
from idengine.evaluate.calibrate import fit_temperature
from idengine.reference.evidence import FEATURES, Options

log = logging.getLogger(__name__)

PAD_SCORE = -1e4
"""Score of padding slots: softmax gives them nothing, and it stays finite for the temperature fit."""
EPOCHS, BATCH_QUERIES, LR, WEIGHT_DECAY, PATIENCE = 200, 1024, 3e-3, 1e-4, 15
HOLDOUT_SHARE = 0.1
"""Queries held out (by their true answer's group) to stop the fit early."""


@dataclass
class DecisionModel:
    """Standardise the features, then a linear layer (hidden = 0) or Linear-ReLU-Linear, one score per option."""

    mean: np.ndarray
    scale: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]
    temperature: float = 1.0
    history: list[float] = field(default_factory=list)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(rows,) raw score of each option, before the per-query softmax and the temperature."""
        h = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        for i, (weight, bias) in enumerate(self.layers):
            h = h @ weight.T + bias
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h[:, 0].astype(np.float64)

    def probabilities(self, options: Options) -> np.ndarray:
        """(rows,) calibrated probability of each option; the options of a query sum to 1."""
        return segment_softmax(self.scores(options.features) / self.temperature, options.query, options.n_queries)

    def save(self, directory: Path) -> None:
        """decision.safetensors (standardisation, layers) + decision.json (feature names, temperature)."""
        from safetensors.numpy import save_file

        arrays = {"mean": self.mean, "scale": self.scale}
        for i, (weight, bias) in enumerate(self.layers):
            arrays[f"layer{i}.weight"], arrays[f"layer{i}.bias"] = weight, bias
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
                  str(directory / L.DECISION_FILE))
        meta = {"features": list(FEATURES), "layers": len(self.layers), "temperature": self.temperature}
        (directory / L.DECISION_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def load_decision(directory: Path) -> DecisionModel:
    """Read a decision model written by `DecisionModel.save`; ValueError when its features are not this version's."""
    from safetensors.numpy import load_file

    meta = json.loads((directory / L.DECISION_META).read_text(encoding="utf-8"))
    if meta["features"] != list(FEATURES):
        raise ValueError(f"{directory / L.DECISION_META}: the decision model was fitted on other features; "
                         "export the model again with this idengine")
    a = load_file(str(directory / L.DECISION_FILE))
    layers = [(a[f"layer{i}.weight"], a[f"layer{i}.bias"]) for i in range(int(meta["layers"]))]
    return DecisionModel(a["mean"], a["scale"], layers, float(meta["temperature"]))


def segment_softmax(scores: np.ndarray, query: np.ndarray, n_queries: int) -> np.ndarray:
    """Softmax of `scores` within each query's rows (queries given by `query`, any order)."""
    top = np.full(n_queries, -np.inf)
    np.maximum.at(top, query, scores)
    e = np.exp(scores - top[query])
    total = np.bincount(query, weights=e, minlength=n_queries)
    return e / total[query]


def padded(options: Options, values: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """(n_queries, max options) array of per-option `values` (fill where a query has fewer) and each row's slot."""
    slot = np.arange(len(options.query)) - np.searchsorted(options.query, options.query)
    width = int(slot.max()) + 1 if len(slot) else 1
    out = np.full((options.n_queries, width), fill, dtype=np.float64)
    out[options.query, slot] = values
    return out, slot


def _holdout(groups: np.ndarray, seed: int) -> np.ndarray:
    """A query mask of about HOLDOUT_SHARE, whole groups at a time (a species' queries stay on one side)."""
    names = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(names, size=max(1, int(round(HOLDOUT_SHARE * len(names)))), replace=False)) \
        if len(names) > 10 else set()
    return np.array([g in held for g in groups], dtype=bool)


@dataclass
class _Rows:
    """The trainable queries' option rows, flat (no padding): features, each row's query, each query's true row."""

    x: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    starts: np.ndarray
    counts: np.ndarray

    def batch(self, queries: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the given queries, their queries renumbered 0.., and the true rows within the batch."""
        counts = self.counts[queries]
        offsets = np.cumsum(counts) - counts
        rows = np.repeat(self.starts[queries] - offsets, counts) + np.arange(counts.sum())
        local = torch.from_numpy(np.repeat(np.arange(len(queries)), counts))
        target = torch.from_numpy(offsets) + self.target[torch.from_numpy(queries)] - \
            torch.from_numpy(self.starts[queries])
        return self.x[torch.from_numpy(rows)], local, target


def _rows(options: Options, target_slot: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> _Rows:
    """The option rows of the queries whose true option is offered (target_slot >= 0), standardised."""
    keep = target_slot >= 0
    sub = options.take(np.flatnonzero(keep[options.query]))
    renumber = np.cumsum(keep) - 1
    query = renumber[sub.query]
    starts = np.searchsorted(query, np.arange(int(keep.sum())))
    counts = np.bincount(query, minlength=int(keep.sum()))
    target = torch.from_numpy(starts + target_slot[keep])
    x = torch.from_numpy(((sub.features - mean) / scale).astype(np.float32))
    return _Rows(x, torch.from_numpy(query), target, starts, counts)


def _net(width: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(width, 1)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def _nll(net: nn.Module, x: torch.Tensor, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over queries of -log softmax(score) of the true option, the softmax within each query's rows."""
    scores = net(x).squeeze(-1)
    n = int(query.max()) + 1
    top = torch.full((n,), -torch.inf).scatter_reduce(0, query, scores.detach(), reduce="amax")
    total = torch.zeros(n).index_add_(0, query, torch.exp(scores - top[query]))
    return (torch.log(total) + top - scores[target]).mean()


def _train(net: nn.Module, data: _Rows, held: np.ndarray, seed: int) -> tuple[dict, list[float]]:
    """Mini-batch AdamW on the fitted queries; the epoch with the lowest held-out NLL is kept."""
    fit, val = np.flatnonzero(~held), np.flatnonzero(held)
    check = data.batch(val if len(val) else fit)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(seed)
    best, best_state, history = np.inf, None, []
    for epoch in range(EPOCHS):
        net.train()
        order = rng.permutation(fit)
        for start in range(0, len(order), BATCH_QUERIES):
            loss = _nll(net, *data.batch(order[start:start + BATCH_QUERIES]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            history.append(float(_nll(net, *check)))
        if history[-1] < best - 1e-5:
            best, best_state = history[-1], {k: v.detach().clone() for k, v in net.state_dict().items()}
        elif epoch - int(np.argmin(history)) >= PATIENCE:
            break
    return best_state, history


def fit_decision(options: Options, target_slot: np.ndarray, groups: np.ndarray, hidden: int = 32,
                 seed: int = 0) -> DecisionModel:
    """Fit the scorer by maximum likelihood of each query's true option.

    Args:
        options: every option of the training queries (evidence.build_options over the scenarios).
        target_slot: (n_queries,) position of the true option among the query's rows; -1 where the truth is not
            among the options (such queries cannot teach the scorer anything and are left out).
        groups: (n_queries,) the true answer's group (e.g. species), so the early-stopping hold-out never splits one.
        hidden: hidden units (0: linear scorer); seed: initialisation, shuffling and the hold-out.

    Returns:
        The fitted model (temperature 1; fit it on out-of-fold scores with `fit_score_temperature`).
    """
    mean = options.features.mean(axis=0)
    scale = np.maximum(options.features.std(axis=0), 1e-6)
    data = _rows(options, target_slot, mean, scale)
    held = _holdout(np.asarray(groups)[target_slot >= 0], seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: more threads only spin against each other on a shared machine
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _net(len(FEATURES), hidden)
            state, history = _train(net, data, held, seed)
    finally:
        torch.set_num_threads(threads)
    net.load_state_dict(state)
    layers = [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
              for m in net.modules() if isinstance(m, nn.Linear)]
    log.info("decision model: %d queries (%d held out), %d options, %d epochs, held-out NLL %.4f",
             int((target_slot >= 0).sum()), int(held.sum()), len(options.query), len(history), min(history))
    return DecisionModel(mean.astype(np.float32), scale.astype(np.float32), layers, 1.0, history)


def fit_score_temperature(scores: np.ndarray, options: Options, target_slot: np.ndarray) -> float:
    """The temperature minimising the NLL of the true options, given each option's out-of-fold score (the nested
    decision models' scores: `calibrate.fit_temperature` over each query's padded scores); queries whose true option
    is not offered (target_slot -1) are left out."""
    keep = target_slot >= 0
    matrix, _ = padded(options, scores, PAD_SCORE)
    return fit_temperature(matrix[keep], target_slot[keep])
