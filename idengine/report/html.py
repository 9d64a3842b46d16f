"""Report HTML: escaped pieces (tables, paragraphs, collapsed blocks) and the Page that holds sections and PNGs.

Every text that reaches the page passes through `html.escape`; every PNG is embedded as a data: URI and also
written beside the page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


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
        from idengine.report.plots import png_bytes

        return self.png(png_bytes(fig), name, caption)

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
