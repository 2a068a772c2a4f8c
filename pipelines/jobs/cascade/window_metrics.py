"""What the driver measures on the staged tables before publishing: codebook quality, and alignment quality on
the protocol's validation and test windows (which no behaviour-learned stage saw).

- ``codes_<enc>``: codebook metrics of the RQ codes (aligned and unaligned encoder).
- ``next_item_<window>_<enc>``: next-item retrieval of the window's positives from each user's previous positive.
- ``coconsumption_<window>_<enc>``: Swing pairs mined *inside* the window only, retrieved over the catalog.
- ``align_valid_<enc>``: the alignment's own validation pairs (later train-portion pairs, looked up in the
  training graph): a training diagnostic, not evidence.

The driver reads only what the workers wrote for it (`pipelines.beam.protocol.WindowEvents`, the work
dir's ``window_events.parquet``): every event of the two windows and each user's last train positive (the query
of that user's first window positive). That is the documented bound: the protocol's last valid_frac + test_frac
of the log plus one row per user; the train portion never reaches the driver.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.beam.cascade_graph import CODES_FILE, EMB_FILE, UNALIGNED, WINDOW_EVENTS
from pipelines.beam.plan import JobPlan

log = logging.getLogger("pipelines.jobs.cascade")

WINDOWS = {"valid": 1, "test": 2}


def window_pairs(interactions: pd.DataFrame, part: np.ndarray, window: int, plan: JobPlan) -> pd.DataFrame:
    """Co-consumption pairs mined inside one window only (Swing over the window's positives)."""
    from dataclasses import replace

    from pipelines.mining.pairs import swing_pairs

    inside = interactions.loc[part == window]
    directed = swing_pairs(inside, replace(plan.pairs, heldout_frac=0.0)) if len(inside) else None
    if directed is None or len(directed) == 0:
        return pd.DataFrame({"left": np.zeros(0, np.int64), "right": np.zeros(0, np.int64)})
    a, b = directed["item"].to_numpy(np.int64), directed["partner"].to_numpy(np.int64)
    return pd.DataFrame({"left": np.minimum(a, b), "right": np.maximum(a, b)}).drop_duplicates(ignore_index=True)


def read_window_events(work_dir: Path) -> pd.DataFrame:
    """The workers' window events (user_id, item_id, ts, label float32, part), in the loader's row order (ts,
    user, item, then the source's row order): the order `next_item_queries` breaks ts ties by."""
    frame = pd.read_parquet(Path(work_dir) / f"{WINDOW_EVENTS}.parquet")
    frame = frame.sort_values(["ts", "user_id", "item_id", "o_file", "o_row"], kind="stable").reset_index(drop=True)
    return frame.astype({"user_id": "int64", "item_id": "int64", "ts": "int64", "label": "float32",
                         "part": "int8"}).drop(columns=["o_file", "o_row"])


def post_metrics(staging: Path, plan: JobPlan, align_valid: pd.DataFrame, windows: pd.DataFrame) -> dict:
    """Metrics of the staged version (see the module docstring).

    Args:
        windows: `read_window_events`: the valid / test events and each user's last train positive, with ``part``.
    """
    from feature_store.tables import read_codes, read_embeddings
    from pipelines.encoder.retrieval_eval import next_item_queries, next_item_recall, pair_retrieval
    from pipelines.beam.job_report import code_metrics
    from safetensors.numpy import load_file

    interactions = windows
    part = windows["part"].to_numpy()
    positive = interactions["label"].to_numpy() >= plan.pairs.positive_label
    queries = {w: next_item_queries(interactions[positive], (part == code)[positive]) for w, code in WINDOWS.items()}
    pairs = {w: window_pairs(interactions, part, code, plan) for w, code in WINDOWS.items()}
    metrics = {"windows": {w: {"events": int((part == code).sum()), "next_item_queries": int(len(queries[w])),
                               "coconsumption_pairs": int(len(pairs[w]))} for w, code in WINDOWS.items()}}
    for suffix, name in (("", "aligned"), (UNALIGNED, "unaligned")):
        emb_file = staging / f"{EMB_FILE}{suffix}.parquet"
        if not emb_file.exists():
            continue
        ids, emb = read_embeddings(emb_file)
        codes = read_codes(staging / f"{CODES_FILE}{suffix}.parquet")
        books = load_file(str(staging / f"codebooks{suffix}.safetensors"))
        sizes = [books[f"rq.level{lvl}"].shape[0] for lvl in range(len(books))]
        metrics[f"codes_{name}"] = code_metrics(codes, sizes)
        metrics[f"align_valid_{name}"] = pair_retrieval(ids, emb, align_valid, ks=(10, 50))
        for window in WINDOWS:
            metrics[f"next_item_{window}_{name}"] = next_item_recall(ids, emb, queries[window], k=(10, 50))
            metrics[f"coconsumption_{window}_{name}"] = pair_retrieval(ids, emb, pairs[window], ks=(10, 50))
    return metrics
