"""Step 10a', neighbours: each reference record's nearest records of OTHER species, for the barcode-gap evidence.

A query as close to a record of species s as s's nearest other species is gives little reason to call s: it may as
well be another, unsampled congener. A query much closer than that is s's own. `nearest_other` says, for a hit's
record, the identity of its nearest other-species record that the query may see (what a query hides, its neighbours'
records hide too, so a simulated novel species is never its hit's neighbour), and the evidence compares the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEIGHBOUR_FILE = "neighbours.safetensors"


@dataclass
class Neighbours:
    """(n_ref, M) rows of each reference record's nearest other-species records, best first, and their identities."""

    rows: np.ndarray
    identity: np.ndarray

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"rows": np.ascontiguousarray(self.rows, dtype=np.int64),
                   "identity": np.ascontiguousarray(np.nan_to_num(self.identity, nan=-1.0), dtype=np.float32)},
                  str(directory / NEIGHBOUR_FILE))


def load_neighbours(directory: Path) -> Neighbours:
    from safetensors.numpy import load_file

    arrays = load_file(str(directory / NEIGHBOUR_FILE))
    identity = arrays["identity"].astype(np.float64)
    return Neighbours(arrays["rows"], np.where(identity < 0, np.nan, identity))


def reference_neighbours(species: np.ndarray, sequences: list[str], search: Callable) -> Neighbours:
    """Search every reference record with its own species hidden: its nearest other-species records.

    Args:
        species: (n_ref,) species of each reference row; sequences: the rows' sequences.
        search: (sequences, hidden species per query) -> Hits (the caller's search: in-process or on Ray).
    """
    hits = search(list(sequences), np.asarray(species, dtype=object))
    return Neighbours(hits.ref, hits.identity)


def nearest_other(neighbours: Neighbours, ref_rows: np.ndarray, visible: Callable[[np.ndarray, np.ndarray],
                  np.ndarray] | None = None, owners: np.ndarray | None = None) -> np.ndarray:
    """Identity of each given record's nearest other-species record that its query may see (0 where none).

    Args:
        neighbours: the reference's neighbours; ref_rows: (n,) the hit records (-1: no hit -> 0).
        visible: (owners, neighbour rows (n, M)) -> (n, M) bool, which neighbours each query may see (None: all).
        owners: (n,) the query each record stands for (passed to `visible`).
    """
    ref_rows = np.asarray(ref_rows)
    rows = neighbours.rows[np.maximum(ref_rows, 0)]
    ident = np.nan_to_num(neighbours.identity[np.maximum(ref_rows, 0)], nan=0.0)
    ok = rows >= 0
    if visible is not None:
        ok &= visible(owners, np.maximum(rows, 0))
    best = np.where(ok, ident, 0.0).max(axis=1) if rows.shape[1] else np.zeros(len(ref_rows))
    return np.where(ref_rows >= 0, best, 0.0)
