"""Step 3a, labels: the label space, species <-> class index, with the taxonomy above each species.

Written to label_map.json by prepare and read back by every later step and by an exported artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idengine import layout as C


@dataclass(frozen=True)
class LabelSpace:
    """The species the classifier predicts, label i <-> species, with their taxonomy ranks.

    Labels are the species sorted alphabetically, so the same kept species give the same labels.
    """

    species: tuple[str, ...]
    """Species name of each label."""
    ranks: tuple[str, ...] = ()
    """Rank columns known for the species, from the top down (a subset of columns.RANKS)."""
    taxonomy: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    """rank -> value of that rank for each label (None where unknown)."""
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "species", tuple(self.species))
        object.__setattr__(self, "ranks", tuple(self.ranks))
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.species)})
        if len(self._index) != len(self.species):
            raise ValueError("LabelSpace: duplicate species names")
        for rank in self.ranks:
            if len(self.taxonomy.get(rank, ())) != len(self.species):
                raise ValueError(f"LabelSpace: rank {rank!r} needs one value per species")

    @classmethod
    def from_records(cls, records: pd.DataFrame, ranks: tuple[str, ...] | list[str] = ()) -> LabelSpace:
        """Build the label space of the species in records; each rank takes its most frequent non-empty value.

        Args:
            records: table with `species` and the rank columns.
            ranks: rank columns to attach (those found in labels.csv).

        Returns:
            The LabelSpace (labels in alphabetical species order).
        """
        species = sorted(records[C.SPECIES].unique())
        taxonomy = {}
        for rank in ranks:
            known = records[[C.SPECIES, rank]].dropna()
            # most frequent value; ties go to the alphabetically first, so the choice is deterministic
            top = (
                known.groupby([C.SPECIES, rank]).size().rename("n").reset_index()
                .sort_values(["n", rank], ascending=[False, True]).drop_duplicates(C.SPECIES)
                .set_index(C.SPECIES)[rank]
            )  # fmt: skip
            taxonomy[rank] = tuple(top.get(s) for s in species)
        return cls(tuple(species), tuple(ranks), taxonomy)

    @property
    def num_classes(self) -> int:
        """Number of labels."""
        return len(self.species)

    def label_of(self, species: str) -> int:
        """The label of a species; KeyError for a species outside the label space."""
        return self._index[species]

    def species_of(self, label: int) -> str:
        """The species of a label."""
        return self.species[label]

    def taxonomy_table(self) -> pd.DataFrame:
        """DataFrame indexed by label (name `label`) with `species` and one column per rank."""
        table = pd.DataFrame({C.SPECIES: list(self.species), **{r: list(self.taxonomy[r]) for r in self.ranks}})
        table.index.name = C.LABEL
        return table

    def rank_names(self, rank: str) -> list[str]:
        """The distinct known values of a rank, sorted; position i is the id `rank_index` gives them."""
        self._check_rank(rank)
        return sorted({v for v in self.taxonomy[rank] if v is not None})

    def rank_index(self, rank: str) -> np.ndarray:
        """Map each label to an integer id of its value at `rank` (e.g. its genus), for rank fallback.

        Args:
            rank: one of `ranks`, or `species` (the identity).

        Returns:
            int64 array of length num_classes; -1 where the rank is unknown for that species, so a summed
            probability over a rank never pools species of unknown genus/family together.
        """
        if rank == C.SPECIES:
            return np.arange(self.num_classes, dtype=np.int64)
        ids = {name: i for i, name in enumerate(self.rank_names(rank))}
        return np.array([ids.get(v, -1) if v is not None else -1 for v in self.taxonomy[rank]], dtype=np.int64)

    def _check_rank(self, rank: str) -> None:
        if rank not in self.ranks:
            raise KeyError(f"rank {rank!r} is not in this label space (ranks: {list(self.ranks)})")

    def to_dict(self) -> dict[str, Any]:
        """The label_map.json content."""
        labels = [
            {C.LABEL: i, C.SPECIES: s, **{r: self.taxonomy[r][i] for r in self.ranks}}
            for i, s in enumerate(self.species)
        ]
        return {"ranks": list(self.ranks), "labels": labels}

    def to_json(self, path: str | Path) -> None:
        """Write label_map.json."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> LabelSpace:
        """Read a label_map.json written by `to_json`; labels must be 0..n-1."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = sorted(raw["labels"], key=lambda e: e["label"])
        if [e["label"] for e in entries] != list(range(len(entries))):
            raise ValueError(f"{path}: labels must be 0..n-1 without gaps")
        ranks = tuple(raw.get("ranks", ()))
        taxonomy = {r: tuple(e.get(r) for e in entries) for r in ranks}
        return cls(tuple(e[C.SPECIES] for e in entries), ranks, taxonomy)
