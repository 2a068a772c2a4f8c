"""`load_dataset(spec)`: one entry point over every source; plus writing rejects and id maps."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from feature_store.io import json_default
from pipelines.data.io import DataError, atomic_write_bytes, atomic_write_json, atomic_write_parquet
from pipelines.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, DataSpec, Dataset

log = logging.getLogger(__name__)


def load_dataset(spec: DataSpec) -> Dataset:
    """Load and validate the source named by `spec.dataset`.

    Raises:
        ValueError (pipelines.data.io.DataError): a missing column, a wrong dtype or an unreadable file, with
            the file, column and row in the message. Per-record problems never raise: see `Dataset.rejects`.
    """
    if spec.dataset == "synthetic":
        from pipelines.data.synthetic import load_synthetic
        ds = load_synthetic(spec)
    elif spec.dataset == "movielens":
        from pipelines.data.movielens import load_movielens
        ds = load_movielens(spec)
    else:
        from pipelines.data.generic import load_generic
        ds = load_generic(spec)
    log.info("%s: %d items, %d users, %d interactions, %d rejected", ds.name, len(ds.items),
             ds.interactions["user_id"].nunique(), len(ds.interactions), len(ds.rejects))
    return ds


REJECT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}


def rejects_format(path: Path) -> str:
    """The format a rejects path's extension names: csv, parquet or jsonl (DataError for anything else)."""
    suffix = Path(path).suffix.lower()
    if suffix not in REJECT_FORMATS:
        raise DataError(f"--rejects {path}: unsupported extension {suffix or '(none)'!r}; name the file "
                        f"{' / '.join('*' + s for s in REJECT_FORMATS)} to choose the format")
    return REJECT_FORMATS[suffix]


def rejects_summary_path(path: Path) -> Path:
    """`<name>.summary.json` beside the rejects file (rej.csv -> rej.summary.json): never the rejects file itself,
    whose extension can only be one of REJECT_FORMATS."""
    path = Path(path)
    return path.with_name(f"{path.stem}.summary.json")


def write_rejects(dataset: Dataset, path: Path) -> Path:
    """Write the rejects table in the format its extension names (.csv, .parquet, .jsonl), atomically, with the
    reason counts in a `<name>.summary.json` sidecar (see `rejects_summary_path`).

    Raises:
        DataError: any other extension (checked before anything is written).
    """
    path = Path(path)
    fmt = rejects_format(path)
    frame = dataset.rejects
    if fmt == "parquet":
        atomic_write_parquet(path, frame)
    elif fmt == "csv":
        atomic_write_bytes(path, frame.to_csv(index=False).encode("utf-8"))
    else:
        rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False, default=json_default) + "\n" for r in rows)
        atomic_write_bytes(path, text.encode("utf-8"))
    atomic_write_json(rejects_summary_path(path), {
        "dataset": dataset.name, "file": path.name, "format": fmt, "counts": dataset.reject_counts,
        "total": int(len(frame)), "spec": dataset.spec.to_dict() if dataset.spec else None})
    return path


def save_id_maps(dataset: Dataset, folder: Path) -> list[Path]:
    """Write each raw->dense id map as `<folder>/<field>.parquet` (columns raw str, id int64), atomically.

    Pass the folder back as `DataSpec(id_map_dir=...)` to keep the same dense ids on the next load.
    """
    folder = Path(folder)
    written = []
    for field, frame in sorted(dataset.id_maps.items()):
        written.append(atomic_write_parquet(folder / f"{field}.parquet", frame[["raw", "id"]]))
    return written


def load_id_maps(folder: Path) -> dict[str, pd.DataFrame]:
    """Read maps written by `save_id_maps` (missing folder or files -> empty)."""
    folder = Path(folder)
    out = {}
    for field in ("item_id", "user_id"):
        path = folder / f"{field}.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
            if list(frame.columns[:2]) != ["raw", "id"]:
                raise ValueError(f"{path}: not an id map (expected columns raw, id; got {list(frame.columns)})")
            out[field] = frame.astype({"raw": str, "id": "int64"})
    return out


def export_dataset(dataset: Dataset, folder: Path) -> dict:
    """Write a loaded dataset in contract form, readable back with `--dataset generic --mapping <folder>/mapping.json`.

    Files (each written atomically): items.parquet, interactions.parquet, rejects.parquet (+ rejects.summary.json),
    id_maps/*.parquet (string-id sources), mapping.json (columns, attributes, absolute image root), stats.json
    (figures + the DataSpec that produced them).
    Returns:
        {"folder": str, "files": [str, ...]}
    """
    folder = Path(folder)
    items_attrs = [c for c in dataset.items.columns if c not in ITEM_COLUMNS]
    inter_attrs = [c for c in dataset.interactions.columns if c not in INTERACTION_COLUMNS]
    files = [atomic_write_parquet(folder / "items.parquet", dataset.items),
             atomic_write_parquet(folder / "interactions.parquet", dataset.interactions),
             write_rejects(dataset, folder / "rejects.parquet")]
    files += save_id_maps(dataset, folder / "id_maps")
    mapping = {
        "items": {"path": "items.parquet", "attributes": items_attrs},
        "interactions": {"path": "interactions.parquet", "ts_format": "unix", "attributes": inter_attrs},
        "ids": "int",
    }
    if dataset.image_root is not None:
        mapping["image_root"] = str(Path(dataset.image_root).resolve())
    files.append(atomic_write_json(folder / "mapping.json", mapping))
    files.append(atomic_write_json(folder / "stats.json", {**dataset.stats(),
                                                           "spec": dataset.spec.to_dict() if dataset.spec else None}))
    return {"folder": str(folder), "files": [str(f) for f in files]}
