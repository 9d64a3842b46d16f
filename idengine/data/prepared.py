"""The prepared directory: how `idengine prepare` writes it and how every later step reads it back.

Its files (ARCHITECTURE.md): records.parquet (kept records with label and fold), unknown.parquet (set-aside rare
species), dropped.csv, label_map.json, prepare_report.json/.md, class_sizes.png, config.yaml, and the caches under
tokens/ and embeddings/. Only a directory holding COMPLETE_MARKERS (or an empty one) is ever replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from idengine import layout as C
from idengine.data.labels import LabelSpace
from idengine.errors import InputError
from idengine.storage import write_json

COMPLETE_MARKERS = (C.RECORDS_FILE, C.REPORT_JSON)
"""A directory holding these was written by prepare; only such a directory (or an empty one) is replaced."""


def output_columns(table: pd.DataFrame, ranks: list[str], with_label: bool) -> list[str]:
    head = [C.ID, C.SEQUENCE, C.SPECIES, *ranks]
    head += [C.LABEL, C.GROUP, C.FOLD] if with_label else [C.GROUP]
    if C.CLUSTER in table.columns:
        head.append(C.CLUSTER)
    return head + sorted(c for c in table.columns if c.startswith(C.VECTOR_PREFIX))


def write_table(table: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Write with an explicit schema, so an all-empty rank column is still a string column."""
    types = {C.LABEL: pa.int64()}
    fields = [
        pa.field(c, types.get(c, pa.float64() if c.startswith(C.VECTOR_PREFIX) else pa.string())) for c in columns
    ]
    frame = table[columns].astype({c: object for c in columns if c != C.LABEL and not c.startswith(C.VECTOR_PREFIX)})
    pq.write_table(pa.Table.from_pandas(frame, schema=pa.schema(fields), preserve_index=False), path)


def write_prepared(directory: Path, built: dict[str, Any]) -> None:
    """Write the tables, the label map and prepare_report.json of a built prepared set into a staging directory.

    Args:
        directory: the staging directory (renamed into place by the caller once everything is written).
        built: `recipes.prepare.build_prepared` output (records, unknown, dropped, labels, report).
    """
    write_table(built["records"], list(built["records"].columns), directory / C.RECORDS_FILE)
    write_table(built["unknown"], list(built["unknown"].columns), directory / C.UNKNOWN_FILE)
    built["dropped"].to_csv(directory / C.DROPPED_FILE, index=False)
    built["labels"].to_json(directory / C.LABEL_MAP_FILE)
    write_json(directory / C.REPORT_JSON, built["report"])


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but a previous prepared directory or an empty one."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory; choose another output directory")
    if any(out_dir.iterdir()) and not all((out_dir / m).exists() for m in COMPLETE_MARKERS):
        raise InputError(
            f"{out_dir}: exists, is not empty and is not a prepared directory; refusing to replace it. "
            "Choose another output directory or remove it"
        )



def read_prepared(prepared_dir: str | Path) -> tuple[pd.DataFrame, LabelSpace]:
    """Read a prepared directory: the kept records (with `label` and `fold`) and the label space.

    Args:
        prepared_dir: a directory written by `prepare_dataset`.

    Returns:
        records (fold as str, label as int64) and the LabelSpace.

    Raises:
        FileNotFoundError: not a (complete) prepared directory.
        ValueError: records and label map disagree.
    """
    prepared_dir = Path(prepared_dir)
    missing = [m for m in (*COMPLETE_MARKERS, C.LABEL_MAP_FILE) if not (prepared_dir / m).exists()]
    if missing:
        raise FileNotFoundError(f"{prepared_dir}: not a prepared directory (missing {missing}); run `idengine prepare`")
    records = pd.read_parquet(prepared_dir / C.RECORDS_FILE)
    labels = LabelSpace.from_json(prepared_dir / C.LABEL_MAP_FILE)
    records[C.FOLD] = records[C.FOLD].astype(str)
    records[C.LABEL] = records[C.LABEL].astype("int64")
    expected = records[C.SPECIES].map(labels.label_of)
    if not (expected == records[C.LABEL]).all():
        raise ValueError(f"{prepared_dir}: records.parquet labels disagree with label_map.json; run prepare again")
    return records, labels


def read_unknown(prepared_dir: str | Path) -> pd.DataFrame:
    """The set-aside records of rare species (open-set queries) of a prepared directory."""
    return pd.read_parquet(Path(prepared_dir) / C.UNKNOWN_FILE)
