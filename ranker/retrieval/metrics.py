"""Top-K retrieval metrics as small pure functions, and the paired bootstrap interval.

Definitions (the ones of LightGCN / PromptMM's evaluation code, per user, then averaged over users):
- Recall@K = |top-K ∩ relevant| / |relevant|
- NDCG@K   = DCG / IDCG, DCG = Σ_{hit at rank r (1-based) ≤ K} 1 / log2(r + 1),
             IDCG = Σ_{r=1..min(K, |relevant|)} 1 / log2(r + 1)

Example:
    >>> recall_at_k([[3, 1, 7]], [{1, 9}], k=3)     # one of two relevant items retrieved
    array([0.5])
    >>> ndcg_at_k([[3, 1, 7]], [{1, 9}], k=3)       # hit at rank 2: (1/log2 3) / (1 + 1/log2 3)
    array([0.3868...])
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _hits(ranked: np.ndarray, relevant: Sequence, k: int) -> np.ndarray:
    """(U, k) bool: whether the item at each rank is relevant for that user."""
    ranked = np.asarray(ranked)[:, :k]
    out = np.zeros(ranked.shape, dtype=bool)
    for u, rel in enumerate(relevant):
        if len(rel):
            out[u] = np.isin(ranked[u], np.fromiter(rel, dtype=ranked.dtype, count=len(rel)))
    return out


def recall_at_k(ranked, relevant: Sequence, k: int) -> np.ndarray:
    """Per-user Recall@K.

    Args:
        ranked: (U, >=k) item ids (or rows), best first.
        relevant: U collections of relevant ids; a user with none gets NaN.
        k: cut-off.
    Returns:
        (U,) float64.
    """
    hits = _hits(ranked, relevant, k).sum(1).astype(np.float64)
    n_rel = np.array([len(r) for r in relevant], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, hits / np.maximum(n_rel, 1), np.nan)


def ndcg_at_k(ranked, relevant: Sequence, k: int) -> np.ndarray:
    """Per-user NDCG@K with binary relevance. Shapes as recall_at_k; (U,) float64."""
    hits = _hits(ranked, relevant, k)
    discounts = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))       # (k,)
    dcg = (hits * discounts).sum(1)
    n_rel = np.array([len(r) for r in relevant])
    idcg = np.array([discounts[: min(n, hits.shape[1])].sum() for n in n_rel])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)


def paired_bootstrap_ci(diff: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list:
    """Percentile bootstrap interval of the mean paired difference, resampling users.

    Args:
        diff: (S, U) per-seed, per-user differences (row minus baseline, same users and seed); NaN users dropped.
            The same resampled users are used for every seed, so the interval covers user sampling while
            averaging over seeds.
        n_boot: resamples.
    Returns:
        [lo, hi] of mean over seeds of mean over users; [None, None] when there are no users.
    """
    diff = np.atleast_2d(np.asarray(diff, dtype=np.float64))
    diff = diff[:, ~np.isnan(diff).any(0)]
    if diff.shape[1] == 0:
        return [None, None]
    per_user = diff.mean(0)                                            # (U,) mean over seeds
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_user), (n_boot, len(per_user)))
    means = per_user[idx].mean(1)
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))]
