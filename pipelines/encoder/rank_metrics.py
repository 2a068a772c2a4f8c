"""Retrieval metrics: small pure functions over ranks (1 = best)."""
from __future__ import annotations

import numpy as np


def ranks_of_targets(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's target among all candidates.

    Args:
        scores: (Q, N) similarity of each query to each candidate.
        targets: (Q,) column of the true item.
        exclude: (Q,) column to leave out of the ranking (the query item itself), or -1 / None for none.
    Returns:
        (Q,) int64 ranks; ties count against the target (pessimistic), so a constant scorer is not rewarded.
    """
    scores = np.asarray(scores, dtype=np.float64)
    q = np.arange(len(targets))
    target_scores = scores[q, targets]
    better = scores >= target_scores[:, None]  # (Q, N) includes the target itself
    if exclude is not None:
        valid = exclude >= 0
        better[q[valid], exclude[valid]] = False
    return better.sum(axis=1).astype(np.int64)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of queries whose target ranks within the top k."""
    ranks = np.asarray(ranks)
    return float((ranks <= k).mean()) if len(ranks) else float("nan")


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float((1.0 / ranks).mean()) if len(ranks) else float("nan")
