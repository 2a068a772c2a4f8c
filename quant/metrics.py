"""Codebook and semantic-ID metrics: small pure functions over numpy arrays.

Shapes: x (N, d) embeddings, x_hat (N, d) reconstructions, codes (N, L) integer codes.
"""
from __future__ import annotations

import math

import numpy as np

from quant.collisions import collision_groups


def _codes2d(codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.ndim != 2:
        raise ValueError(f"codes: expected (N, L), got shape {codes.shape}")
    return codes


def _group_sizes(codes: np.ndarray) -> np.ndarray:
    """(N,) size of the group of rows sharing each row's full code."""
    order, rank = collision_groups(codes)
    n = codes.shape[0]
    starts = np.flatnonzero(rank == 0)
    sizes_sorted = np.repeat(np.diff(np.append(starts, n)), np.diff(np.append(starts, n)))
    sizes = np.empty(n, dtype=np.int64)
    sizes[order] = sizes_sorted
    return sizes


def n_unique_codes(codes) -> int:
    """Number of distinct full codes."""
    codes = _codes2d(codes)
    if codes.shape[0] == 0:
        return 0
    _, rank = collision_groups(codes)
    return int((rank == 0).sum())


def collision_rate(codes) -> float:
    """Share of items whose full code is shared with at least one other item."""
    codes = _codes2d(codes)
    if codes.shape[0] == 0:
        return 0.0
    return float((_group_sizes(codes) > 1).mean())


def items_per_code(codes) -> float:
    """Mean number of items per distinct (used) full code: N / #unique codes (1.0 means no collisions)."""
    codes = _codes2d(codes)
    if codes.shape[0] == 0:
        return 0.0
    return codes.shape[0] / n_unique_codes(codes)


def max_items_per_code(codes) -> int:
    """Size of the largest group of items sharing one full code."""
    codes = _codes2d(codes)
    return int(_group_sizes(codes).max()) if codes.shape[0] else 0


def _sizes_per_level(codes: np.ndarray, codebook_size) -> list[int]:
    if codebook_size is None:
        return [int(codes[:, level].max()) + 1 for level in range(codes.shape[1])]
    if np.isscalar(codebook_size):
        return [int(codebook_size)] * codes.shape[1]
    sizes = [int(k) for k in codebook_size]
    if len(sizes) != codes.shape[1]:
        raise ValueError(f"codebook_size has {len(sizes)} entries for {codes.shape[1]} levels")
    return sizes


def utilization(codes, codebook_size) -> list[float]:
    """Per level: share of the K_l centroids used by at least one item."""
    codes = _codes2d(codes)
    sizes = _sizes_per_level(codes, codebook_size)
    return [float(np.unique(codes[:, level]).size / k) for level, k in enumerate(sizes)]


def entropy(codes, codebook_size=None, *, normalized: bool = False) -> list[float]:
    """Per level: Shannon entropy (bits) of the code distribution; ``normalized`` divides by log2(K_l)."""
    codes = _codes2d(codes)
    out = []
    sizes = _sizes_per_level(codes, codebook_size) if (normalized or codebook_size is not None) else None
    for level in range(codes.shape[1]):
        _, counts = np.unique(codes[:, level], return_counts=True)
        p = counts / counts.sum()
        h = float(-(p * np.log2(p)).sum())
        if normalized:
            h = h / math.log2(sizes[level]) if sizes[level] > 1 else 0.0
        out.append(h + 0.0)
    return out


def rel_mse(x, x_hat) -> float:
    """Reconstruction error relative to the data's variance: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    if x.shape != x_hat.shape:
        raise ValueError(f"x {x.shape} and x_hat {x_hat.shape} differ in shape")
    total = ((x - x.mean(axis=0)) ** 2).sum()
    err = ((x - x_hat) ** 2).sum()
    if total == 0:
        return 0.0 if err == 0 else math.inf
    return float(err / total)


def hr_at_k(x, x_hat, k=(1, 10), *, metric: str = "ip", queries=None, chunk_rows: int = 4096):
    """Hit rate: does item i's decoded vector retrieve item i among the top k of all items?

    The rank of item i is the number of items j scoring strictly higher than i against x_hat[i] (ties count in
    the item's favour, so duplicates of its own vector do not hurt it).

    Args:
        x: (N, d) original item vectors (the retrieval corpus).
        x_hat: (N, d) decoded vectors (the queries).
        k: an int or a tuple of ints.
        metric: 'ip' (inner product, the aligned space's metric) or 'l2'.
        queries: optional (Q,) item rows to evaluate (a sample for large catalogs); default all.
        chunk_rows: query rows per block.

    Returns:
        float for an int k, else {k: float}.
    """
    x = np.asarray(x, dtype=np.float32)
    x_hat = np.asarray(x_hat, dtype=np.float32)
    if x.shape != x_hat.shape:
        raise ValueError(f"x {x.shape} and x_hat {x_hat.shape} differ in shape")
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    ks = (k,) if np.isscalar(k) else tuple(k)
    rows = np.arange(x.shape[0]) if queries is None else np.asarray(queries, dtype=np.int64)
    half_sq = 0.5 * np.einsum("nd,nd->n", x, x)  # (N,)
    ranks = np.empty(rows.size, dtype=np.int64)
    for start in range(0, rows.size, chunk_rows):
        q_rows = rows[start:start + chunk_rows]
        scores = x_hat[q_rows] @ x.T  # (Q, N)
        if metric == "l2":  # -||q - x||^2 / 2 up to a per-query constant
            scores -= half_sq[None, :]
        own = scores[np.arange(q_rows.size), q_rows]  # (Q,)
        ranks[start:start + q_rows.size] = (scores > own[:, None]).sum(axis=1)
    hits = {kk: float((ranks < kk).mean()) if rows.size else 0.0 for kk in ks}
    return hits[ks[0]] if np.isscalar(k) else hits


def prefix_consistency(x, codes) -> list[float]:
    """For prefix length l = 1..L: mean cosine similarity over all item pairs that share their first l codes.

    Exact and O(N d) per level: for a group with unit vectors u_i and sum S, the pairwise cosines add up to
    (||S||^2 - n) / 2 over n (n - 1) / 2 pairs. A level with no sharing pair gives NaN.
    """
    codes = _codes2d(codes)
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] != codes.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows, codes {codes.shape[0]}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.where(norms == 0, 1.0, norms)
    sq = (u * u).sum(axis=1)  # 1, or 0 for a zero vector
    out = []
    for length in range(1, codes.shape[1] + 1):
        order, rank = collision_groups(codes[:, :length])
        group = np.cumsum(rank == 0) - 1  # (N,) group id in sorted order
        n_groups = int(group[-1]) + 1
        sums = np.zeros((n_groups, x.shape[1]))
        _segment_sum(sums, group, u[order])
        sizes = np.bincount(group, minlength=n_groups).astype(np.float64)
        sq_sum = np.bincount(group, weights=sq[order], minlength=n_groups)
        pair_cos = ((sums * sums).sum(axis=1) - sq_sum) / 2.0
        pairs = sizes * (sizes - 1) / 2.0
        total_pairs = pairs.sum()
        out.append(float(pair_cos.sum() / total_pairs) if total_pairs > 0 else float("nan"))
    return out


def _segment_sum(out: np.ndarray, group_sorted: np.ndarray, values: np.ndarray) -> None:
    starts = np.flatnonzero(np.r_[True, group_sorted[1:] != group_sorted[:-1]])
    out[group_sorted[starts]] = np.add.reduceat(values, starts, axis=0)


def churn(codes_a, codes_b) -> float:
    """Share of items whose full code differs between two assignments of the same items (row-aligned)."""
    a, b = _codes2d(codes_a), _codes2d(codes_b)
    if a.shape != b.shape:
        raise ValueError(f"code tables differ in shape: {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        return 0.0
    return float((a != b).any(axis=1).mean())


def nmi(labels_a, labels_b) -> float:
    """Normalised mutual information (arithmetic-mean normalisation): I(A;B) / ((H(A) + H(B)) / 2)."""
    a = np.asarray(labels_a).ravel()
    b = np.asarray(labels_b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        return 0.0
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    p = joint / a.size
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    ha = float(-(pa * np.log(pa)).sum())
    hb = float(-(pb * np.log(pb)).sum())
    if ha + hb == 0:
        return 1.0  # both constant: identical partitions
    return max(0.0, mi / ((ha + hb) / 2.0))
