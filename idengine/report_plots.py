"""Report rendering: the figures (matplotlib, Agg canvas, no pyplot state) and the HTML pieces they sit in.

Numbers in, a Figure, curve points or escaped markup out: nothing here reads a run directory (`report.py` does).
Every text that reaches the page passes through `html.escape`; every PNG is embedded as a data: URI.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


# --- HTML pieces ---

class Html(str):
    """Markup built here from escaped parts; table cells insert it as it is."""


def fmt(value: Any) -> str:
    """A number as a table shows it: integers plainly, other floats to 4 decimals, NaN as n/a."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return "n/a"
        if v.is_integer() and abs(v) >= 1:
            return str(int(v))
        if 0 < abs(v) < 1e-3:
            return f"{v:.3g}"  # learning rates: 0.0000 would hide them
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(value)


def cell(value: Any, tag: str = "td") -> str:
    """One escaped table cell; a number also carries its exact value in `data-value` (tests read it back)."""
    if isinstance(value, Html):
        return f"<{tag}>{value}</{tag}>"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return f'<{tag} class="num" data-value="{float(value)!r}">{html.escape(fmt(value))}</{tag}>'
    return f"<{tag}>{html.escape(fmt(value))}</{tag}>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str = "",
          last_is_summary: bool = False) -> Html:
    """An HTML table; the last row can be marked as a summary (mean +- sd) row."""
    head = f"<thead><tr>{''.join(cell(h, 'th') for h in header)}</tr></thead>" if any(header) else ""
    body = [f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows]
    if last_is_summary and body:
        body[-1] = body[-1].replace("<tr>", '<tr class="summary">', 1)
    attr = f' id="{html.escape(table_id)}"' if table_id else ""
    return Html(f"<table{attr}>{head}<tbody>{''.join(body)}</tbody></table>")


def mean_sd(stats: dict | None) -> Html:
    """`{"mean", "sd"}` as "m +- sd", with both exact values in data- attributes."""
    if not isinstance(stats, dict) or "mean" not in stats:
        return Html("")
    mean, sd = float(stats["mean"]), float(stats.get("sd", float("nan")))
    return Html(f'<span data-mean="{mean!r}" data-sd="{sd!r}">{fmt(mean)} &plusmn; {fmt(sd)}</span>')


def para(text: str) -> Html:
    """An escaped paragraph."""
    return Html(f"<p>{html.escape(text)}</p>")


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0;font-size:.9em;display:block;overflow-x:auto}"
       "th,td{border:1px solid #ccc;padding:.2em .5em}th{background:#eee}"
       "td.num{text-align:right;font-variant-numeric:tabular-nums}"
       "tr.summary{font-weight:bold;background:#f4f4ff;white-space:nowrap}img{max-width:100%}"
       "figcaption{font-size:.85em;color:#555}section{margin-top:2em}"
       "pre{background:#f6f6f6;padding:.5em;overflow:auto;font-size:.8em}")
"""Inline style: the page must work as one file, with no stylesheet to fetch."""


class Page:
    """The sections of one report and the PNGs they embed (written to files_dir as they are made)."""

    def __init__(self, files_dir: Path) -> None:
        self.files_dir = files_dir
        self.sections: list[tuple[str, str, str]] = []
        self.images: list[Path] = []

    def add(self, section_id: str, title: str, *parts: str) -> None:
        self.sections.append((section_id, title, "\n".join(p for p in parts if p)))

    def png(self, data: bytes, name: str, caption: str) -> Html:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        path = self.files_dir / f"{name}.png"
        path.write_bytes(data)
        self.images.append(path)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return Html(f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def figure(self, fig, name: str, caption: str) -> Html:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)  # the Agg canvas: PNGs without a display or pyplot's global state
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return self.png(buffer.getvalue(), name, caption)

    def render(self, title: str) -> str:
        nav = "".join(f'<li><a href="#{html.escape(i)}">{html.escape(t)}</a></li>' for i, t, _ in self.sections)
        body = "\n".join(f'<section id="{html.escape(i)}"><h2>{html.escape(t)}</h2>\n{content}\n</section>'
                         for i, t, content in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><nav><ol>{nav}</ol></nav>\n"
                f"{body}\n</body></html>\n")


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts/lists -> (dotted key, scalar) rows, so any JSON a step writes can be shown as a table."""
    if isinstance(obj, dict):
        return [row for k, v in obj.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return [(prefix, ", ".join(fmt(v) for v in obj) if len(obj) <= 12 else f"[{len(obj)} values]")]
        return [row for i, v in enumerate(obj[:20]) for row in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def before_after_pairs(obj: Any, where: str = "") -> list[tuple[str, dict, dict]]:
    """Every {"before": {...}, "after": {...}} pair in a JSON document, with the dotted key it sits under."""
    if not isinstance(obj, dict):
        return []
    here = [(where, obj["before"], obj["after"])] if isinstance(obj.get("before"), dict) and \
        isinstance(obj.get("after"), dict) else []
    return here + [x for k, v in obj.items() for x in before_after_pairs(v, f"{where}.{k}" if where else str(k))]


def details(summary: str, text: str) -> Html:
    """A collapsed block of preformatted text (a config file, a long list)."""
    return Html(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>")
