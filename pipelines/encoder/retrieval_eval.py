"""How well item vectors retrieve behaviour they never saw: held-out pair retrieval and next-item retrieval, each
query ranked over the whole catalog."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.encoder.rank_metrics import mean_reciprocal_rank, ranks_of_targets, recall_at_k


def pair_retrieval(item_ids: np.ndarray, emb: np.ndarray, pairs: pd.DataFrame, ks=(10, 50),
                   both_directions: bool = True, chunk: int = 2048, return_ranks: bool = False) -> dict:
    """Recall@k and MRR of held-out pairs by cosine retrieval over every catalog item (the query excluded).

    Args:
        item_ids: (N,) catalog ids, rows of ``emb``.
        emb: (N, D) L2-normalised embeddings.
        pairs: DataFrame with ``left`` / ``right`` item ids. Pairs are unordered, so by default both directions
            are queries (left -> right and right -> left).
        ks: cut-offs for recall.
        return_ranks: also return each query's 1-based rank (``"ranks"`` (n_queries,) int64; paired tests).
    Returns:
        {"n_queries", "n_pairs_skipped" (an item not in the catalog), "recall@k"..., "mrr"}.
    """
    row = pd.Series(np.arange(len(item_ids)), index=np.asarray(item_ids, dtype=np.int64))
    left = row.reindex(pairs["left"].to_numpy(np.int64)).to_numpy()
    right = row.reindex(pairs["right"].to_numpy(np.int64)).to_numpy()
    ok = ~(np.isnan(left) | np.isnan(right))
    left, right = left[ok].astype(np.int64), right[ok].astype(np.int64)
    queries, targets = (np.concatenate([left, right]), np.concatenate([right, left])) if both_directions \
        else (left, right)
    ranks = np.zeros(len(queries), dtype=np.int64)
    emb = np.asarray(emb, dtype=np.float32)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        scores = emb[q] @ emb.T  # (q, N)
        ranks[start:start + chunk] = ranks_of_targets(scores, targets[start:start + chunk], exclude=q)
    out = {"n_queries": int(len(queries)), "n_pairs_skipped": int((~ok).sum())}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
    out["mrr"] = mean_reciprocal_rank(ranks)
    return {**out, "ranks": ranks} if return_ranks else out


def next_item_queries(positives: pd.DataFrame, test_mask: np.ndarray) -> pd.DataFrame:
    """(query, target) per test-window positive: the query is the same user's previous positive (any window).

    Args:
        positives: user_id, item_id, ts of positive interactions (all windows).
        test_mask: (len(positives),) bool, True for rows in the test window.
    Returns:
        DataFrame query, target (item ids); test positives without an earlier positive, or repeating it, are left
        out. Ties in ts keep the input order.
    """
    frame = positives[["user_id", "item_id", "ts"]].copy()
    frame["is_test"] = np.asarray(test_mask, dtype=bool)
    frame["order"] = np.arange(len(frame))
    frame = frame.sort_values(["user_id", "ts", "order"], kind="stable")
    frame["query"] = frame.groupby("user_id")["item_id"].shift(1)
    rows = frame[frame["is_test"] & frame["query"].notna()]
    rows = rows[rows["query"].astype(np.int64) != rows["item_id"]]
    return pd.DataFrame({"query": rows["query"].astype(np.int64).to_numpy(),
                         "target": rows["item_id"].to_numpy(np.int64)})


def next_item_recall(item_ids: np.ndarray, emb: np.ndarray, queries: pd.DataFrame, k=10,
                     chunk: int = 2048, return_ranks: bool = False) -> dict:
    """Recall@k (and MRR) of next-item retrieval: rank the catalog (the query excluded) by cosine to the query item.

    Args:
        item_ids (N,), emb (N, D) L2-normalised: the catalog.
        queries: DataFrame query, target (``next_item_queries``); rows naming items outside the catalog are
            skipped and counted.
        k: a cut-off or a tuple of them.
        return_ranks: also return each kept query's 1-based rank (``"ranks"`` (n_queries,) int64; paired tests).
    Returns:
        {"recall@k" for each k, "mrr", "n_queries", "n_skipped"}; None for the metrics when there is no query.
    """
    ks = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
    row = pd.Series(np.arange(len(item_ids)), index=np.asarray(item_ids, dtype=np.int64))
    q = row.reindex(queries["query"].to_numpy(np.int64)).to_numpy()
    t = row.reindex(queries["target"].to_numpy(np.int64)).to_numpy()
    ok = ~(np.isnan(q) | np.isnan(t))
    q, t = q[ok].astype(np.int64), t[ok].astype(np.int64)
    emb = np.asarray(emb, dtype=np.float32)
    ranks = np.zeros(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        qs = q[start:start + chunk]
        ranks[start:start + chunk] = ranks_of_targets(emb[qs] @ emb.T, t[start:start + chunk], exclude=qs)
    out = {f"recall@{c}": recall_at_k(ranks, c) if len(ranks) else None for c in ks}
    out["mrr"] = mean_reciprocal_rank(ranks) if len(ranks) else None
    out = {**out, "n_queries": int(len(q)), "n_skipped": int((~ok).sum())}
    return {**out, "ranks": ranks} if return_ranks else out
