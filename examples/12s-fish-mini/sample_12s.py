"""Sample the bundled example set (and the test set) from the full 12s-fish development set, reproducibly.

    python examples/12s-fish-mini/sample_12s.py --preset example  # -> examples/12s-fish-mini/
    python examples/12s-fish-mini/sample_12s.py --preset tests    # -> tests/data/12s_sample*

Records are copied unchanged (same ids, sequences and label rows); only the choice of records is made here.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
from Bio.SeqIO.FastaIO import SimpleFastaParser

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO.parent / "shared" / "data" / "12s-fish"
PRESETS = {
    # core: species kept by prepare (records in [lo, hi], distinct sequences >= min_distinct), grouped by genus
    "example": dict(core=32, lo=8, hi=15, min_distinct=7, per_genus=3, rare_records=60, low_distinct=2,
                    conflicts=6, ambiguous=5, n_runs=1, out=REPO / "examples" / "12s-fish-mini"),
    "tests": dict(core=20, lo=6, hi=12, min_distinct=6, per_genus=3, rare_records=70, low_distinct=2,
                  conflicts=6, ambiguous=6, n_runs=2, out=REPO / "tests" / "data"),
}  # fmt: skip


def read_source() -> pd.DataFrame:
    labels = pd.read_csv(SOURCE / "labels.csv", dtype=str, keep_default_na=False)
    with gzip.open(SOURCE / "sequences.fasta.gz", "rt") as handle:
        seqs = dict(SimpleFastaParser(handle))
    return labels.assign(sequence=labels["id"].map(seqs))


def choose_core(df: pd.DataFrame, p: dict, rng: np.random.Generator) -> list[str]:
    """Species of genera with several candidates, so that genus-level fallback has something to pool."""
    stats = df.groupby("species").agg(n=("id", "size"), d=("sequence", "nunique"), genus=("genus", "first"))
    cand = stats[stats.n.between(p["lo"], p["hi"]) & (stats.d >= p["min_distinct"])]
    genera = cand.groupby("genus").size()
    genera = list(genera[genera >= 2].index)
    rng.shuffle(genera)
    chosen: list[str] = []
    for genus in genera:
        species = sorted(cand[cand.genus == genus].index)
        take = rng.permutation(species)[: p["per_genus"]]
        chosen.extend(take[: p["core"] - len(chosen)])
        if len(chosen) >= p["core"]:
            break
    return chosen


def sample(df: pd.DataFrame, p: dict, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    core = choose_core(df, p, rng)
    picked = set(df.index[df.species.isin(core)])
    # label conflicts touching core species: every record of those shared sequences
    per_seq = df.groupby("sequence").species.nunique()
    shared = df[df.sequence.map(per_seq) > 1]
    touching = sorted(set(shared.loc[shared.species.isin(core), "sequence"]))
    others = sorted(set(shared.sequence) - set(touching))
    top_two = shared.groupby(["sequence", "species"]).size().groupby(level=0).nlargest(2).groupby(level=0).agg(list)
    with_majority = sorted(seq for seq, n in top_two.items() if n[0] > n[1] and seq in others)
    conflict_seqs = touching[: p["conflicts"]] + list(rng.choice(others, 2, replace=False)) + with_majority[:1]
    picked |= set(df.index[df.sequence.isin(conflict_seqs)])
    # species with >= 5 records but fewer than 5 distinct sequences: set aside by the distinct-sequence rule
    stats = df.groupby("species").agg(n=("id", "size"), d=("sequence", "nunique"))
    low = sorted(stats[(stats.n >= 5) & (stats.d < 5)].index)
    picked |= set(df.index[df.species.isin(rng.choice(low, p["low_distinct"], replace=False))])
    # rare species (1-4 records), half of them from the core genera (unknown species of a known genus)
    rare = stats[stats.n <= 4].index
    genera = set(df.loc[df.species.isin(core), "genus"])
    for pool in (df[df.species.isin(rare) & df.genus.isin(genera)], df[df.species.isin(rare) & ~df.genus.isin(genera)]):
        picked |= set(rng.choice(pool.index, min(len(pool), p["rare_records"] // 2), replace=False))
    # real ambiguous bases: IUPAC codes, and runs of N
    amb = df.index[df.sequence.str.contains("[RYSWKMBDHV]")]
    runs = df.index[df.sequence.str.contains("NNN")]
    picked |= set(rng.choice(amb, p["ambiguous"], replace=False)) | set(rng.choice(runs, p["n_runs"], replace=False))
    return df.loc[sorted(picked)]


def write(sub: pd.DataFrame, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fasta = "".join(f">{i}\n{s}\n" for i, s in zip(sub["id"], sub["sequence"]))
    with gzip.GzipFile(out / f"{stem}.fasta.gz", "wb", mtime=0) as handle:  # mtime=0: identical bytes on rerun
        handle.write(fasta.encode())
    label_name = "labels.csv" if stem == "sequences" else f"{stem}_labels.csv"
    sub.drop(columns="sequence").to_csv(out / label_name, index=False, lineterminator="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="example")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    sub = sample(read_source(), p)
    write(sub, p["out"], "sequences" if args.preset == "example" else "12s_sample")
    stats = sub.groupby("species").agg(n=("id", "size"), d=("sequence", "nunique"))
    print(f"{len(sub)} records, {len(stats)} species, {sub.genus.nunique()} genera, "
          f"{(stats.d >= 5).sum()} species with >= 5 distinct sequences")  # fmt: skip


if __name__ == "__main__":
    main()
