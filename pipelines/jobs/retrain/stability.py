"""Code stability across a retrain: who keeps its code, when the codebooks are refit, and churn by item group.

The candidate the cascade builds re-embeds every item and re-fits the RQ codebooks (warm-started from the
parent's). Published as is, a small encoder move changes most full codes. This module decides the codes that
are published instead:

- an item of the parent whose embedding moved less than ``move_threshold`` (relative L2,
  ``|e_new - e_old| / |e_old|``) keeps its parent code;
- moved items and new items are encoded against the parent's codebooks (the warm start, no further k-means);
- only when the drift metric passes ``refit_drift`` are the refit codebooks (the cascade's, warm-started from the
  parent's) and their codes published for every item. Drift = the relative increase of the quantization error
  (rel MSE) of the candidate embeddings under the parent's codebooks and the stable codes, over the parent's
  own rel MSE.

Churn is reported for three groups defined by the data, not by the threshold: ``unchanged`` (in the parent, no
interaction in (since, until]), ``touched`` (in the parent, with an interaction there) and ``new`` (not in the
parent; their churn is against nothing, so it is reported as the share encoded, always 1, plus their count).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

GROUPS = ("unchanged", "touched", "new")


@dataclass(frozen=True)
class StabilityConfig:
    """Args:
        move_threshold: relative L2 move below which an item keeps its parent code (0: nobody keeps; every
            item is re-encoded against the parent's codebooks).
        refit_drift: relative rel-MSE increase above which the refit codebooks are published (None: never refit,
            0.0: always refit, the cascade's codes as they are).
    """

    move_threshold: float = 0.1
    refit_drift: float | None = 2.0

    def __post_init__(self):
        if self.move_threshold < 0:
            raise ValueError(f"StabilityConfig.move_threshold must be >= 0, got {self.move_threshold}")
        if self.refit_drift is not None and self.refit_drift < 0:
            raise ValueError(f"StabilityConfig.refit_drift must be >= 0 or None, got {self.refit_drift}")


def item_groups(parent_ids: np.ndarray, item_ids: np.ndarray, interactions: pd.DataFrame, since: int,
                until: int) -> dict:
    """{group: sorted item ids} for the items of the new version (see the module docstring).

    Args:
        parent_ids: (P,) items of the parent version.
        item_ids: (N,) items of the new version.
        interactions: the log (user_id, item_id, ts, label); events in (since, until] count as new behaviour.
    """
    item_ids = np.unique(np.asarray(item_ids, np.int64))
    ts = interactions["ts"].to_numpy()
    active = np.unique(interactions["item_id"].to_numpy(np.int64)[(ts > since) & (ts <= until)])
    in_parent = np.isin(item_ids, parent_ids)
    touched = np.isin(item_ids, active)
    return {"unchanged": item_ids[in_parent & ~touched], "touched": item_ids[in_parent & touched],
            "new": item_ids[~in_parent]}


def _align(ids_a, rows_a, ids_b):
    """rows_a reordered to ids_b (ids_b must be a subset of ids_a, both unique)."""
    pos = np.searchsorted(ids_a, ids_b)
    if len(ids_b) and (pos.max() >= len(ids_a) or not np.array_equal(ids_a[pos], ids_b)):
        raise ValueError("stability: item ids are not a subset of the other version's")
    return rows_a[pos]


def rel_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    """sum |x - x_hat|^2 / sum |x|^2 (0 for perfect reconstruction)."""
    den = float((x.astype(np.float64) ** 2).sum())
    return float(((x.astype(np.float64) - x_hat) ** 2).sum() / den) if den else 0.0


def decode(codes: np.ndarray, books: list) -> np.ndarray:
    """(N, L) codes -> (N, d) sum of the chosen centroids."""
    out = np.zeros((len(codes), books[0].shape[1]), np.float64)
    for level, book in enumerate(books):
        out += np.asarray(book, np.float64)[codes[:, level]]
    return out


def stable_codes(parent_ids, parent_emb, parent_rq, parent_books, cand_ids, cand_emb, cand_rq, cand_books,
                 cfg: StabilityConfig) -> dict:
    """The codes to publish (see the module docstring).

    Args:
        parent_ids (P,), parent_emb (P, d), parent_rq (P, L): the parent's items (sorted ids), embeddings, codes.
        parent_books: L arrays (K, d), the parent's codebooks.
        cand_ids (N,), cand_emb (N, d), cand_rq (N, L): the candidate's (sorted ids), from the cascade.
        cand_books: L arrays (K, d), the candidate's refit (warm-started) codebooks.
    Returns:
        dict: ``rq`` (N, L) int32 codes for cand_ids, ``refit`` bool (publish cand_books), ``kept`` (N,) bool
        (kept the parent code), ``moved`` share of common items over the threshold, ``move`` quantiles, drift.
    """
    from quant.rq_kmeans import residual_encode

    parent_ids, cand_ids = np.asarray(parent_ids, np.int64), np.asarray(cand_ids, np.int64)
    common = np.isin(cand_ids, parent_ids)  # (N,)
    old_emb = _align(parent_ids, parent_emb, cand_ids[common])  # (M, d)
    old_rq = _align(parent_ids, parent_rq, cand_ids[common])  # (M, L)
    move = np.linalg.norm(cand_emb[common] - old_emb, axis=1) / np.maximum(np.linalg.norm(old_emb, axis=1), 1e-12)
    keep_common = move < cfg.move_threshold  # (M,)
    kept = np.zeros(len(cand_ids), bool)
    kept[np.flatnonzero(common)[keep_common]] = True
    books = [np.asarray(b, np.float32) for b in parent_books]
    rq = np.empty((len(cand_ids), len(books)), np.int32)
    rq[np.flatnonzero(common)[keep_common]] = old_rq[keep_common]
    if (~kept).any():
        rq[~kept] = residual_encode(np.ascontiguousarray(cand_emb[~kept], np.float32), books)
    parent_err = rel_mse(parent_emb, decode(parent_rq, books))
    stable_err = rel_mse(cand_emb, decode(rq, books))
    drift = (stable_err / parent_err - 1.0) if parent_err > 0 else (0.0 if stable_err == 0 else float("inf"))
    refit = cfg.refit_drift is not None and drift > cfg.refit_drift
    if refit:
        rq = np.asarray(cand_rq, np.int32)
        kept = np.zeros(len(cand_ids), bool)
    qs = np.quantile(move, [0.1, 0.5, 0.9]).tolist() if len(move) else [None] * 3
    return {"rq": rq, "refit": bool(refit), "kept": kept,
            "summary": {"refit": bool(refit), "drift": float(drift), "parent_rel_mse": parent_err,
                        "stable_rel_mse": stable_err,
                        "refit_rel_mse": rel_mse(cand_emb, decode(np.asarray(cand_rq), cand_books)),
                        "moved_share": float((~keep_common).mean()) if len(move) else None,
                        "move_p10_p50_p90": qs, "kept_items": int(kept.sum()), "common_items": int(common.sum()),
                        "move_threshold": cfg.move_threshold, "refit_drift": cfg.refit_drift}}


def churn_by_group(parent_ids, parent_rq, new_ids, new_rq, groups: dict) -> dict:
    """Full-code and level-0 churn of each group's items against the parent (``new``: count only).

    Returns:
        {group: {"items": n, "code_churn": share whose full code changed, "level0_churn": ...}}; churn is None
        for an empty group and for ``new``.
    """
    out = {}
    new_ids = np.asarray(new_ids, np.int64)
    for name in GROUPS:
        ids = np.asarray(groups[name], np.int64)
        row = {"items": int(len(ids)), "code_churn": None, "level0_churn": None}
        if name != "new" and len(ids):
            old = _align(np.asarray(parent_ids, np.int64), parent_rq, ids)
            new = _align(new_ids, new_rq, ids)
            changed = old != new  # (n, L)
            row["code_churn"] = float(changed.any(axis=1).mean())
            row["level0_churn"] = float(changed[:, 0].mean())
        out[name] = row
    return out
