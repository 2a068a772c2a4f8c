"""Ranker continuity across codebook refits: remap learned code-embedding rows, and measure code churn.

When the retraining job refits the quantizer, centroid ``j`` of the new codebook is not centroid ``j`` of the
old one. The ranker's learned code-embedding table (one row per centroid and level) would then be silently
scrambled. :func:`remap_code_tables` builds the new table by giving every new centroid the learned row of the old
centroid that means the same thing:

- ``one_to_one`` (default): the optimal one-to-one matching on centroid similarity (maximum total similarity,
  ``scipy.optimize.linear_sum_assignment``; a few seconds at K = 4096). With more new than old centroids the
  extra new ones stay unmatched.
- ``nearest``: every new centroid takes its nearest old centroid's row; rows may be shared (many-to-one).
- ``items``: every new code takes the row of the old code most of its items had before (a vote over the items
  both versions share, joined on item_id); codes nobody voted for fall back to ``one_to_one``. This follows what
  the ranker actually learned (rows are trained by the items that carry the code), and is the better choice for
  residual levels > 0, whose centroids only mean something relative to the level above.
- ``warm``: for codebooks warm-started from the old ones (new centroid j began as old centroid j). Code j
  *survives* and keeps its own learned row j when old centroid j is still new centroid j's nearest old
  centroid; every other new code takes the row of its items' previous code (the ``items`` vote) when
  ``old_codes`` / ``new_codes`` are given, else of its nearest old centroid. Identical codebooks map to the
  identity.

Matches worse than ``min_cosine`` and new centroids left without a partner get a fresh row (``unmatched_init``).
Rows past the codebook size (a padding / unknown row some rankers keep at index K) are carried over unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from feature_store.tables import CodeTable

METHODS = ("one_to_one", "nearest", "items", "warm")
METRICS = ("l2", "cosine")
INITS = ("mean", "normal", "zeros")


@dataclass(frozen=True)
class RemapConfig:
    """How to match new centroids to old ones.

    Args:
        method: "one_to_one" | "nearest" | "items" | "warm" (see the module docstring).
        metric: similarity used for matching: "l2" (the k-means metric) or "cosine".
        min_cosine: matches whose centroid cosine is below this get a fresh row instead (None: keep all).
        unmatched_init: fresh rows: "mean" of the old rows, "normal" with the old rows' std, or "zeros".
        seed: for "normal" initialisation.
    """

    method: str = "one_to_one"
    metric: str = "l2"
    min_cosine: float | None = None
    unmatched_init: str = "mean"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"RemapConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.metric not in METRICS:
            raise ValueError(f"RemapConfig.metric must be one of {METRICS}, got {self.metric!r}")
        if self.unmatched_init not in INITS:
            raise ValueError(f"RemapConfig.unmatched_init must be one of {INITS}, got {self.unmatched_init!r}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"RemapConfig.min_cosine must be in [-1, 1], got {self.min_cosine}")


@dataclass
class RemapResult:
    """Output of :func:`remap_code_tables`.

    Attributes:
        tables: per level, the new table (K_new + extra rows, e) float32.
        mapping: per level, (K_new,) int64 old row copied into each new row, -1 where freshly initialised.
        levels: per level, match statistics (see :func:`remap_code_tables`).
    """

    tables: list[np.ndarray]
    mapping: list[np.ndarray]
    levels: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Statistics averaged over levels, plus the per-level ones (JSON-able)."""
        keys = ("share_matched", "mean_cosine", "mean_l2")
        out = {key: float(np.mean([lvl[key] for lvl in self.levels])) if self.levels else None for key in keys}
        out["levels"] = self.levels
        return out


def remap_code_tables(old_codebooks: Sequence, new_codebooks: Sequence, old_tables: Sequence,
                      config: RemapConfig = RemapConfig(), *, old_codes: CodeTable | None = None,
                      new_codes: CodeTable | None = None) -> RemapResult:
    """Map learned code-embedding rows from the old codebooks onto the new ones, level by level.

    Args:
        old_codebooks: per level, (K_old, d) centroids the ranker was trained with.
        new_codebooks: per level, (K_new, d) refitted centroids (same d; K_new may differ).
        old_tables: per level, (K_old + extra, e) learned rows (numpy or torch).
        config: matching options.
        old_codes, new_codes: item code tables of the two versions; required for ``method="items"``.
    Returns:
        :class:`RemapResult`. Per-level statistics: ``share_matched`` (new rows that inherited an old row),
        ``mean_cosine`` / ``mean_l2`` between matched centroids, ``reused_old_rows`` (old rows copied more
        than once; 0 for one-to-one), ``voted`` (rows set by item votes), ``survived`` (``warm``: rows kept
        as their own).
    """
    if not (len(old_codebooks) == len(new_codebooks) == len(old_tables)):
        raise ValueError(f"remap: level counts differ: old codebooks {len(old_codebooks)}, new codebooks "
                         f"{len(new_codebooks)}, old tables {len(old_tables)}")
    if config.method == "items":
        if old_codes is None or new_codes is None:
            raise ValueError("remap: method 'items' needs old_codes and new_codes")
        if old_codes.levels < len(old_codebooks) or new_codes.levels < len(new_codebooks):
            raise ValueError(f"remap: code tables have {old_codes.levels}/{new_codes.levels} levels, "
                             f"codebooks {len(old_codebooks)}")
    rng = np.random.default_rng(config.seed)
    result = RemapResult(tables=[], mapping=[])
    for level, (old_c, new_c, old_t) in enumerate(zip(old_codebooks, new_codebooks, old_tables)):
        old_c, new_c, old_t = (_as_float(a) for a in (old_c, new_c, old_t))
        _check_level(level, old_c, new_c, old_t)
        k_old, k_new = len(old_c), len(new_c)
        sim = _similarity(new_c, old_c, config.metric)  # (K_new, K_old), higher is closer
        voted = survived = 0
        if config.method in ("nearest", "warm"):
            mapping = sim.argmax(axis=1).astype(np.int64)
        else:
            mapping = optimal_one_to_one(sim)
        if config.method == "warm":
            own = np.arange(k_new) < k_old
            survive = np.zeros(k_new, bool)
            survive[own] = mapping[own] == np.arange(k_new)[own]
            if old_codes is not None and new_codes is not None:
                votes, _ = item_vote_mapping(old_codes, new_codes, level, k_new)
                use_vote = ~survive & (votes >= 0)
                voted = int(use_vote.sum())
                mapping = np.where(use_vote, votes, mapping)
            mapping = np.where(survive, np.arange(k_new), mapping)
            survived = int(survive.sum())
        if config.method == "items":
            votes, _ = item_vote_mapping(old_codes, new_codes, level, k_new)
            voted = int((votes >= 0).sum())
            mapping = np.where(votes >= 0, votes, mapping)
        cos = _cosine_of_pairs(new_c, old_c, mapping)
        if config.min_cosine is not None:
            mapping = np.where((mapping >= 0) & (cos < config.min_cosine), -1, mapping)
        matched = mapping >= 0
        table = np.empty((k_new + len(old_t) - k_old, old_t.shape[1]), np.float32)  # (K_new + extra, e)
        table[:k_new][matched] = old_t[mapping[matched]]
        table[:k_new][~matched] = _fresh_rows(old_t[:k_old], int((~matched).sum()), config.unmatched_init, rng)
        table[k_new:] = old_t[k_old:]  # padding / unknown rows keep their meaning
        used = mapping[matched]
        result.tables.append(table)
        result.mapping.append(mapping)
        result.levels.append({
            "level": level, "k_old": k_old, "k_new": k_new,
            "share_matched": float(matched.mean()) if k_new else 0.0,
            "mean_cosine": float(_cosine_of_pairs(new_c, old_c, mapping)[matched].mean()) if matched.any() else None,
            "mean_l2": float(np.linalg.norm(new_c[matched] - old_c[used], axis=1).mean()) if matched.any() else None,
            "reused_old_rows": int(len(used) - len(np.unique(used))),
            "voted": voted,
            "survived": survived,
        })
    return result


def optimal_one_to_one(sim: np.ndarray) -> np.ndarray:
    """Maximum-total-similarity one-to-one matching.

    Args:
        sim: (R, C) similarity, higher is better.
    Returns:
        mapping (R,) int64 column matched to each row, or -1 for rows left over when R > C.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim, maximize=True)
    mapping = np.full(sim.shape[0], -1, np.int64)
    mapping[rows] = cols
    return mapping


def item_vote_mapping(old_codes: CodeTable, new_codes: CodeTable, level: int, k_new: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """For each new code at ``level``, the old code most of its (shared) items had; ties go to the lower id.

    Returns:
        mapping (k_new,) int64 old code or -1 when no shared item has that new code; support (k_new,) int64
        number of shared items behind each vote.
    """
    _, old_rows, new_rows = np.intersect1d(old_codes.item_ids, new_codes.item_ids, return_indices=True)
    new_c = new_codes.rq[new_rows, level].astype(np.int64)  # (M,)
    old_c = old_codes.rq[old_rows, level].astype(np.int64)  # (M,)
    mapping = np.full(k_new, -1, np.int64)
    support = np.zeros(k_new, np.int64)
    if len(new_c) == 0:
        return mapping, support
    if new_c.max() >= k_new:
        raise ValueError(f"new codes at level {level} reach {new_c.max()} but the new codebook has {k_new} rows")
    pairs, counts = np.unique(np.stack([new_c, old_c], axis=1), axis=0, return_counts=True)  # (P, 2), (P,)
    # for each new code, the pair with the highest count (lexsort: last key is primary)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    pairs, counts = pairs[order], counts[order]
    first = np.ones(len(pairs), bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    mapping[pairs[first, 0]] = pairs[first, 1]
    support[pairs[first, 0]] = counts[first]
    return mapping, support


def code_churn(old: CodeTable, new: CodeTable, mappings: Sequence[np.ndarray] | None = None) -> dict:
    """How much codes moved between two versions, over the items both contain (joined on item_id).

    Args:
        old, new: the two code tables.
        mappings: optional per-level (K_new,) old row behind each new row (``RemapResult.mapping``). With it, an
            item's code counts as unchanged when its new code's row was remapped from its old code's row, i.e.
            the churn the *ranker* sees after remapping rather than the raw id churn.

    Returns:
        dict with ``common_items``, ``added_items``, ``removed_items``; ``rq_level_churn`` (per level, share of
        common items whose code at that level changed), ``rq_prefix_churn`` (per level, share whose code
        prefix up to and including that level changed), ``rq_code_churn`` (whole code changed), and when both
        have VQ codes ``vq_churn`` (neighbour set changed) and ``vq_overlap`` (mean share of neighbours kept).
        Shares are None when there are no common items.
    """
    if old.levels != new.levels:
        raise ValueError(f"code churn: the versions have {old.levels} and {new.levels} RQ levels; "
                         "codes of different depth are not comparable")
    _, old_rows, new_rows = np.intersect1d(old.item_ids, new.item_ids, return_indices=True)
    n = len(old_rows)
    out = {"common_items": int(n), "added_items": int(len(new) - n), "removed_items": int(len(old) - n)}
    if n == 0:
        out.update(rq_level_churn=None, rq_prefix_churn=None, rq_code_churn=None)
        return out
    old_rq, new_rq = old.rq[old_rows].astype(np.int64), new.rq[new_rows].astype(np.int64)  # (n, L)
    if mappings is not None:
        if len(mappings) != new.levels:
            raise ValueError(f"code churn: {len(mappings)} mappings for {new.levels} levels")
        new_rq = np.stack([np.asarray(m, np.int64)[new_rq[:, lvl]] for lvl, m in enumerate(mappings)], axis=1)
    changed = old_rq != new_rq  # (n, L); a fresh (-1) row always counts as changed
    prefix = np.logical_or.accumulate(changed, axis=1)  # (n, L)
    out["rq_level_churn"] = changed.mean(axis=0).tolist()
    out["rq_prefix_churn"] = prefix.mean(axis=0).tolist()
    out["rq_code_churn"] = float(prefix[:, -1].mean()) if old.levels else 0.0
    k_old, k_new = old.vq.shape[1], new.vq.shape[1]
    if k_old and k_new:
        a, b = old.vq[old_rows], new.vq[new_rows]  # (n, K_old), (n, K_new)
        overlap = np.empty(n, np.float64)
        for start in range(0, n, 8192):  # chunks bound the (chunk, K_old, K_new) comparison tensor
            sl = slice(start, start + 8192)
            overlap[sl] = (a[sl, :, None] == b[sl, None, :]).any(axis=2).sum(axis=1)
        out["vq_churn"] = float((overlap < max(k_old, k_new)).mean())
        out["vq_overlap"] = float((overlap / max(k_old, k_new)).mean())
    return out


# ----------------------------------------------------------------------------------------------- helpers


def _as_float(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _check_level(level: int, old_c: np.ndarray, new_c: np.ndarray, old_t: np.ndarray) -> None:
    if old_c.ndim != 2 or new_c.ndim != 2 or old_t.ndim != 2:
        raise ValueError(f"remap level {level}: codebooks and tables must be 2-D, got {old_c.shape}, "
                         f"{new_c.shape}, {old_t.shape}")
    if old_c.shape[1] != new_c.shape[1]:
        raise ValueError(f"remap level {level}: old centroids have d={old_c.shape[1]}, new d={new_c.shape[1]}")
    if len(old_t) < len(old_c):
        raise ValueError(f"remap level {level}: old table has {len(old_t)} rows but the old codebook has "
                         f"{len(old_c)} centroids")


def _similarity(new_c: np.ndarray, old_c: np.ndarray, metric: str) -> np.ndarray:
    """(K_new, K_old) similarity: negative squared distance, or cosine."""
    if metric == "cosine":
        return _normalise(new_c) @ _normalise(old_c).T
    sq_new = (new_c ** 2).sum(axis=1)[:, None]  # (K_new, 1)
    sq_old = (old_c ** 2).sum(axis=1)[None, :]  # (1, K_old)
    return -(sq_new - 2.0 * new_c @ old_c.T + sq_old)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cosine_of_pairs(new_c: np.ndarray, old_c: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(K_new,) cosine between each new centroid and its matched old one (NaN where unmatched)."""
    cos = np.full(len(new_c), np.nan, np.float32)
    ok = mapping >= 0
    cos[ok] = (_normalise(new_c[ok]) * _normalise(old_c[mapping[ok]])).sum(axis=1)
    return cos


def _fresh_rows(old_rows: np.ndarray, count: int, init: str, rng: np.random.Generator) -> np.ndarray:
    width = old_rows.shape[1]
    if count == 0:
        return np.zeros((0, width), np.float32)
    if init == "zeros" or len(old_rows) == 0:
        return np.zeros((count, width), np.float32)
    if init == "mean":
        return np.repeat(old_rows.mean(axis=0, keepdims=True), count, axis=0)
    return rng.normal(0.0, float(old_rows.std()), size=(count, width)).astype(np.float32)


def version_churn(old_version, new_version, name: str = "item_codes",
                  mappings: Sequence[np.ndarray] | None = None) -> dict:
    """:func:`code_churn` between the code tables of two store versions (``StoreVersion`` objects)."""
    out = code_churn(old_version.codes(name), new_version.codes(name), mappings)
    return {"old_version": old_version.id, "new_version": new_version.id, "table": name, **out}


def remap_between_versions(old_version, new_version, old_tables: Sequence, config: RemapConfig = RemapConfig(), *,
                           codebooks: str = "codebooks", codes: str = "item_codes", prefix: str = "rq"
                           ) -> RemapResult:
    """:func:`remap_code_tables` with codebooks (``{prefix}.level{i}``) and code tables read from two versions.

    Args:
        old_version, new_version: ``StoreVersion`` the ranker was trained on / is moving to.
        old_tables: per level, the ranker's learned (K_old + extra, e) rows.
        config: matching options; ``method="items"`` uses the versions' code tables.
    """
    from feature_store.tables import codebook_levels

    old_books = codebook_levels(old_version.codebooks(codebooks, as_numpy=True), prefix)
    new_books = codebook_levels(new_version.codebooks(codebooks, as_numpy=True), prefix)
    kwargs = {}
    if config.method == "items":
        kwargs = {"old_codes": old_version.codes(codes), "new_codes": new_version.codes(codes)}
    return remap_code_tables(old_books, new_books, old_tables, config, **kwargs)
