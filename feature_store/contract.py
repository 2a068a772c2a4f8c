"""The input-table contract every source is loaded into, and readers for it as Parquet.

    items:        item_id int64, title string, text string (nullable), image_uri string (nullable), attributes...
    interactions: user_id int64, item_id int64, ts int64 (unix seconds), label float32 (1 = positive)

`qarm data export` writes a loaded source in this form (items.parquet, interactions.parquet); library entry
points that must not depend on the source loaders (``torchrun -m ranker.train``) read it back with
:func:`read_interactions` / :func:`read_item_ids`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ITEM_COLUMNS = ("item_id", "title", "text", "image_uri")
INTERACTION_COLUMNS = ("user_id", "item_id", "ts", "label")


def _read_columns(path: str | os.PathLike, columns: tuple[str, ...], what: str):
    import pandas as pd
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} table not found: {path}")
    try:
        names = pq.read_schema(path).names
    except Exception as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} of the {what} contract {list(columns)}; "
                         f"found {names} (write it with `qarm data export`)")
    frame: pd.DataFrame = pd.read_parquet(path, columns=list(columns))
    for col in columns:
        nulls = np.flatnonzero(frame[col].isna().to_numpy())
        if nulls.size:
            raise ValueError(f"{path}: column {col!r} row {int(nulls[0])} is null ({nulls.size} null row(s))")
    return frame


def read_interactions(path: str | os.PathLike):
    """Contract interactions (user_id, item_id, ts, label) sorted by ts; ValueError names file, column and row."""
    frame = _read_columns(path, INTERACTION_COLUMNS, "interactions")
    for col in ("user_id", "item_id", "ts"):
        if not np.issubdtype(frame[col].dtype, np.integer):
            raise ValueError(f"{path}: column {col!r} must be int64, got {frame[col].dtype}")
    frame = frame.astype({"user_id": np.int64, "item_id": np.int64, "ts": np.int64, "label": np.float32})
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)


def read_item_ids(path: str | os.PathLike) -> np.ndarray:
    """The catalog's item ids (sorted, unique) from a contract items table."""
    frame = _read_columns(path, ("item_id",), "items")
    ids = frame["item_id"].to_numpy()
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: column 'item_id' must be int64, got {ids.dtype}")
    ids = np.sort(ids.astype(np.int64))
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if dup.size:
        raise ValueError(f"{path}: column 'item_id' holds duplicate id {int(ids[dup[0]])}")
    return ids
