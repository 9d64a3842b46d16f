"""Report figures: matplotlib Figures (Agg canvas, no pyplot state) from numbers; the one home of every plot.

Numbers in, a Figure (or PNG bytes, or curve points) out: nothing here reads a run directory (`run.py` does). The
prepare step's class_sizes.png and the artifact's reliability.png are drawn here too.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MAX_PR_PAIRS = 2_000_000
"""(record, species) pairs scored exactly by the micro PR curve; past this each record keeps its top scores."""
MAX_CURVE_POINTS = 3000
"""Points drawn per PR curve."""
MAX_LEGEND = 12
"""Lines beyond this many get no legend entry (a legend of 50 trials hides the plot)."""


def _fig(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False).ravel()


def class_balance_figure(sizes: np.ndarray, buckets_before: Mapping[str, int],
                         buckets_after: Mapping[str, int]) -> Figure:
    """Records per species on log-log axes (species count per log-spaced size bin), and the size buckets."""
    fig, (left, mid, right) = _fig(3, width=4.3)
    sizes = np.asarray(sizes, dtype=float)
    if sizes.size:
        bins = np.unique(np.round(np.logspace(0, np.log10(sizes.max() + 1), 20)))
        left.hist(sizes, bins=bins, color="tab:blue", edgecolor="white")
        left.set(xscale="log", yscale="log")
        ranked = np.sort(sizes)[::-1]
        mid.plot(np.arange(1, ranked.size + 1), ranked, marker="." if ranked.size < 100 else None)
        mid.set(xscale="log", yscale="log")
    left.set(xlabel="records per species", ylabel="species", title="Records per species (kept)")
    mid.set(xlabel="species rank (largest first)", ylabel="records", title="Rank-size")
    x = np.arange(len(buckets_before))
    right.bar(x - 0.2, list(buckets_before.values()), width=0.4, label="before cleaning")
    right.bar(x + 0.2, [buckets_after.get(b, 0) for b in buckets_before], width=0.4, label="kept")
    right.set_xticks(x, list(buckets_before))
    right.set(xlabel="records per species", ylabel="species", title="Size buckets")
    right.legend()
    return fig


def length_figure(lengths_by_split: Mapping[str, np.ndarray]) -> Figure:
    """Length histogram of all kept records, and each split's length density (do the splits look alike?)."""
    fig, (left, right) = _fig(2, width=5.5)
    everything = np.concatenate([np.asarray(v) for v in lengths_by_split.values()]) if lengths_by_split else []
    if len(everything):
        bins = np.histogram_bin_edges(everything, bins=40)
        left.hist(everything, bins=bins, color="tab:blue", edgecolor="white")
        for name, values in lengths_by_split.items():
            label = name if name == "test" else f"fold {name}"
            right.hist(values, bins=bins, histtype="step", linewidth=1.2, density=True, label=label)
        right.legend(fontsize="small")
    left.set(xlabel="cleaned sequence length (bp)", ylabel="records", title="All kept records")
    right.set(xlabel="cleaned sequence length (bp)", ylabel="density", title="Per split")
    return fig


def fold_sizes_figure(records: Mapping[str, int], species: Mapping[str, int]) -> Figure:
    """Records and species per fold (and the test split)."""
    fig, (left, right) = _fig(2, width=4.5)
    names = list(records)
    left.bar(names, [records[n] for n in names], color="tab:blue")
    left.set(xlabel="fold", ylabel="records", title="Records per split")
    right.bar(names, [species.get(n, 0) for n in names], color="tab:green")
    right.set(xlabel="fold", ylabel="species present", title="Species per split")
    return fig


def learning_curves_figure(histories: Mapping[str, Sequence[Mapping]], monitor: str,
                           best_epochs: Mapping[str, int]) -> Figure:
    """Per fold: training loss per epoch, and validation (solid) vs training (dashed) monitor per epoch."""
    fig, (left, right) = _fig(2, width=5.5)
    for i, (fold, history) in enumerate(histories.items()):
        color = f"C{i % 10}"
        epochs = [h.get("epoch", j + 1) for j, h in enumerate(history)]
        loss = [h.get("loss", np.nan) for h in history]
        if np.isfinite(np.asarray(loss, dtype=float)).any():
            left.plot(epochs, loss, marker="o", color=color, label=f"fold {fold}")
        right.plot(epochs, [h.get(monitor, np.nan) for h in history], marker="o", color=color,
                   label=f"fold {fold} val")
        right.plot(epochs, [h.get(f"train_{monitor}", np.nan) for h in history], linestyle="--", color=color)
        best = best_epochs.get(fold)
        if best is not None and best in epochs:
            right.plot([best], [history[epochs.index(best)].get(monitor, np.nan)], marker="*", markersize=14,
                       color=color)
    left.set(xlabel="epoch", ylabel="training loss", title="Loss")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set(xlabel="epoch", ylabel=monitor, title=f"{monitor}: validation (solid), train (dashed), best (*)")
    for ax in (left, right):
        if ax.lines:
            ax.legend(fontsize="small")
    return fig


def gap_figure(folds: Sequence[str], train: Sequence[float], val: Sequence[float], metric: str) -> Figure:
    """Train and validation metric per fold side by side, and their gap (train - validation) with its mean."""
    fig, (left, right) = _fig(2, width=5)
    x = np.arange(len(folds))
    left.bar(x - 0.2, train, width=0.4, label="train", color="tab:orange")
    left.bar(x + 0.2, val, width=0.4, label="validation", color="tab:blue")
    left.set_xticks(x, [str(f) for f in folds])
    left.set(xlabel="fold", ylabel=metric, title=f"{metric}: train vs validation", ylim=(0, 1.05))
    left.legend(loc="lower right")
    gap = np.asarray(train, dtype=float) - np.asarray(val, dtype=float)
    right.bar(x, gap, color=["tab:red" if g > 0 else "tab:green" for g in gap])
    if np.isfinite(gap).any():
        right.axhline(np.nanmean(gap), color="black", linestyle="--", label=f"mean {np.nanmean(gap):.3f}")
        right.legend()
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_xticks(x, [str(f) for f in folds])
    right.set(xlabel="fold", ylabel=f"train - validation {metric}", title="Generalisation gap")
    return fig


def micro_pr_curve(y: np.ndarray, probs: np.ndarray, max_pairs: float = MAX_PR_PAIRS,
                   ) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Micro-averaged PR over (record, species) pairs; past max_pairs each record keeps its top scores only.

    Returns (precision, recall, average precision, truncated). Recall is over ALL records: a true species outside
    a record's kept scores is never retrieved, so truncation can only lower the curve's tail and the AP.
    """
    from sklearn.metrics import precision_recall_curve

    n, c = probs.shape
    m = c if n * c <= max_pairs else max(1, int(max_pairs // max(n, 1)))
    top = np.argpartition(-probs, m - 1, axis=1)[:, :m] if m < c else np.broadcast_to(np.arange(c), (n, c))
    truth = (top == y[:, None]).ravel()
    precision, recall, _ = precision_recall_curve(truth, np.take_along_axis(probs, top, axis=1).ravel())
    recall = recall * truth.sum() / max(n, 1)  # positives outside the kept top scores are never retrieved
    return precision, recall, float(-np.sum(np.diff(recall) * precision[:-1])), m < c


def pr_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], per_class_ap: np.ndarray,
              support: np.ndarray) -> Figure:
    """Micro-averaged PR curves (pooled + per fold), the per-class AP histogram, and AP against class support."""
    fig, (left, mid, right) = _fig(3, width=4.5)
    for i, (name, (precision, recall, ap)) in enumerate(curves.items()):
        pooled = i == 0
        keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), MAX_CURVE_POINTS)).astype(int))
        precision, recall = precision[keep], recall[keep]  # millions of thresholds draw slowly and look the same
        left.plot(recall, precision, color="black" if pooled else f"C{i % 10}", linewidth=2 if pooled else 0.8,
                  label=f"{name} (AP {ap:.3f})", drawstyle="steps-post")
    left.set(xlabel="recall", ylabel="precision", title="Micro-averaged PR", xlim=(0, 1), ylim=(0, 1.02))
    left.legend(fontsize="small", loc="best")
    if per_class_ap.size:
        mid.hist(per_class_ap, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
        mid.axvline(per_class_ap.mean(), color="black", linestyle="--", label=f"macro {per_class_ap.mean():.3f}")
        mid.legend()
        right.scatter(support, per_class_ap, s=10, alpha=0.6)
        right.set_xscale("log")
    mid.set(xlabel="average precision", ylabel="species", title="Per-species AP")
    right.set(xlabel="out-of-fold records of the species", ylabel="average precision", title="AP vs support",
              ylim=(-0.02, 1.02))
    return fig


def reliability_figure(bins: Mapping[str, np.ndarray], ece: float, n: int, title: str) -> Figure:
    """Accuracy against top-label confidence per bin (with the diagonal), and how many records fall in each bin."""
    fig = Figure(figsize=(5.5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    used = np.asarray(bins["count"]) > 0
    top.bar(edges[:-1][used], np.asarray(bins["accuracy"])[used], width=width[used], align="edge",
            edgecolor="black", color="tab:blue", alpha=0.7, label="accuracy")
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    top.plot(np.asarray(bins["confidence"])[used], np.asarray(bins["accuracy"])[used], "o", color="tab:red",
             label="mean confidence")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title} (ECE {ece:.3f}, n={n})")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(edges[:-1], bins["count"], width=width, align="edge", color="grey", edgecolor="black")
    bottom.set(xlabel="top-label confidence", ylabel="records", yscale="log" if used.any() else "linear")
    return fig


def trial_params_figure(values: Mapping[str, Sequence], scores: Sequence[float], complete: Sequence[bool],
                        metric: str) -> Figure:
    """One scatter per searched parameter: the trial's mean metric against its value (hollow: stopped early)."""
    names = list(values) or ["(no searched parameters)"]
    fig, axes = _fig(len(names), width=4.2)
    scores = np.asarray(scores, dtype=float)
    done = np.asarray(complete, dtype=bool)
    for ax, name in zip(axes, names):
        raw = list(values.get(name, []))
        x = np.asarray(raw, dtype=float) if raw and all(_is_number(v) for v in raw) else None
        if x is None:
            cats = sorted({str(v) for v in raw})
            x = np.asarray([cats.index(str(v)) for v in raw], dtype=float) if raw else np.zeros(0)
            ax.set_xticks(range(len(cats)), cats)
        elif x.size and x.min() > 0 and x.max() / x.min() >= 20:
            ax.set_xscale("log")
        if x.size:
            ax.scatter(x[done], scores[done], color="tab:blue", label="complete")
            ax.scatter(x[~done], scores[~done], facecolors="none", edgecolors="tab:red", label="stopped early")
        ax.set(xlabel=name, ylabel=metric)
    if scores.size:
        axes[0].legend(fontsize="small")
    return fig


def trial_folds_figure(per_trial: Mapping[str, Mapping[str, float]], metric: str) -> Figure:
    """The metric of each fold for each trial (a line per trial): shows how much a ranking rests on one fold."""
    fig, (ax,) = _fig(1, width=8)
    folds = sorted({f for scores in per_trial.values() for f in scores}, key=lambda f: (len(f), f))
    for i, (trial, scores) in enumerate(per_trial.items()):
        y = [scores.get(f, np.nan) for f in folds]
        ax.plot(range(len(folds)), y, marker="o", alpha=0.8, label=trial if i < MAX_LEGEND else None)
    ax.set_xticks(range(len(folds)), folds)
    ax.set(xlabel="fold", ylabel=metric, title=f"{metric} per fold and trial")
    if per_trial:
        ax.legend(fontsize="small", title="trial (ranked)", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """A Figure rendered to PNG bytes on the Agg canvas (no display, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a Figure as a PNG file (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig, dpi))
    return path


def reliability_comparison_figure(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                                  ece_before: float, ece_after: float, n: int) -> Figure:
    """Top-label confidence against accuracy per bin, before and after calibration, with the diagonal."""
    fig, (ax,) = _fig(1, width=5, height=5)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, bins, ece, marker in (("before", before, ece_before, "o"), ("after", after, ece_after, "s")):
        used = np.asarray(bins["count"]) > 0
        ax.plot(np.asarray(bins["confidence"])[used], np.asarray(bins["accuracy"])[used], marker=marker,
                label=f"{name} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-label confidence", ylabel="accuracy",
           title=f"Reliability ({len(before['count'])} bins, n={n})")
    ax.legend(loc="upper left")
    return fig
