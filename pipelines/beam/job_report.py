"""Driver-side pieces of the cascade: source snapshot + fingerprint, codebook metrics of the staged tables, and the
job summary. Pure functions over files and arrays (no Beam)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd


def snapshot(frame: pd.DataFrame, path: Path) -> Path:
    """Write a source table for the job (with a ``_row`` column: the record's row in the loaded source), atomically.

    Object columns are stored as strings so Parquet types stay stable whatever the source held.
    """
    from feature_store.io import atomic_write_parquet
    import pyarrow as pa

    out = frame.reset_index(drop=True).copy()
    out["_row"] = np.arange(len(out), dtype=np.int64)
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    atomic_write_parquet(path, pa.Table.from_pandas(out, preserve_index=False))
    return path


def fingerprint(*frames: pd.DataFrame) -> str:
    """Content hash of tables (order-sensitive, as loaded), so the config hash changes when the data does."""
    h = hashlib.sha256()
    for frame in frames:
        h.update(",".join(map(str, frame.columns)).encode())
        h.update(pd.util.hash_pandas_object(frame.reset_index(drop=True), index=False).to_numpy().tobytes())
    return h.hexdigest()


def code_metrics(codes, codebook_sizes: list[int]) -> dict:
    """Codebook quality of an RQ code table (quant.metrics)."""
    from quant import metrics as M

    rq = codes.rq
    if len(rq) == 0:
        return {}
    return {
        "items": int(len(rq)),
        "levels": int(rq.shape[1]),
        "codebook_sizes": [int(k) for k in codebook_sizes],
        "unique_codes": M.n_unique_codes(rq),
        "collision_rate": M.collision_rate(rq),
        "items_per_code": M.items_per_code(rq),
        "max_items_per_code": M.max_items_per_code(rq),
        "utilization": [float(u) for u in M.utilization(rq, codebook_sizes)],
        "vq_k": int(codes.vq.shape[1]),
    }


def format_summary(summary: dict) -> str:
    """A human table of the per-stage counts and seconds."""
    lines = [f"{'stage':<24}{'in':>10}{'out':>10}{'rejected':>10}{'seconds':>10}"]
    for stage, s in summary["stages"].items():
        lines.append(f"{stage:<24}{s.get('in', 0):>10}{s.get('out', 0):>10}{s.get('rejected', 0):>10}"
                     f"{s.get('seconds', 0):>10.2f}")
    lines.append(f"dead letter: {json.dumps(summary.get('dead_letter', {}))}")
    trig = (summary.get("metrics") or {}).get("triggers")
    if trig:
        lines.append(f"triggers ({trig['similarity']}, fallback {trig['fallback']}): "
                     + ", ".join(f"{k} {v}" for k, v in trig["by_source"].items()) + f" of {trig['targets']} targets")
    if summary.get("alignment"):
        lines.append(str(summary["alignment"]))
    lines.append(f"published: {summary.get('version')} (store {summary.get('store')})")
    return "\n".join(lines)
