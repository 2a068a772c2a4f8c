"""A small collaborative model for QARM's trigger similarity: implicit-feedback matrix factorisation (iALS).

QARM picks a target's trigger as the most similar of the user's last 50 positives by the item vectors of its
retrieval models. Until the retrieval student exists, this module gives such vectors from the train portion's
positives alone: implicit ALS (Hu, Koren, Volinsky 2008) with confidence ``c = 1 + alpha`` on every observed
(user, item) positive and 0-preference, confidence-1 on everything else, L2 regularisation ``reg``::

    x_u = (YᵀY + (c-1) Σ_{i∈I_u} y_i y_iᵀ + reg·I)⁻¹ · c Σ_{i∈I_u} y_i        (every user, items fixed)
    y_i = (XᵀX + (c-1) Σ_{u∈U_i} x_u x_uᵀ + reg·I)⁻¹ · c Σ_{u∈U_i} x_u        (every item, users fixed)

Every sum is a fixed-point integer sum (``FIXED_BITS`` fractional bits, int64), so it is exact and independent of
the order the terms arrive in: the Beam path (`pipelines.beam.collab_vectors`, sums as combiners) and this numpy
reference give bit-identical vectors on any runner and any number of workers. Initial item vectors come from a
seeded hash of the item id (no arrival-order randomness). Items with fewer than ``min_count`` training
positives get no vector (their triggers fall back to the next similarity source).

Memory per key is one (d, d) + (d,) accumulator whatever the item's popularity; the global Gram matrices are one
(d, d) accumulator each.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

FIXED_BITS = 14  # fractional bits of the fixed-point sums
CLIP = 64.0  # vectors are clipped to [-CLIP, CLIP] before summing: 2*(14+6) bits + 20 bits of terms < 63 bits


@dataclass(frozen=True)
class CollabConfig:
    """The collaborative model of the trigger similarity.

    Args:
        dim: factor size d.
        iterations: ALS sweeps (users then items).
        reg: L2 regularisation.
        alpha: confidence of an observed positive is 1 + alpha.
        min_count: items with fewer training positives get no vector.
        seed: seed of the initial item vectors.
    """

    dim: int = 32
    iterations: int = 4
    reg: float = 0.1
    alpha: float = 10.0
    min_count: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "iterations", "min_count"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CollabConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.reg > 0:
            raise ValueError(f"CollabConfig.reg must be > 0, got {self.reg}")
        if not self.alpha >= 0:
            raise ValueError(f"CollabConfig.alpha must be >= 0, got {self.alpha}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ kernels


def to_fixed(v: np.ndarray) -> np.ndarray:
    """float vector -> int64 fixed point (clipped). (d,) -> (d,)"""
    return np.round(np.clip(np.asarray(v, np.float64), -CLIP, CLIP) * (1 << FIXED_BITS)).astype(np.int64)


def zero_acc(dim: int) -> list:
    """[outer sum (d, d) int64, vector sum (d,) int64, count]."""
    return [np.zeros((dim, dim), np.int64), np.zeros(dim, np.int64), 0]


def add_term(acc: list, v: np.ndarray) -> list:
    return add_fixed(acc, to_fixed(v))


def add_fixed(acc: list, q: np.ndarray) -> list:
    """Add one already fixed-point vector (`to_fixed`) to an accumulator (the Beam path converts once per key)."""
    acc[0] += np.multiply.outer(q, q)
    acc[1] += q
    acc[2] += 1
    return acc


def add_block(acc: list, q: np.ndarray) -> list:
    """Add a block of fixed-point vectors (`to_fixed` rows, (n, d) int32 or int64) at once: exact, the same sums
    as n `add_fixed` calls (integer arithmetic has no rounding)."""
    q = np.asarray(q, np.int64)
    acc[0] += q.T @ q
    acc[1] += q.sum(axis=0)
    acc[2] += len(q)
    return acc


def merge_accs(accs, dim: int) -> list:
    out = zero_acc(dim)
    for a in accs:
        out[0] += a[0]
        out[1] += a[1]
        out[2] += a[2]
    return out


def solve(acc: list, gram: list, cfg: CollabConfig) -> np.ndarray:
    """One ALS solve from a key's exact sums and the other side's Gram accumulator. Returns (d,) float32."""
    return solve_batch(acc[0][None], acc[1][None], gram, cfg)[0]


def solve_batch(outer: np.ndarray, vec: np.ndarray, gram: list, cfg: CollabConfig) -> np.ndarray:
    """`solve` for k keys at once (numpy solves each matrix on its own: the same bits as k `solve` calls).

    Args:
        outer: (k, d, d) int64 fixed-point sums of outer products; vec: (k, d) int64 fixed-point vector sums.
        gram: the other side's Gram accumulator (`zero_acc` layout).
    Returns:
        (k, d) float32.
    """
    scale2 = float(1 << (2 * FIXED_BITS))
    a = gram[0] / scale2 + cfg.alpha * (outer / scale2) + cfg.reg * np.eye(cfg.dim)
    b = (1.0 + cfg.alpha) * (vec / float(1 << FIXED_BITS))
    return np.linalg.solve(a, b[..., None])[..., 0].astype(np.float32)


def init_vector(item_id: int, cfg: CollabConfig) -> np.ndarray:
    """Initial item vector from a seeded hash of the id: N(0, 0.1²)^d, the same on every runner."""
    digest = hashlib.blake2b(f"collab:{cfg.seed}:{int(item_id)}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return (0.1 * rng.standard_normal(cfg.dim)).astype(np.float32)


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


# ------------------------------------------------------------------------------------------- numpy reference


def fit_item_vectors(user_item: np.ndarray, cfg: CollabConfig) -> dict[int, np.ndarray]:
    """iALS over distinct (user, item) positives; the reference of the Beam transform (identical output).

    Args:
        user_item: (N, 2) int64 distinct (user_id, item_id) training positives.
        cfg: CollabConfig.
    Returns:
        item_id -> (d,) float32 unit vector, for items with >= min_count positives.
    """
    ui = np.unique(np.asarray(user_item, np.int64).reshape(-1, 2), axis=0)
    items, counts = np.unique(ui[:, 1], return_counts=True)
    kept = set(items[counts >= cfg.min_count].tolist())
    ui = ui[np.isin(ui[:, 1], list(kept))] if kept else ui[:0]
    y = {int(i): init_vector(int(i), cfg) for i in sorted(kept)}
    by_user: dict[int, list[int]] = {}
    by_item: dict[int, list[int]] = {}
    for u, i in ui.tolist():
        by_user.setdefault(u, []).append(i)
        by_item.setdefault(i, []).append(u)
    for _ in range(cfg.iterations):
        gram_y = merge_accs([add_term(zero_acc(cfg.dim), v) for v in y.values()], cfg.dim)
        x = {}
        for u, its in by_user.items():
            acc = zero_acc(cfg.dim)
            for i in its:
                add_term(acc, y[i])
            x[u] = solve(acc, gram_y, cfg)
        gram_x = merge_accs([add_term(zero_acc(cfg.dim), v) for v in x.values()], cfg.dim)
        for i, users in by_item.items():
            acc = zero_acc(cfg.dim)
            for u in users:
                add_term(acc, x[u])
            y[i] = solve(acc, gram_x, cfg)
    return {i: normalise(v) for i, v in y.items()}
