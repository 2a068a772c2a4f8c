"""Held-out pair retrieval: for each held-out pair, rank the partner among the whole catalog."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.mllm.metrics import mean_reciprocal_rank, ranks_of_targets, recall_at_k


def pair_retrieval(item_ids: np.ndarray, emb: np.ndarray, pairs: pd.DataFrame, ks=(10, 50),
                   both_directions: bool = True, chunk: int = 2048) -> dict:
    """Recall@k and MRR of held-out pairs by cosine retrieval over every catalog item (the query excluded).

    Args:
        item_ids: (N,) catalog ids, rows of ``emb``.
        emb: (N, D) L2-normalised embeddings.
        pairs: DataFrame with ``left`` / ``right`` item ids. Pairs are unordered, so by default both directions
            are queries (left -> right and right -> left).
        ks: cut-offs for recall.
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
    return out
