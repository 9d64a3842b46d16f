"""Benchmark harness: one dataset, the same folds for every model, one table (issue #6 part 3).

    python bench/run_bench.py --data ../shared/data/12s-fish --folds-file ../shared/data/12s-fish/protocol-folds.csv \
        --models kmer-nb kmer-linear tiny vsearch blast sintax --out bench/results/12s-fish.md

1. Prepare the dataset once with idengine's own `prepare` (reused when present) into `<work>/prepared`.
2. Each idengine model runs `idengine.cv.run_cv` in its own child process, so its peak RSS is its own; the child
   also measures classification throughput and the open set (calibrated max probability >= the threshold chosen
   on out-of-fold logits for the target precision, as `idengine train` does).
3. Peers (BLAST+, VSEARCH, SINTAX; bench/peers.py) run on the same folds when installed, else are marked skipped.
4. One Markdown table + one JSON with everything; published PEERS.md rows sit beside them as reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from engine_rows import classifier_open_world, engine_rows  # noqa: E402 (bench/, on the path above)

log = logging.getLogger("bench")

IDENGINE_MODELS = ("kmer-nb", "kmer-linear", "tiny", "probe")
PEER_MODELS = ("vsearch", "blast", "sintax")
METRIC_COLUMNS = (("top1_acc", "top-1"), ("f1_macro", "macro F1"), ("top5_acc", "top-5"),
                  ("pr_auc_macro", "macro PR-AUC"), ("log_loss", "log loss"), ("ece", "ECE"))
OTHER_COLUMNS = ("known: species calls", "open set: overclassified", "novel sp.: genus right", "train s/fold",
                 "classify seqs/s", "peak MiB")
ENGINE_MODELS = ("kmer-nb", "kmer-linear")
"""Models whose cv also runs the engine's out-of-fold step by default (bench/engine_rows.py; --engine-models)."""
BASE_CONFIG = REPO / "jobs" / "configs" / "tiny-cpu.yaml"
REUSE_NOTE = ["Rows were assembled with --reuse from per-model results in the work dir (each measured by its own "
              "invocation, possibly concurrently with others; see each row's note for its settings)."]
TINY_OVERRIDES = ("train.batch_size=32", "train.train_eval_size=256")
"""CPU budget: fewer, larger steps and a smaller train-gap sample than tiny-cpu.yaml (16, 512)."""
THROUGHPUT_SEQS = 1000
"""Validation sequences timed for the transformer's classification throughput."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "12s-fish"),
                   help="dataset dir with sequences.fasta.gz + labels.csv (default ../shared/data/12s-fish)")
    p.add_argument("--models", nargs="+", default=["kmer-nb", "kmer-linear", "tiny", *PEER_MODELS],
                   help=f"any of {IDENGINE_MODELS + PEER_MODELS}")
    p.add_argument("--folds-file", default=None, help="CSV id,fold (e.g. protocol-folds.csv); else computed folds")
    p.add_argument("--min-seqs", type=int, default=5, help="data.min_seqs_per_species (distinct sequences)")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--out", default=None, help="Markdown table (default bench/results/<dataset>.md; JSON beside)")
    p.add_argument("--work", default=None, help="scratch dir (default runs/bench/<dataset>)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per fold of the transformer (CPU: keep small)")
    p.add_argument("--peer-queries-per-fold", type=int, default=500,
                   help="validation queries per fold for peers (0: all)")
    p.add_argument("--peer-open-set-queries", type=int, default=None,
                   help="open-set queries for peers (0: all; default n_folds x --peer-queries-per-fold)")
    p.add_argument("--no-open-set", action="store_true", help="skip the open-set column for every model")
    p.add_argument("--tiny-open-set", action="store_true", help="also score the open set with each tiny fold model")
    p.add_argument("--threads", type=int, default=2, help="threads given to BLAST+/VSEARCH")
    p.add_argument("--engine-models", nargs="*", default=list(ENGINE_MODELS),
                   help="idengine models whose cv also runs the engine (its row and the index-alone row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse per-model results already in the work dir")
    p.add_argument("--assemble-only", action="store_true",
                   help="with --reuse semantics, run nothing: models without a saved result are marked 'not run'")
    p.add_argument("--note", action="append", default=[], help="extra line for the table's notes (repeatable)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace, work: Path) -> Path:
    """Run idengine's prepare once (protocol: no test split, min distinct sequences, optional fold file)."""
    from idengine.config_io import load_config
    from idengine.recipes.prepare import prepare_dataset

    out = work / "prepared"
    if (out / "records.parquet").exists() and (out / "prepare_report.json").exists():
        log.info("reusing %s", out)
        return out
    data = Path(args.data)
    overrides = [f"data.sequences={data / 'sequences.fasta.gz'}", f"data.labels={data / 'labels.csv'}",
                 f"data.min_seqs_per_species={args.min_seqs}", f"data.n_folds={args.n_folds}", "data.test_fraction=0",
                 f"data.seed={args.seed}"]
    if args.folds_file:
        overrides.append(f"data.folds_file={Path(args.folds_file).resolve()}")
    return prepare_dataset(load_config(BASE_CONFIG, overrides), out)


def model_config(model: str, prepared: Path, work: Path, epochs: int, seed: int):
    """The Config a model runs with: tiny-cpu.yaml + the model kind, scratch paths and the epoch budget."""
    from idengine.config_io import load_config

    kind = {"tiny": "transformer", "probe": "probe"}.get(model, model)
    overrides = [f"model.kind={kind}", "model.backbone=tiny", f"train.storage_path={(work / 'ray').resolve()}",
                 f"train.seed={seed}", "train.num_workers=0"]
    if model == "tiny":
        overrides += [f"train.epochs={epochs}", f"train.patience={epochs}", *TINY_OVERRIDES]
    return load_config(BASE_CONFIG, overrides)


def run_child(model: str, args: argparse.Namespace, prepared: Path, work: Path) -> dict:
    """Run one idengine model in a child process; its peak RSS comes from os.wait4 (Ray's daemons excluded)."""
    result_file = work / "results" / f"{model}.json"
    partial = result_file.with_suffix(".partial.json")
    if args.reuse and result_file.exists():
        return json.loads(result_file.read_text())
    if args.reuse and partial.exists():  # stopped before its last fold: its finished folds, said so
        row = json.loads(partial.read_text())
        if row["folds_done"] == 1:  # one fold has no spread: show the value without a made-up ± 0
            row["metrics"] = {k: {"mean": v["mean"], "sd": None} for k, v in row["metrics"].items()}
        row["note"] = (f"only {row['folds_done']} of {args.n_folds} folds finished in the time budget "
                       "(stopped); fit time, throughput and memory not recorded")
        return row
    if args.assemble_only:
        return {"name": model, "kind": "idengine", "status": "not run", "note": "no saved result (--assemble-only)"}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    spec = {"model": model, "prepared": str(prepared), "work": str(work), "epochs": args.epochs, "seed": args.seed,
            "open_set": not args.no_open_set and (model != "tiny" or args.tiny_open_set),
            "engine": model in args.engine_models,
            "result": str(result_file)}
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            cwd=str(REPO))
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result_file.exists():
        return {"name": model, "kind": "idengine", "status": "failed",
                "note": f"child exited with {code}; see the log above"}
    result = json.loads(result_file.read_text())
    result.update(peak_mib=round(usage.ru_maxrss / 1024, 1), wall_s=round(time.time() - start, 1))
    result_file.write_text(json.dumps(result, indent=1))
    return result


def run_peer_cached(peer: str, args: argparse.Namespace, prepared: Path, work: Path) -> dict:
    """One peer's row, from the work dir with --reuse, else measured (or skipped) and saved there."""
    import peers

    result_file = work / "results" / f"{peer}.json"
    if args.reuse and result_file.exists():
        return json.loads(result_file.read_text())
    if args.assemble_only:
        return {"name": peer, "kind": "peer", "status": "not run", "note": "no saved result (--assemble-only)"}
    open_n = args.peer_open_set_queries
    if open_n is None:
        open_n = args.n_folds * args.peer_queries_per_fold
    row = peers.run_peers([peer], prepared, work / "peers", args.peer_queries_per_fold, args.threads, args.seed,
                          open_queries=None if args.no_open_set else open_n)[0]
    row["load_avg_at_end"] = os.getloadavg()
    if row["status"] == "ok":
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(row, indent=1))
    return row


def bench_idengine_model(spec: dict) -> dict:
    """Cross-validate one idengine model (in the child process): metrics, fit time, throughput, open set."""
    from idengine.config import KMER_KINDS
    from idengine.data.prepared import read_prepared
    from idengine.recipes.cv import iter_folds, running_summary, write_cv

    model, prepared, work = spec["model"], Path(spec["prepared"]), Path(spec["work"])
    config = model_config(model, prepared, work, spec["epochs"], spec["seed"])
    engine = spec.get("engine", False)
    if config.model.kind not in KMER_KINDS or engine:
        start_ray()
    partial = Path(spec["result"]).with_suffix(".partial.json")
    results = []
    # a run stopped for time leaves its folds; with the engine, each fold also scores its rare species
    for result in iter_folds(config, prepared, work / "cv" / model, with_rare=engine):
        results.append(result)
        partial.write_text(json.dumps({"name": model, "kind": "idengine", "status": "ok", "folds_done": len(results),
                                       "metrics": running_summary(results), "load_avg_at_end": os.getloadavg()}))
    engine_metrics = None
    if engine:
        import engine_rows

        engine_metrics = engine_rows.run_engine(config, prepared, results, work / "cv" / model)
        cv_dir = work / "cv" / model
    else:
        cv_dir = write_cv(work / "cv" / model, config, results, read_prepared(prepared)[1].num_classes)
    metrics = json.loads((cv_dir / "metrics.json").read_text())
    history = [json.loads((cv_dir / "folds" / f"{f['fold']}.json").read_text()) for f in metrics["folds"]]
    if config.model.kind in KMER_KINDS:
        fit_s = [h[0]["fit_s"] for h in history]
        speed = sum(h[0]["predict_seqs_per_s"] for h in history) / len(history)
        note = "train s = fit time"
    elif model == "probe":  # embeddings are computed once for all folds; a new sequence pays the backbone forward
        fit_s = [h[0]["fit_s"] for h in history]
        speed = transformer_throughput(config, prepared)
        note = ("tiny random backbone, frozen; train s = head fit (embedding once, not included); seqs/s = "
                "backbone forward incl. tokenizing")
    else:
        fit_s = [sum(e["seconds"] for e in h) for h in history]
        speed = transformer_throughput(config, prepared)
        note = (f"{spec['epochs']} epoch(s)/fold, {', '.join(TINY_OVERRIDES)} (best epoch by val PR-AUC); "
                "train s = summed epoch training time; "
                f"seqs/s on {THROUGHPUT_SEQS} fold-0 validation sequences incl. tokenizing")
    result = {"name": model, "kind": "idengine", "status": "ok", "note": note, "metrics": metrics["mean"],
              "folds": metrics["folds"], "train_s_per_fold": _mean_sd(fit_s),
              "fold_wall_s": [f["seconds"] for f in metrics["folds"]], "classify_seqs_per_s": round(speed, 1),
              "cv_dir": str(cv_dir), "load_avg_at_end": os.getloadavg(), "engine": engine_metrics}
    if spec["open_set"]:
        import open_set

        score = (open_set.kmer_open_set if config.model.kind in KMER_KINDS else
                 open_set.probe_open_set if model == "probe" else open_set.transformer_open_set)
        result["open_set"] = score(config, prepared, cv_dir)
    return result


def start_ray(attempts: int = 3) -> None:
    """ray.init, retried: on a loaded machine the raylet can miss Ray's fixed 30 s start-up window."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=512 * 2**20,
                     log_to_driver=False)
            return
        except Exception:  # Ray raises a bare Exception on a start-up timeout
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("Ray start-up timed out (attempt %d of %d); retrying", attempt, attempts)


def _mean_sd(values: list[float]) -> dict:
    from idengine.evaluate.metrics import summarise_folds

    return summarise_folds([{"v": float(v)} for v in values])["v"]


def transformer_throughput(config, prepared: Path) -> float:
    """Sequences/s of tokenize + forward on fold-0 validation records; weights do not change the cost."""
    import torch

    from idengine import layout as C
    from idengine.data.prepared import read_prepared
    from idengine.data.tokenize import load_tokenizer, tokenize_batch
    from idengine.models.inference import classifier_logits
    from idengine.models.transformer import build_model

    records, labels = read_prepared(prepared)
    val = records[records[C.FOLD] == "0"].head(THROUGHPUT_SEQS)
    model_cfg = dataclasses.replace(config.model, finetune="full")  # same forward as any mode (probe too)
    model = build_model(model_cfg, config.lora, labels.num_classes, dict(enumerate(labels.species))).eval()
    tokenizer = load_tokenizer(config.model.backbone)
    size = config.predict.batch_size
    start = time.perf_counter()
    rows = tokenize_batch({C.SEQUENCE: val[C.SEQUENCE].to_numpy()}, tokenizer, config.model.max_tokens)[C.INPUT_IDS]
    logits = classifier_logits(model, list(rows), size, torch.device("cpu"))
    assert logits.shape == (len(val), labels.num_classes)
    return len(val) / (time.perf_counter() - start)


def machine_info() -> dict:
    """Cores, RAM and CPU model of this machine (from /proc where present)."""
    info = {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        mem = Path("/proc/meminfo").read_text().splitlines()[0]
        info["ram_gib"] = round(int(mem.split()[1]) / 2**20, 1)
        info["load_avg_at_start"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    return info


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "idengine"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (idengine/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cell(value, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):  # mean ± sd over folds; a published reference has no sd
        sd = "" if value.get("sd") is None else f" ± {value['sd']:{spec}}"
        return f"{value['mean']:{spec}}{sd}"
    return f"{value:{spec}}"


def table_row(row: dict) -> str:
    """One Markdown row: metrics mean ± sd, open set, train s/fold, seqs/s, peak MiB (– where not measured)."""
    name = row["name"] + (f" ({row['label']})" if row.get("label") else "")
    if row["status"] != "ok":
        return f"| {name} | " + " | ".join([row["status"]] + ["–"] * (len(METRIC_COLUMNS) + len(OTHER_COLUMNS) - 1)) + " |"
    m = row.get("metrics", {})
    cells = [_cell(m.get(key)) for key, _ in METRIC_COLUMNS]
    world = row.get("open_world") or classifier_open_world(row)
    cells += [_cell(world.get(column)) for column in OTHER_COLUMNS[:3]]
    cells += [_cell(row.get("train_s_per_fold"), ".1f"),
              _cell(row.get("classify_seqs_per_s"), ".0f"), _cell(row.get("peak_mib"), ".0f")]
    return f"| {name} | " + " | ".join(cells) + " |"


def render_markdown(report: dict) -> str:
    """The results page: header (machine, date, commit, folds, notes) then the one table."""
    mach, data = report["machine"], report["dataset"]
    lines = [f"# Benchmark: {data['name']}", "",
             f"- Machine: {mach.get('cores')} cores, {mach.get('ram_gib', '?')} GiB RAM, {mach.get('cpu', '?')}; "
             f"load average at start {', '.join(f'{x:.1f}' for x in mach.get('load_avg_at_start', []))}",
             f"- Date: {report['date']}; idengine commit {report['commit']}; {report['command']}",
             f"- Data: {data['kept']:,} records, {data['species']:,} species (>= {data['min_seqs']} distinct sequences), "
             f"{data['folds']} folds from {data['fold_source']}; open set: {data['unknown']:,} records of rarer species",
             "", "| model | " + " | ".join(label for _, label in METRIC_COLUMNS) + " | " + " | ".join(OTHER_COLUMNS)
             + " |", "|---" * (1 + len(METRIC_COLUMNS) + len(OTHER_COLUMNS)) + "|"]
    lines += [table_row(row) for row in report["rows"]]
    lines += ["", "Metrics are mean ± sd over folds; `–` = not defined for that tool or not measured.", "", "Notes:"]
    for row in report["rows"]:
        parts = [row["note"]] if row.get("note") else []
        open_set = row.get("open_set", {})
        if open_set.get("n") and "open set:" not in row.get("note", ""):
            text = f"open set: {open_set['n']} queries"
            if "cutoff" in open_set:
                text += f", {open_set['cutoff']}"
            if open_set.get("reachable", True) and "oof_coverage_at_threshold" in open_set:
                text += f", which calls {open_set['oof_coverage_at_threshold']:.1%} of known-species records (OOF)"
            parts.append(text)
        if parts:
            lines.append(f"- {row['name']}: {'; '.join(parts)}")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def command_line(argv: list[str]) -> str:
    """The command as run, without the --note texts (they are printed under the table)."""
    kept = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    return "python bench/run_bench.py " + " ".join(kept)


def dataset_summary(args: argparse.Namespace, prepared: Path) -> dict:
    rep = json.loads((prepared / "prepare_report.json").read_text())
    return {"name": Path(args.data).name, "dir": str(args.data), "kept": rep["kept"],
            "species": rep["species_after"], "unknown": rep["set_aside_rare_species"], "min_seqs": args.min_seqs,
            "folds": args.n_folds, "fold_source": rep.get("fold_source", "?"), "fold_sizes": rep.get("folds")}


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    args.reuse = args.reuse or args.assemble_only
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(bench_idengine_model(spec), indent=1))
        return Path(spec["result"])
    import peers  # bench/peers.py, beside this file

    unknown = [m for m in args.models if m not in IDENGINE_MODELS + PEER_MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {IDENGINE_MODELS + PEER_MODELS}")
    name = Path(args.data).name
    out = Path(args.out or REPO / "bench" / "results" / f"{name}.md")
    work = Path(args.work or REPO / "runs" / "bench" / name).resolve()
    machine, started = machine_info(), time.strftime("%Y-%m-%d %H:%M %Z")
    prepared = prepare(args, work)
    rows = [run_child(m, args, prepared, work) for m in args.models if m in IDENGINE_MODELS]
    rows = [part for row in rows for part in [*engine_rows(row), row]]  # the engine first, then its parts
    wanted = [p for p in PEER_MODELS if p in args.models]
    rows += [run_peer_cached(p, args, prepared, work) for p in wanted]
    rerun = {r["name"] for r in rows if r["status"] == "ok"}
    rows += peers.reference_rows(Path(args.data) / "PEERS.md", rerun)
    report = {"date": started, "commit": git_commit(), "machine": machine,
              "command": command_line(argv if argv is not None else sys.argv[1:]),
              "dataset": dataset_summary(args, prepared), "rows": rows,
              "notes": peers.NOTES + args.note + (REUSE_NOTE if args.reuse else [])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    out.write_text(render_markdown(report))
    log.info("wrote %s and %s", out, out.with_suffix(".json"))
    return out


if __name__ == "__main__":
    main()
