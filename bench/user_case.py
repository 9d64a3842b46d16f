"""A user's case (issue #12 parts 5-6): a small reference of common and rare species, queried with records it never saw.

1. data      from ../shared/data/12s-fish (fixed seed): 40 common species x 10 records + 90 rare species x 1-2
             records = 537 reference records (sequences.fasta + labels.csv, the README's input format), and 720 queries
             whose sequences are in no reference record, 180 of each kind: known common, known rare, a novel species of
             a genus in the reference, a novel genus (from a family in the reference where there is one).
2. idengine  the README's commands, default settings of jobs/configs/tiny-cpu.yaml except the data paths (and Ray
             Train storage inside the work dir, so a rerun never resumes an older run): prepare -> cv -> train ->
             predict on the queries (calls.csv). Each command is timed; predict's CPU is its whole process tree's.
3. VSEARCH   bench/peers.py's invocation (`--usearch_global --id 0.97 --maxaccepts 20`, 2 threads), same reference
             and queries, and again with `--id 0` for the top hit without a threshold.
4. score     per kind: species named right, species-level calls, genus right, "novel" calls; throughput of
             `idengine predict` and VSEARCH in the same run; and, as a diagnostic, idengine's species calls at the
             threshold that over-classifies novel species as often as VSEARCH does (how the evidence ranks).
             -> bench/results/user_case.{json,md}, bench/README.md.
`--small` (6 + 10 species, 12 queries per kind, 1 epoch, results in --work) is a smoke test of the same path;
`--from-step train` (or cv, predict) keeps the work dir and reruns from that step (earlier steps' times are kept).
`--kind kmer-linear` (or kmer-nb, probe) runs the same case with that classifier (`model.kind` overridden) ->
results/user_case_<kind>.{json,md} and its own bench/README section; the default is the README's tiny transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

import peers  # noqa: E402
from idengine.data.fasta import iter_fasta  # noqa: E402

SEED = 12
CONFIG = REPO / "jobs" / "configs" / "tiny-cpu.yaml"
RANK_COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus")
KINDS = (("known_common", "known common species"), ("known_rare", "known rare species"),
         ("novel_species", "novel species of a known genus"), ("novel_genus", "novel genus"))
FULL, SMALL = ({"common": 40, "common_records": 10, "rare": 90, "rare_two": 47, "per_kind": 180},
               {"common": 6, "common_records": 10, "rare": 10, "rare_two": 5, "per_kind": 12})
THREADS = 2


def load_source(data_dir: Path) -> pd.DataFrame:
    """Every record of the source set: id, species, the ranks, sequence (in file order)."""
    labels = pd.read_csv(data_dir / "labels.csv", dtype=str, keep_default_na=False)
    seqs = {r.id: r.sequence for r in iter_fasta(data_dir / "sequences.fasta.gz") if not r.problem}
    return labels.assign(sequence=labels["id"].map(seqs)).dropna(subset=["sequence"]).reset_index(drop=True)


def round_robin(frame: pd.DataFrame, key: str, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n rows taken one per `key` group per round (groups and rows in seeded random order): spread, not clumped."""
    shuffled = frame.sample(frac=1.0, random_state=int(rng.integers(2**31)))
    turn = pd.Series(rng.permutation(shuffled[key].nunique()), index=shuffled[key].unique())
    order = shuffled.assign(_round=shuffled.groupby(key).cumcount(), _turn=shuffled[key].map(turn))
    return order.sort_values(["_round", "_turn"]).head(n).drop(columns=["_round", "_turn"])


def choose_species(src: pd.DataFrame, sizes: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Common species (enough distinct sequences for 10 references + queries) and rare ones (>= 4 distinct: 1-2
    references + 2 queries), all from genera with another species; half the rare ones share a common one's genus."""
    sp = src.groupby("species").agg(distinct=("sequence", "nunique"), genus=("genus", "first"))
    sp["genus_species"] = sp["genus"].map(sp.groupby("genus").size())
    sp = sp[sp["genus_species"] >= 2].sort_index()
    common_pool = sp.index[sp["distinct"] >= sizes["common_records"] + 5]
    common = sorted(rng.choice(common_pool, sizes["common"], replace=False))
    rare_pool = sp[(sp["distinct"] >= 4) & ~sp.index.isin(common)]
    near = rare_pool.index[rare_pool["genus"].isin(sp.loc[common, "genus"])]
    near = list(rng.choice(near, min(len(near), sizes["rare"] // 2), replace=False))
    rare = near + list(rng.choice(rare_pool.index.difference(near), sizes["rare"] - len(near), replace=False))
    return common, sorted(rare)


def build_case(src: pd.DataFrame, sizes: dict, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference records, queries with `kind`): see the module docstring."""
    rng = np.random.default_rng(seed)
    common, rare = choose_species(src, sizes, rng)
    distinct = src.drop_duplicates("sequence")
    two = set(rng.choice(rare, sizes["rare_two"], replace=False))
    counts = {**{s: sizes["common_records"] for s in common}, **{s: 2 if s in two else 1 for s in rare}}
    parts = [distinct[distinct["species"] == s].sample(k, random_state=int(rng.integers(2**31)))
             for s, k in counts.items()]
    ref = pd.concat(parts).sort_values("id").reset_index(drop=True)
    genera, families, n = set(ref["genus"]), set(ref["family"]) - {""}, sizes["per_kind"]
    # A query never repeats a reference sequence (of any species), nor another query's.
    pool = distinct[~distinct["sequence"].isin(set(ref["sequence"]))]
    novel_genus = pool[~pool["genus"].isin(genera)]
    if novel_genus["family"].isin(families).sum() >= n:
        novel_genus = novel_genus[novel_genus["family"].isin(families)]
    queries = pd.concat([
        round_robin(pool[pool["species"].isin(common)], "species", n, rng).assign(kind="known_common"),
        round_robin(pool[pool["species"].isin(rare)], "species", n, rng).assign(kind="known_rare"),
        round_robin(pool[pool["genus"].isin(genera) & ~pool["species"].isin(counts)], "species", n, rng)
        .assign(kind="novel_species"),
        round_robin(novel_genus, "genus", n, rng).assign(kind="novel_genus")])
    return ref, queries.reset_index(drop=True)


def write_case(ref: pd.DataFrame, queries: pd.DataFrame, data_dir: Path) -> None:
    """The reference as idengine's input (sequences.fasta + labels.csv); queries.fasta and their truth."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, table in (("sequences.fasta", ref), ("queries.fasta", queries)):
        (data_dir / name).write_text("".join(f">{i}\n{s}\n" for i, s in zip(table["id"], table["sequence"])))
    ref[["id", "species", *RANK_COLUMNS]].to_csv(data_dir / "labels.csv", index=False)
    queries[["id", "kind", "species", *RANK_COLUMNS]].to_csv(data_dir / "queries_truth.csv", index=False)


def _proc_cpu() -> tuple[dict[int, int], dict[int, float]]:
    """(parent pid, own user+system CPU seconds) of every process, from /proc."""
    tick, parent, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    for pid in (int(e) for e in os.listdir("/proc") if e.isdigit()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    return parent, cpu


def run_timed(cmd: list[str], log_path: Path) -> dict:
    """Run a command (output to log_path); wall seconds and the CPU seconds of its whole process tree (Ray's
    daemons and actors included), sampled from /proc every 0.1 s: a lower bound by at most 0.1 s per process."""
    seen: dict[int, float] = {}
    with open(log_path, "w") as log_file:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        while proc.poll() is None:
            parent, cpu = _proc_cpu()
            tree, size = {proc.pid}, 0
            while len(tree) != size:  # descendants at any depth (Ray's workers are the raylet's children)
                size, tree = len(tree), tree | {pid for pid, up in parent.items() if up in tree}
            seen.update({pid: max(seen.get(pid, 0.0), cpu[pid]) for pid in tree & cpu.keys()})
            time.sleep(0.1)
        wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log_path}:\n"
                           f"{log_path.read_text()[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(sum(seen.values()), 2), "processes": len(seen)}


def run_idengine(data_dir: Path, work: Path, extra: list[str], first: str = "prepare") -> dict:
    """prepare -> cv -> train -> predict as the README gives them; each step's time and log, and what was exported."""
    exe, conf = str(Path(sys.executable).with_name("idengine")), ["--config", str(CONFIG)]
    over = [f"data.sequences={data_dir / 'sequences.fasta'}", f"data.labels={data_dir / 'labels.csv'}",
            f"train.storage_path={work / 'ray'}", *extra]
    prepared, cv, model = (str(work / d) for d in ("prepared", "cv", "model"))
    steps = {"prepare": [exe, "prepare", *conf, "--out", prepared, *over],
             "cv": [exe, "cv", *conf, "--prepared", prepared, "--out", cv, *over],
             "train": [exe, "train", *conf, "--prepared", prepared, "--cv", cv, "--out", model, *over],
             "predict": [exe, "predict", "--model", model, "--sequences", str(data_dir / "queries.fasta"),
                         "--out", str(work / "calls.csv")]}
    (work / "logs").mkdir(parents=True, exist_ok=True)
    done = work / "logs" / "steps.json"
    out: dict = {"steps": json.loads(done.read_text()) if first != "prepare" else {}, "first_step": first}
    for name, cmd in list(steps.items())[list(steps).index(first):]:
        print(f"[user_case] idengine {name} ...", flush=True)
        out["steps"][name] = {"command": " ".join(["idengine", *cmd[1:]]).replace(str(REPO) + "/", ""),
                              **run_timed(cmd, work / "logs" / f"{name}.log")}
        done.write_text(json.dumps(out["steps"], indent=1))
        print(f"[user_case]   {out['steps'][name]['wall_s']:.0f} s", flush=True)
    match = re.search(r"predict: \d+ records called.* in ([0-9.]+) s", (work / "logs" / "predict.log").read_text())
    out["steps"]["predict"]["in_process_s"] = float(match.group(1)) if match else None
    report = json.loads((work / "prepared" / "prepare_report.json").read_text())
    out["prepared"] = {k: report.get(k) for k in ("kept", "set_aside_rare_species", "species_after",
                                                  "species_set_aside", "warnings")}
    meta, engine = json.loads((work / "model" / "idengine.json").read_text()), work / "model" / "engine"
    out["artifact"] = {"kind": meta.get("kind"), "classes": meta.get("num_labels"), "engine": engine.is_dir(),
                       "index_records": len(pd.read_parquet(engine / "reference.parquet")) if engine.is_dir() else 0,
                       "thresholds": json.loads((engine / "engine.json").read_text()).get("thresholds")
                       if (engine / "engine.json").is_file() else None}
    return out


def run_vsearch(ref: pd.DataFrame, queries: pd.DataFrame, work: Path, identity: float) -> dict:
    """bench/peers.py's VSEARCH search (its command, only `--id` set here); best hit per query (row numbers) and
    wall / CPU seconds of the vsearch process."""
    ref, queries = ref.assign(_genus=ref["genus"]), queries.assign(_genus=queries["genus"])
    saved, peers.IDENTITY = peers.IDENTITY, identity
    try:  # `vsearch` is reaped by peers._run (os.wait4), so its CPU time lands in RUSAGE_CHILDREN
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = peers.search("vsearch", ref, queries, work, THREADS, SEED)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        peers.IDENTITY = saved
    hits = run["hits"].assign(order=lambda h: np.arange(len(h)))  # ties: VSEARCH's own order
    best = hits.sort_values(["query", "score", "order"], ascending=[True, False, True]).drop_duplicates("query")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"target": pd.Series(best["target"].to_numpy(), best["query"].to_numpy()).reindex(range(len(queries))),
            "identity": identity, "wall_s": round(run["search_s"], 3), "cpu_s": round(cpu, 3),
            "peak_mib": run["peak_mib"]}


def vsearch_calls(ref: pd.DataFrame, run: dict) -> pd.DataFrame:
    """Per query: the best hit's species and genus (None without a hit)."""
    has, rows = run["target"].notna().to_numpy(), run["target"].fillna(0).astype(int).to_numpy()
    out = pd.DataFrame({c: np.where(has, ref[c].to_numpy()[rows], None) for c in ("species", "genus")})
    return out.assign(call=out["species"], call_rank=np.where(has, "species", "unassigned"))


def idengine_calls(calls_csv: Path, queries: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """calls.csv aligned to the queries: call_rank, the called species (species calls) and genus (species or genus
    calls), the genus of the most probable species, and the most probable genus (`top_genus`), whatever their
    probability."""
    calls = pd.read_csv(calls_csv, dtype={"call": str, "call_rank": str, "top1_species": str})
    calls = calls.set_index("id").reindex(queries["id"])
    genus_of = dict(zip(ref["species"], ref["genus"]))
    rank, call = calls["call_rank"].fillna("missing").to_numpy(), calls["call"].to_numpy()
    species = np.where(rank == "species", call, None)
    genus = np.where(rank == "species", pd.Series(call).map(genus_of), np.where(rank == "genus", call, None))
    return pd.DataFrame({"call_rank": rank, "call": call, "species": species, "genus": genus,
                         "top_genus": calls["top1_species"].map(genus_of).to_numpy(),
                         "best_genus": calls["top_genus"].to_numpy() if "top_genus" in calls else None,
                         "p_novel_species": calls.get("p_novel_species", pd.Series(np.nan, calls.index)).to_numpy(),
                         "top1_species": calls["top1_species"].to_numpy(),
                         "top1_prob": calls["top1_prob"].to_numpy(dtype=float)})


def _share(mask: np.ndarray) -> float:
    return round(float(np.mean(mask)), 4) if len(mask) else float("nan")


def score_kind(truth: pd.DataFrame, ide: pd.DataFrame, v97: pd.DataFrame, vtop: pd.DataFrame) -> dict:
    """One kind's numbers for idengine, VSEARCH >= 97% and VSEARCH's top hit (no threshold)."""
    sp, ge, records = truth["species"].to_numpy(), truth["genus"].to_numpy(), truth.to_dict("records")
    out = {"n": int(len(truth))}
    for name, calls in (("idengine", ide), ("vsearch_97", v97), ("vsearch_top", vtop)):
        named, made = calls["species"].notna().to_numpy(), ~calls["call_rank"].isin(["unassigned", "missing"])
        # A call is right when it names the query's own taxon at the rank it calls ("novel": for a novel kind).
        right = [(r == "novel" and t["kind"].startswith("novel")) or (r != "novel" and c == t.get(r))
                 for r, c, t in zip(calls["call_rank"], calls["call"], records)]
        out[name] = {"species_call": _share(named),
                     "species_right": _share(named & (calls["species"].to_numpy() == sp)),
                     "genus_right": _share(calls["genus"].to_numpy() == ge),
                     "wrong_call": _share(made.to_numpy() & ~np.array(right, dtype=bool))}
    p_novel = ide["p_novel_species"]
    out["vsearch_top"]["best_genus_right"] = out["vsearch_top"]["genus_right"]  # a top hit is its best genus
    out["idengine"].update({"novel_call": _share(ide["call_rank"].to_numpy() == "novel"),
                            "best_genus_right": _share(ide["best_genus"].to_numpy() == ge),
                            "top_species_genus_right": _share(ide["top_genus"].to_numpy() == ge),
                            "mean_p_novel_species": round(float(p_novel.mean()), 4) if p_novel.notna().any() else None,
                            "call_ranks": {k: int(v) for k, v in ide["call_rank"].value_counts().items()}})
    return out


def at_vsearch_overclassification(queries: pd.DataFrame, ide: pd.DataFrame, scores: dict) -> dict:
    """A diagnostic, not a setting: idengine's species calls at the top-species probability threshold that calls as
    many novel species of a known genus at species level as VSEARCH >= 97% does, chosen on these queries. It asks
    whether the engine's probabilities rank queries better than VSEARCH's identity rule, whatever the threshold."""
    kind, prob = queries["kind"].to_numpy(), np.nan_to_num(ide["top1_prob"].to_numpy(dtype=float))
    share = scores["novel_species"]["vsearch_97"]["species_call"]
    novel = np.sort(prob[kind == "novel_species"])[::-1]
    threshold = float(novel[min(int(round(share * len(novel))), len(novel) - 1)]) if len(novel) else 1.0
    called = prob > threshold if share < 1 else prob >= threshold
    right = called & (ide["top1_species"].to_numpy() == queries["species"].to_numpy())
    out = {"threshold": round(threshold, 4)}
    for k, _ in KINDS:
        at = kind == k
        out[k] = {"species_right": _share(right[at]), "species_call": _share(called[at])}
    return out


def throughput(n: int, ide: dict, v97: dict) -> dict:
    """Queries per second (wall) and per CPU-second of `idengine predict` and VSEARCH (id 0.97) on the same queries."""
    pred = ide["steps"]["predict"]
    rows = {"idengine predict (the command: Python + Ray start, artifact load, calls)":
            {"wall_s": pred["wall_s"], "cpu_s": pred["cpu_s"]},
            "idengine predict (its own timer, after Ray start)": {"wall_s": pred.get("in_process_s")},
            f"VSEARCH usearch_global --id 0.97, {THREADS} threads": {"wall_s": v97["wall_s"], "cpu_s": v97["cpu_s"]}}
    for row in rows.values():
        row["q_per_s"] = round(n / row["wall_s"], 1) if row.get("wall_s") else None
        row["q_per_cpu_s"] = round(n / row["cpu_s"], 1) if row.get("cpu_s") else None
    return rows


def targets(scores: dict, speed: dict) -> list[dict]:
    """Issue #12 part 6's user's-case targets, met or missed, with the numbers."""
    ide_speed, _, vs_speed = speed.values()
    spec = (("species named right, known common > VSEARCH 97%", "known_common", "species_right", "vsearch_97"),
            ("species named right, known rare > VSEARCH 97%", "known_rare", "species_right", "vsearch_97"),
            ("most probable genus right, novel species of a known genus > VSEARCH top hit (both without a "
             "threshold)", "novel_species", "best_genus_right", "vsearch_top"))
    rows = [(what, scores[k]["idengine"][m], scores[k][peer][m], False) for what, k, m, peer in spec]
    rows.append(("classify queries/s (wall, end to end) >= VSEARCH", ide_speed["q_per_s"], vs_speed["q_per_s"], True))
    return [{"target": w, "idengine": a, "vsearch": b, "met": bool(a is not None and (a >= b if eq else a > b))}
            for w, a, b, eq in rows]


MEASURES = (  # (kinds, label, measure key)
    (("known_common", "known_rare"), "species named right", "species_right"),
    (("known_common", "known_rare"), "called at species level", "species_call"),
    (("known_common", "known_rare", "novel_species"), "genus right", "genus_right"),
    (("known_rare", "novel_species"), "most probable genus right (no threshold)", "best_genus_right"),
    (("novel_species", "novel_genus"), "species-level call (over-classification)", "species_call"),
    (("novel_species", "novel_genus"), 'called "novel"', "novel_call"),
    (tuple(k for k, _ in KINDS), "wrong call (at the rank it names)", "wrong_call"))


def render_table(result: dict) -> str:
    """The per-kind table and the throughput table, Markdown."""
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    lines = ["| queries | measure | idengine | VSEARCH >= 97% | VSEARCH top hit (no threshold) |",
             "|---|---|---|---|---|"]
    for kind, title in KINDS:
        s = result["scores"][kind]
        lines += [f"| {title} ({s['n']}) | {label} | {pct(s['idengine'][key])} | {pct(s['vsearch_97'].get(key))} | "
                  f"{pct(None if key == 'species_call' else s['vsearch_top'].get(key))} |"
                  for kinds, label, key in MEASURES if kind in kinds]
    lines += ["", "| classify, same run, same queries | wall s | queries/s | CPU s | queries per CPU-s |",
              "|---|---|---|---|---|"]
    for name, row in result["throughput"].items():
        lines.append(f"| {name} | " + " | ".join("–" if row.get(k) is None else f"{row[k]:g}"
                                                  for k in ("wall_s", "q_per_s", "cpu_s", "q_per_cpu_s")) + " |")
    return "\n".join(lines)


def render_matched(result: dict) -> list[str]:
    """The diagnostic of `at_vsearch_overclassification`, as a few lines (none in an older result)."""
    m = result.get("at_vsearch_overclassification")
    if not m:
        return []
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    s = result["scores"]
    return [f"A diagnostic, not a setting: at the top-species probability {m['threshold']:.3f}, chosen on these "
            "queries so that idengine calls as many novel species of a known genus at species level as VSEARCH >= 97% "
            f"does ({pct(m['novel_species']['species_call'])} against "
            f"{pct(s['novel_species']['vsearch_97']['species_call'])}), idengine would name "
            f"{pct(m['known_common']['species_right'])} of known common species right "
            f"(VSEARCH {pct(s['known_common']['vsearch_97']['species_right'])}) and "
            f"{pct(m['known_rare']['species_right'])} of known rare ones "
            f"(VSEARCH {pct(s['known_rare']['vsearch_97']['species_right'])}), and call "
            f"{pct(m['novel_genus']['species_call'])} of novel genera at species level "
            f"(VSEARCH {pct(s['novel_genus']['vsearch_97']['species_call'])}).", ""]


def render_md(result: dict) -> str:
    """bench/results/user_case.md."""
    case, ide, art = result["case"], result["idengine"], result["idengine"]["artifact"]
    ranks = "; ".join(f"{title}: " + ", ".join(f"{k} {v}" for k, v in result["scores"][kind]["idengine"]
                                                ["call_ranks"].items()) for kind, title in KINDS)
    return "\n".join([
        "# A user's case: idengine beside VSEARCH on a small reference (issue #12)", "",
        f"- Command: `{result['command']}` ({result['runtime_min']:.1f} min; idengine's four steps "
        f"{result['idengine_min']:.0f} min); {result['date']}; idengine "
        f"commit {result['commit']}; {result['machine']}",
        f"- Reference (seed {case['seed']}, from ../shared/data/12s-fish): {case['reference_records']} records, "
        f"{case['reference_species']} species ({case['common_species']} common x {case['common_records']}, "
        f"{case['rare_species']} rare x 1-2), {case['reference_genera']} genera. Queries: {case['queries']} records "
        "the reference never saw (none repeats a reference sequence or another query).",
        "- idengine: " + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in ide["steps"].items())
        + f" (`jobs/configs/tiny-cpu.yaml`; only data paths and `train.storage_path` overridden{result['extra']}). "
        f"prepare kept {ide['prepared']['kept']} records of {ide['prepared']['species_after']} species as classes and "
        f"set aside {ide['prepared']['set_aside_rare_species']} of {ide['prepared']['species_set_aside']} rare "
        f"species; artifact: {art['kind']} classifier over {art['classes']} classes, engine "
        f"{'with a reference index of ' + str(art['index_records']) + ' records' if art['engine'] else 'absent'}.",
        f"- VSEARCH: {result['vsearch_version']}, bench/peers.py's `--usearch_global --maxaccepts 20`, "
        f"{THREADS} threads.", "", render_table(result), "", *render_matched(result), "Targets (issue #12 part 6):",
        *(f"- {'met' if t['met'] else '**missed**'}: {t['target']} (idengine {t['idengine']}, VSEARCH "
          f"{t['vsearch']})" for t in result["targets"]), "", f"idengine's calls by rank: {ranks}.", "",
        "Species named right = a species-level call naming the true species (VSEARCH: its best hit >= 97%). Genus "
        "right = the call names the true genus (idengine: a species call's genus or a genus call; VSEARCH: the best "
        "hit's genus). Most probable genus: idengine's `top_genus` (its species and its novel species summed), "
        "whatever the call; VSEARCH's top hit's genus. Wrong call: the called taxon is not the query's at that rank (\"novel\" is right only for a "
        "novel kind). Throughput: the `idengine predict` command's wall time and its process tree's CPU time (Ray "
        "and its actor included, sampled from /proc); VSEARCH's wall and CPU time of its one process.", ""])


README_BEGIN, README_END = "<!-- user_case: begin -->", "<!-- user_case: end -->"


def update_readme(result: dict, readme: Path, kind: str | None = None) -> None:
    """Replace (or append) the user's-case section of bench/README.md (one per classifier kind), between its
    markers."""
    begin, end = (README_BEGIN, README_END) if kind is None else \
        (README_BEGIN.replace("user_case", f"user_case {kind}"), README_END.replace("user_case", f"user_case {kind}"))
    name, title = ("user_case", "") if kind is None else (f"user_case_{kind}", f", classifier {kind}")
    section = "\n".join([
        begin, f"## A user's case: a small reference with common and rare species{title} (issue #12 parts 5-6)", "",
        f"`{result['command']}` (fixed seed; its docstring says what it builds and runs) -> "
        f"`results/{name}.{{json,md}}` and this section. Latest run: "
        f"{result['date']}, commit {result['commit']}, idengine's steps {result['idengine_min']:.0f} min, "
        f"{result['machine']}.", "", render_table(result), "", *render_matched(result),
        "Targets: " + "; ".join(("met" if t["met"] else "MISSED") + ": " + t["target"] for t in result["targets"])
        + f". Details and idengine's calls by rank: `results/{name}.md`.", end])
    text = readme.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "12s-fish"), help="source set")
    p.add_argument("--work", help="scratch dir (emptied first); default runs/user_case[_<kind>]")
    p.add_argument("--small", action="store_true", help="smoke test: a few species, 1 epoch; results in --work")
    p.add_argument("--from-step", default="prepare", choices=("prepare", "cv", "train", "predict"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides (an experiment: results stay in --work)")
    p.add_argument("--kind", choices=("kmer-linear", "kmer-nb", "probe"),
                   help="classifier instead of the config's tiny transformer (model.kind override)")
    args = p.parse_args(argv)
    suffix = f"_{args.kind}" if args.kind else ""
    start, load, sizes = time.time(), os.getloadavg()[0], SMALL if args.small else FULL
    work = Path(args.work or REPO / "runs" / f"user_case{suffix}").resolve()
    if args.from_step == "prepare":
        shutil.rmtree(work, ignore_errors=True)
    ref, queries = build_case(load_source(Path(args.data)), sizes, SEED)
    write_case(ref, queries, work / "data")
    extra = (["train.epochs=1"] if args.small else []) + ([f"model.kind={args.kind}"] if args.kind else []) + args.set
    ide = run_idengine(work / "data", work, extra, args.from_step)
    v97, vtop = (run_vsearch(ref, queries, work / f"vsearch_{i}", i) for i in (peers.IDENTITY, 0.0))
    tables = (queries, idengine_calls(work / "calls.csv", queries, ref), *(vsearch_calls(ref, r) for r in (v97, vtop)))
    scores = {kind: score_kind(*(t[(queries["kind"] == kind).to_numpy()].reset_index(drop=True) for t in tables))
              for kind, _ in KINDS}
    speed = throughput(len(queries), ide, v97)
    result = {
        "command": "python bench/user_case.py" + (" --small" if args.small else "")
        + (f" --kind {args.kind}" if args.kind else "") + (f" --set {' '.join(args.set)}" if args.set else "")
        + (f" --from-step {args.from_step}" if args.from_step != "prepare" else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),  # -dirty: the tree had uncommitted changes
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, load average (1 min) {load:.1f} at the start, "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "vsearch_version": peers.tool_version("vsearch"), "extra": f"; {' '.join(extra)}" if extra else "",
        "case": {"seed": SEED, "reference_records": len(ref), "reference_species": ref["species"].nunique(),
                 "reference_genera": ref["genus"].nunique(), "common_species": sizes["common"],
                 "common_records": sizes["common_records"], "rare_species": sizes["rare"], "queries": len(queries),
                 "queries_per_kind": queries["kind"].value_counts().to_dict()},
        "idengine": ide, "vsearch": {name: {k: r[k] for k in ("identity", "wall_s", "cpu_s", "peak_mib")}
                                     for name, r in (("id_0.97", v97), ("top_hit_id_0", vtop))},
        "scores": scores, "throughput": speed, "targets": targets(scores, speed),
        "at_vsearch_overclassification": at_vsearch_overclassification(queries, tables[1], scores),
        "runtime_min": round((time.time() - start) / 60, 1),
        "idengine_min": round(sum(v["wall_s"] for v in ide["steps"].values()) / 60, 1)}
    out = work / "user_case" if args.small or args.set else REPO / "bench" / "results" / f"user_case{suffix}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(render_md(result))
    if not (args.small or args.set):
        update_readme(result, REPO / "bench" / "README.md", args.kind)
    print(render_table(result), f"\n[user_case] {out}.md, {result['runtime_min']} min", flush=True)
    return result


if __name__ == "__main__":
    main()
