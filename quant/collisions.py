"""Collision resolution: an extra suffix level that makes every item's full code unique (TIGER / GRID style).

Vectorised: one stable sort on a packed int64 key (or lexsort when the code space does not fit in 63 bits),
then the rank of each item within its run of equal codes. A million items take well under a second.
"""
from __future__ import annotations

import numpy as np

from quant.kmeans import group_rank


class CollisionOverflowError(ValueError):
    """More items share one code than the suffix level can tell apart."""


def _pack_key(codes: np.ndarray) -> np.ndarray | None:
    """Pack (N, L) non-negative codes into one int64 per row when the mixed-radix space fits; else None."""
    radices = codes.max(axis=0).astype(np.int64) + 1  # (L,)
    bits = np.ceil(np.log2(np.maximum(radices, 2))).astype(int)
    if bits.sum() > 62:
        return None
    key = np.zeros(codes.shape[0], dtype=np.int64)
    for level in range(codes.shape[1]):
        key = (key << np.int64(bits[level])) | codes[:, level].astype(np.int64)
    return key


def collision_groups(codes) -> tuple[np.ndarray, np.ndarray]:
    """Sort order and within-group rank for (N, L) codes.

    Returns:
        order (N,) int64: rows sorted by code (ties in row order);
        rank (N,) int64: for row order[i], its position among the rows sharing its code.
    """
    codes = np.asarray(codes)
    key = _pack_key(codes)
    if key is not None:
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        return order, group_rank(sorted_key)
    order = np.lexsort(codes.T[::-1])
    sorted_codes = codes[order]
    change = np.ones(codes.shape[0], dtype=bool)
    change[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    group_id = np.cumsum(change) - 1
    return order, group_rank(group_id)


def resolve_collisions(codes, suffix_size: int | None = None, *, priority=None) -> np.ndarray:
    """Append a suffix level so every full code is unique.

    Items sharing a code get suffixes 0, 1, 2, ... in ``priority`` order (lower first; e.g. the distance to the
    decoded centroid, so the most typical item keeps suffix 0), ties and the default in row order.

    Args:
        codes: (N, L) non-negative integer codes.
        suffix_size: size of the suffix codebook (the ranker's table size for that level); None means "as large
            as the biggest collision group".
        priority: optional (N,) sort key within a collision group.

    Returns:
        (N, L + 1) codes of the input's integer dtype (int32 widened to int64 if the suffix needs it).

    Raises:
        CollisionOverflowError: a code is shared by more than ``suffix_size`` items (names the code and count).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes: expected (N, L), got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    n = codes.shape[0]
    if n == 0:
        return np.zeros((0, codes.shape[1] + 1), dtype=codes.dtype)
    if (codes < 0).any():
        row = int(np.flatnonzero((codes < 0).any(axis=1))[0])
        raise ValueError(f"codes: row {row} has a negative code {codes[row].tolist()}")
    if priority is not None:
        priority = np.asarray(priority)
        if priority.shape != (n,):
            raise ValueError(f"priority has shape {priority.shape}, expected ({n},)")
        pre = np.argsort(priority, kind="stable")
        order, rank = collision_groups(codes[pre])
        order = pre[order]
    else:
        order, rank = collision_groups(codes)
    suffix = np.empty(n, dtype=np.int64)
    suffix[order] = rank
    largest = int(rank.max()) + 1
    if suffix_size is not None and largest > suffix_size:
        worst = int(order[np.argmax(rank)])
        n_over = int((rank >= suffix_size).sum())
        raise CollisionOverflowError(
            f"suffix space overflow: code {codes[worst].tolist()} is shared by {largest} items but suffix_size is "
            f"{suffix_size}; {n_over} item(s) cannot get a unique code. Raise suffix_size (>= {largest}) or use "
            f"more/larger levels")
    dtype = codes.dtype if np.iinfo(codes.dtype).max >= largest else np.int64
    return np.concatenate([codes.astype(dtype, copy=False), suffix[:, None].astype(dtype)], axis=1)
