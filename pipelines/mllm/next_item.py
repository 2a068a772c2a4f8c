"""Next-item retrieval: an alignment evaluation that does not favour the aligned encoder by construction.

For each positive event of an evaluation window, the query is the user's previous positive item(s) (any time
before the event), the candidates are the whole catalog, and the target is the event's item. Unlike held-out
pairs looked up in the training-period co-occurrence graph, nothing here was mined from the data alignment
trained on: the aligned encoder wins only if its space predicts what a user consumes next.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.mllm.metrics import mean_reciprocal_rank, ranks_of_targets, recall_at_k


def next_item_queries(interactions: pd.DataFrame, window: np.ndarray, history: int = 1,
                      positive_label: float = 0.5) -> pd.DataFrame:
    """(query items, target) per positive event of the window.

    Args:
        interactions: contract interactions (user_id, item_id, ts, label), any order.
        window: (N,) bool, aligned with ``interactions``: the events to evaluate.
        history: how many previous positives of the user form the query (their embeddings are averaged).
    Returns:
        DataFrame user_id, target, queries (tuple of item ids, most recent last); events without a previous
        positive, or whose target equals the last previous item (a repeat), are left out.
    """
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    pos = interactions.assign(_eval=np.asarray(window, bool))
    pos = pos[pos["label"] >= positive_label].sort_values(["user_id", "ts"], kind="stable")
    users = pos["user_id"].to_numpy()
    items = pos["item_id"].to_numpy(np.int64)
    in_window = pos["_eval"].to_numpy()
    rows = []
    start = 0
    for end in np.r_[np.flatnonzero(users[1:] != users[:-1]) + 1, len(users)]:
        for i in np.flatnonzero(in_window[start:end]) + start:
            if i == start:
                continue
            prev = items[max(start, i - history):i]
            if prev[-1] == items[i]:
                continue
            rows.append((int(users[i]), int(items[i]), tuple(int(x) for x in prev)))
        start = end
    return pd.DataFrame(rows, columns=["user_id", "target", "queries"])


def next_item_retrieval(item_ids: np.ndarray, emb: np.ndarray, queries: pd.DataFrame, ks=(10, 50),
                        max_queries: int | None = 20000, seed: int = 0, chunk: int = 1024) -> dict:
    """Recall@k and MRR of each query's next item among the whole catalog (the query's own items excluded).

    Args:
        item_ids: (N,) catalog ids, rows of ``emb``.
        emb: (N, D) embeddings (L2-normalised: the query is the normalised mean of its items).
        queries: next_item_queries output.
        max_queries: evaluate a fixed-seed sample of at most this many queries (None: all).
    Returns:
        {"n_queries", "n_skipped" (an item without an embedding), "recall@k"..., "mrr"}.
    """
    row = pd.Series(np.arange(len(item_ids)), index=np.asarray(item_ids, dtype=np.int64))
    if max_queries is not None and len(queries) > max_queries:
        queries = queries.sample(n=max_queries, random_state=seed)
    emb = np.asarray(emb, dtype=np.float32)
    q_rows, targets, last = [], [], []
    skipped = 0
    for target, items in zip(queries["target"].to_numpy(), queries["queries"]):
        rows = row.reindex(list(items)).to_numpy()
        t = row.get(int(target))
        if t is None or np.isnan(rows).any():
            skipped += 1
            continue
        q_rows.append(rows.astype(np.int64))
        targets.append(int(t))
        last.append(int(rows[-1]))
    out = {"n_queries": len(targets), "n_skipped": skipped}
    if not targets:
        return {**out, **{f"recall@{k}": None for k in ks}, "mrr": None}
    targets, last = np.asarray(targets), np.asarray(last)
    ranks = np.zeros(len(targets), dtype=np.int64)
    for s in range(0, len(targets), chunk):
        part = q_rows[s:s + chunk]
        q = np.stack([emb[r].mean(axis=0) for r in part])
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores = q @ emb.T  # (c, N)
        for j, r in enumerate(part):  # every query item is excluded (the last one through ``exclude``)
            scores[j, r[:-1]] = -np.inf
        ranks[s:s + chunk] = ranks_of_targets(scores, targets[s:s + chunk], exclude=last[s:s + chunk])
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
    out["mrr"] = mean_reciprocal_rank(ranks)
    return out
