"""Peers of the benchmark: BLAST+ megablast and VSEARCH (global top hit, SINTAX) on idengine's prepared folds.

Each fold's training records are the reference and a seeded sample of its validation records the queries; the open
set queries a sample of the set-aside rare species against every closed-set record. Calls are scored with the
same definitions as idengine's metrics where a tool gives them (top-1, macro F1, top-5 from ranked hits, ECE of
SINTAX's bootstrap confidence). Tools that are not installed give a row that says "skipped".
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

log = logging.getLogger("bench.peers")

PEERS = ("vsearch", "blast", "sintax")
BINARIES = {"vsearch": ("vsearch",), "blast": ("makeblastdb", "blastn"), "sintax": ("vsearch",)}
LABELS = {"vsearch": "usearch_global top hit, id 0.97", "blast": "megablast top hit, 97% identity",
          "sintax": "SINTAX, cutoff 0.8"}
IDENTITY = 0.97
SINTAX_CUTOFF = 0.8
MAX_HITS = 20
"""Hits kept per query (ranked by identity / bit score), enough for 5 distinct species in top-5."""
ECE_BINS = 15
NOTES = [
    "Peers: each fold's training records are the reference; queries are a seeded sample of the validation fold "
    "(same sample for every peer). A query without a hit at the cutoff counts as wrong; macro F1 averages over "
    "the species present or predicted (the no-call is not a species); on a sample of a few hundred queries most "
    "species have 0-1 queries, so a peer's macro F1 is not comparable with one computed on whole folds. Top-5 = the true species among the first "
    "5 distinct species of the ranked hits. SINTAX: top-1 is its top species whatever its confidence, ECE is of "
    "that bootstrap confidence; open set = species confidence >= 0.8. BLAST/VSEARCH: open set = any hit >= 97%.",
    "Open set for idengine models: temperature-calibrated on out-of-fold logits, species call when p >= the "
    "lowest threshold with OOF precision 0.95 (as `idengine train`); k-mer baselines and the probe are refitted "
    "on every closed-set record, the transformer is each fold's best checkpoint (mean over the 5 fold models).",
    "Peak MiB: peak RSS of the process that did the work (the tool, or the model's child process).",
]


def missing_binaries(peer: str) -> list[str]:
    """Binaries the peer needs that are not on PATH."""
    return [b for b in BINARIES[peer] if shutil.which(b) is None]


def tool_version(peer: str) -> str:
    """First line of the tool's version output, e.g. `vsearch v2.22.1_linux_x86_64`."""
    cmd = ["vsearch", "--version"] if peer in ("vsearch", "sintax") else ["blastn", "-version"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    match = re.search(r"vsearch v[0-9.]+|blastn: [0-9.+]+", out.stdout + out.stderr)
    return match.group(0).replace("blastn: ", "BLAST+ ") if match else cmd[0]


def _run(cmd: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, peak RSS MiB of it) via os.wait4. Raises RuntimeError when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {stderr.decode()[-500:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def _taxon(name: str) -> str:
    """A species name SINTAX can carry in its tax= field (no , ; : or spaces)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def write_fasta(path: Path, prefix: str, table: pd.DataFrame, with_tax: bool = False) -> None:
    """FASTA with headers prefix+row number (safe for every tool), plus SINTAX tax= when asked."""
    with open(path, "w") as handle:
        for i, (species, genus, seq) in enumerate(zip(table["species"], table["_genus"], table["sequence"])):
            tax = f";tax=g:{_taxon(genus)},s:{_taxon(species)};" if with_tax else ""
            handle.write(f">{prefix}{i}{tax}\n{seq}\n")


def search(peer: str, ref: pd.DataFrame, queries: pd.DataFrame, work: Path, threads: int, seed: int) -> dict:
    """Run one tool; returns hits (query row, target row, score, [conf, called]) and timings."""
    work.mkdir(parents=True, exist_ok=True)
    ref_fa, q_fa, out = work / "ref.fa", work / "queries.fa", work / "hits.tsv"
    write_fasta(ref_fa, "r", ref, with_tax=peer == "sintax")
    write_fasta(q_fa, "q", queries)
    index_s, peak = 0.0, 0.0
    if peer == "vsearch":
        cmd = ["vsearch", "--usearch_global", str(q_fa), "--db", str(ref_fa), "--id", str(IDENTITY),
               "--maxaccepts", str(MAX_HITS), "--userout", str(out), "--userfields", "query+target+id",
               "--threads", str(threads), "--quiet"]
    elif peer == "blast":
        index_s, peak = _run(["makeblastdb", "-in", str(ref_fa), "-dbtype", "nucl", "-out", str(work / "db")])
        cmd = ["blastn", "-task", "megablast", "-query", str(q_fa), "-db", str(work / "db"), "-perc_identity",
               str(IDENTITY * 100), "-max_target_seqs", str(MAX_HITS), "-outfmt", "6 qseqid sseqid bitscore",
               "-num_threads", str(threads), "-out", str(out)]
    else:
        cmd = ["vsearch", "--sintax", str(q_fa), "--db", str(ref_fa), "--tabbedout", str(out), "--sintax_cutoff",
               str(SINTAX_CUTOFF), "--randseed", str(seed + 1), "--threads", str(threads), "--quiet"]
    search_s, search_peak = _run(cmd)
    hits = read_sintax(out, ref) if peer == "sintax" else read_hits(out)
    return {"hits": hits, "index_s": index_s, "search_s": search_s, "peak_mib": max(peak, search_peak)}


def read_hits(path: Path) -> pd.DataFrame:
    """Tabular hits -> (query, target, score) with query/target as row numbers."""
    hits = pd.read_csv(path, sep="\t", header=None, names=["query", "target", "score"], dtype={0: str, 1: str})
    return hits.assign(query=hits["query"].str[1:].astype(int), target=hits["target"].str[1:].astype(int))


def read_sintax(path: Path, ref: pd.DataFrame) -> pd.DataFrame:
    """SINTAX tabbedout -> (query, taxon, conf, called): its top species and bootstrap confidence."""
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        match = re.search(r"s:([^,(]+)\(([0-9.]+)\)", parts[1]) if len(parts) > 1 else None
        if match:
            rows.append((int(parts[0][1:]), match.group(1), float(match.group(2)),
                         len(parts) > 3 and "s:" in parts[3]))
    return pd.DataFrame(rows, columns=["query", "taxon", "conf", "called"])


def ranked_labels(peer: str, hits: pd.DataFrame, ref: pd.DataFrame, n_queries: int, label_of: dict) -> list:
    """Per query, the distinct labels of its hits, best first (SINTAX: its one top species)."""
    ranked: list[list[int]] = [[] for _ in range(n_queries)]
    if peer == "sintax":
        for q, taxon in zip(hits["query"], hits["taxon"]):
            ranked[q] = [label_of.get(taxon, -2)]
        return ranked
    hits = hits.assign(order=np.arange(len(hits))).sort_values(["query", "score", "order"],
                                                               ascending=[True, False, True])
    labels = ref["label"].to_numpy()[hits["target"].to_numpy()]
    for q, label in zip(hits["query"], labels):
        if label not in ranked[q]:
            ranked[q].append(int(label))
    return ranked


def top_label_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of a top-label confidence, the same right-closed equal-width bins as idengine.metrics."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    right_sum = np.bincount(idx, weights=correct.astype(float), minlength=n_bins)
    used = count > 0
    return float(np.abs(right_sum[used] - conf_sum[used]).sum() / max(count.sum(), 1))


def score_fold(peer: str, y: np.ndarray, ranked: list, hits: pd.DataFrame) -> dict:
    """top1_acc, f1_macro, top5_acc (ranked hits) or ece (SINTAX) of one fold's queries."""
    pred = np.array([r[0] if r else -1 for r in ranked])
    present = sorted((set(y.tolist()) | set(pred.tolist())) - {-1, -2})
    out = {"top1_acc": float(np.mean(pred == y)),
           "f1_macro": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
           "n": float(y.size)}
    if peer == "sintax":
        conf = np.zeros(y.size)
        conf[hits["query"].to_numpy()] = hits["conf"].to_numpy()
        out["ece"] = top_label_ece(conf, pred == y)
    else:
        out["top5_acc"] = float(np.mean([label in r[:5] for label, r in zip(y, ranked)]))
    return out


def sample_rows(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of n rows (all rows when n is 0 or larger than the table), in their original order."""
    if n <= 0 or n >= len(table):
        return table.reset_index(drop=True)
    return table.sample(n=n, random_state=seed).sort_index().reset_index(drop=True)


def run_peer(peer: str, records: pd.DataFrame, unknown: pd.DataFrame, work: Path, per_fold: int, threads: int,
             seed: int, open_queries: int | None) -> dict:
    """Every fold (reference = training folds, queries = a validation sample), then the open set."""
    from idengine.evaluate.metrics import summarise_folds

    label_of = {_taxon(s): int(lab) for s, lab in zip(records["species"], records["label"])}
    per, index_s, n_q, search_s, peak = [], [], 0, 0.0, 0.0
    for fold in sorted(records["fold"].unique(), key=int):
        ref = records[records["fold"] != fold].reset_index(drop=True)
        queries = sample_rows(records[records["fold"] == fold], per_fold, seed)
        run = search(peer, ref, queries, work / peer / f"fold{fold}", threads, seed)
        ranked = ranked_labels(peer, run["hits"], ref, len(queries), label_of)
        per.append(score_fold(peer, queries["label"].to_numpy(), ranked, run["hits"]))
        index_s.append(run["index_s"])
        n_q, search_s, peak = n_q + len(queries), search_s + run["search_s"], max(peak, run["peak_mib"])
        log.info("%s fold %s: top1 %.3f on %d queries, %.0f s", peer, fold, per[-1]["top1_acc"], len(queries),
                 run["search_s"])
    row = {"name": peer, "label": f"{tool_version(peer)}, {LABELS[peer]}", "kind": "peer", "status": "ok",
           "metrics": summarise_folds(per), "folds": per, "classify_seqs_per_s": round(n_q / search_s, 1),
           "peak_mib": round(peak, 1), "queries_per_fold": per_fold or "all",
           "train_s_per_fold": summarise_folds([{"v": s} for s in index_s])["v"] if peer == "blast" else None,
           "note": f"{per_fold or 'all'} queries per fold" + ("; train s = makeblastdb" if peer == "blast" else
                                                              "; no index step (train s not applicable)")}
    if open_queries is not None and len(unknown):
        queries = sample_rows(unknown, open_queries, seed)
        run = search(peer, records.reset_index(drop=True), queries, work / peer / "open", threads, seed)
        hits = run["hits"]
        called = hits.loc[hits["called"], "query"].nunique() if peer == "sintax" else hits["query"].nunique()
        row["open_set"] = {"n": len(queries), "overclassified": called / len(queries),
                           "cutoff": LABELS[peer].split(", ")[-1]}
    return row


def _read_tables(prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    from idengine.data.prepared import read_prepared, read_unknown

    records, _ = read_prepared(prepared)
    unknown = read_unknown(prepared)
    for table in (records, unknown):
        table["_genus"] = table["genus"].fillna("NA").replace("", "NA") if "genus" in table else "NA"
    return records, unknown


def run_peers(names: list[str], prepared: Path, work: Path, per_fold: int, threads: int, seed: int,
              open_queries: int | None = 0) -> list[dict]:
    """One row per peer asked for: measured, or status `skipped` with the missing binaries named.

    Args:
        names: peers to run (subset of PEERS), in order.
        prepared: idengine prepared directory (records with folds, unknown.parquet).
        work: scratch directory for FASTA files, databases and hits.
        per_fold: validation queries sampled per fold (0: all).
        threads: threads of each tool.
        seed: sampling seed (and SINTAX's random seed + 1).
        open_queries: open-set queries sampled from unknown.parquet (0: all; None: no open set).

    Returns:
        One row dict per peer (status ok or skipped).
    """
    rows, tables = [], None
    for peer in names:
        missing = missing_binaries(peer)
        if missing:
            log.warning("%s skipped: %s not installed", peer, ", ".join(missing))
            rows.append({"name": peer, "label": LABELS[peer], "kind": "peer", "status": "skipped",
                         "note": f"skipped: {', '.join(missing)} not installed (Debian: apt-get install "
                                 f"{'ncbi-blast+' if peer == 'blast' else 'vsearch'})"})
            continue
        tables = tables or _read_tables(prepared)
        start = time.time()
        rows.append(run_peer(peer, *tables, work, per_fold, threads, seed, open_queries))
        rows[-1]["wall_s"] = round(time.time() - start, 1)
    return rows


REFERENCE_TOOLS = {"vsearch": "usearch_global", "blast": "BLAST+", "sintax": "SINTAX"}
"""A PEERS.md row whose tool cell holds this text is the published number of that peer."""
_REFERENCE_KEYS = {"top-1": "top1_acc", "macro F1": "f1_macro", "top-5": "top5_acc", "macro PR-AUC": "pr_auc_macro",
                   "log loss": "log_loss", "ECE": "ece"}


def _number(text: str) -> float | None:
    match = re.match(r"\s*([0-9.]+)", text)
    return float(match.group(1)) if match else None


def reference_rows(peers_md: Path, rerun: set[str]) -> list[dict]:
    """PEERS.md's published table as rows marked "PEERS.md, not rerun", except the peers measured here."""
    if not peers_md.exists():
        return []
    lines = [line for line in peers_md.read_text().splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return []
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        tool = cells[0]
        if any(key in tool for peer, key in REFERENCE_TOOLS.items() if peer in rerun):
            continue
        values = dict(zip(header, cells))
        metrics = {key: {"mean": v, "sd": None} for name, key in _REFERENCE_KEYS.items()
                   if (v := _number(values.get(name, ""))) is not None}
        over = next((_number(v) for k, v in values.items() if "overclassified" in k), None)
        speed = _number(values.get("classify seqs/s", ""))
        rows.append({"name": tool, "label": "PEERS.md, not rerun", "kind": "reference", "status": "ok",
                     "metrics": metrics, "open_set": {"overclassified": over} if over is not None else {},
                     "classify_seqs_per_s": speed, "reference_only": True})
    return rows
