"""Training / evaluation examples: one row per (user, item, ts, label) event plus the user's history.

History = item rows of the user's last `history_len` positives with ts strictly before the event's ts
(strict, so same-second events never leak into each other). It is taken from the whole positive
timeline, so a test event sees earlier test positives (known at serving time) but never later ones.

Example:
    >>> ex = build_examples(events, positives, items, users, history_len=2)
    >>> ex.hist[0], ex.hist_len[0]       # padded with -1 on the right, most recent first
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ranker.config import NegativeConfig
from ranker.features import ItemFeatures


@dataclass
class UserIndex:
    """user id -> row (row 0 = unknown user). Built from training users only, so users first seen in
    test share the unknown row instead of an untrained random vector."""

    user_ids: np.ndarray  # (U,) sorted

    @classmethod
    def from_ids(cls, ids) -> "UserIndex":
        return cls(np.unique(np.asarray(ids, dtype=np.int64)))

    @property
    def n_rows(self) -> int:
        return len(self.user_ids) + 1

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.user_ids) == 0:
            return np.zeros(len(ids), np.int64)
        pos = np.minimum(np.searchsorted(self.user_ids, ids), len(self.user_ids) - 1)
        return np.where(self.user_ids[pos] == ids, pos + 1, 0).astype(np.int64)


_FIELDS = ("user", "user_id", "item", "label", "ts", "hist", "hist_len", "prior_events", "prior_positives")


@dataclass
class Examples:
    """Columnar examples. n = number of events.

    Attributes:
        user: (n,) user rows.   user_id: (n,) raw user ids (GAUC groups by these).
        item: (n,) item rows.   label: (n,) float32.   ts: (n,) int64.
        hist: (n, T) item rows, most recent first, padded with -1.   hist_len: (n,) int64.
        prior_events, prior_positives: (n,) the user's events / positives strictly before ts (any split:
            counters a serving system keeps), for the user-activity dense features.
    """

    user: np.ndarray
    user_id: np.ndarray
    item: np.ndarray
    label: np.ndarray
    ts: np.ndarray
    hist: np.ndarray
    hist_len: np.ndarray
    prior_events: np.ndarray
    prior_positives: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray) -> "Examples":
        return Examples(*(getattr(self, f)[idx] for f in _FIELDS))

    @staticmethod
    def concat(parts: list) -> "Examples":
        return Examples(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


def _check_columns(df: pd.DataFrame, name: str) -> None:
    missing = {"user_id", "item_id", "ts", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{name}: missing column(s) {sorted(missing)}")


def prior_counts(events: pd.DataFrame, log: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For each event: the user's events and positives in `log` with ts strictly before the event's ts.

    Returns:
        (prior_events (n,), prior_positives (n,)) int64.
    """
    log = log.sort_values(["user_id", "ts"], kind="mergesort")
    key_log = log["user_id"].to_numpy(np.int64)
    ts_log = log["ts"].to_numpy(np.int64)
    pos_cum = np.r_[0, np.cumsum(log["label"].to_numpy() >= 0.5)]
    ev_user = events["user_id"].to_numpy(np.int64)
    ev_ts = events["ts"].to_numpy(np.int64)
    start = np.searchsorted(key_log, ev_user, side="left")  # user's first log row
    end = np.searchsorted(key_log, ev_user, side="right")
    cut = start.copy()
    order = np.argsort(ev_user, kind="mergesort")
    bounds = np.r_[0, np.flatnonzero(np.diff(ev_user[order])) + 1, len(order)]
    for a, b in zip(bounds[:-1], bounds[1:]):  # one vectorised search per user
        idx = order[a:b]
        s, e = start[idx[0]], end[idx[0]]
        cut[idx] = s + np.searchsorted(ts_log[s:e], ev_ts[idx], side="left")
    return (cut - start).astype(np.int64), (pos_cum[cut] - pos_cum[start]).astype(np.int64)


def build_examples(events: pd.DataFrame, positives: pd.DataFrame, items: ItemFeatures, users: UserIndex,
                   history_len: int, name: str = "events", log: pd.DataFrame | None = None) -> Examples:
    """Attach each event's history.

    Args:
        events: user_id, item_id, ts, label rows to score.
        positives: every positive interaction known (all splits): user_id, item_id, ts.
        items, users: id -> row maps.
        history_len: T.
        log: every known interaction (all splits, any label) for the prior-activity counters;
            defaults to `positives`.
    """
    _check_columns(events, name)
    n = len(events)
    ev_user = events["user_id"].to_numpy(np.int64)
    ev_ts = events["ts"].to_numpy(np.int64)
    hist = np.full((n, max(history_len, 0)), -1, dtype=np.int64)
    hist_len = np.zeros(n, dtype=np.int64)
    if history_len > 0 and n:
        pos = positives.sort_values(["user_id", "ts"], kind="mergesort")
        p_user = pos["user_id"].to_numpy(np.int64)
        p_ts = pos["ts"].to_numpy(np.int64)
        p_rows = items.rows(pos["item_id"].to_numpy(np.int64))
        bounds = np.r_[0, np.flatnonzero(np.diff(p_user)) + 1, len(p_user)]
        starts = dict(zip(p_user[bounds[:-1]].tolist(), bounds[:-1].tolist()))
        ends = dict(zip(p_user[bounds[:-1]].tolist(), bounds[1:].tolist()))
        order = np.argsort(ev_user, kind="mergesort")
        ev_bounds = np.r_[0, np.flatnonzero(np.diff(ev_user[order])) + 1, n]
        for a, b in zip(ev_bounds[:-1], ev_bounds[1:]):
            idx = order[a:b]
            u = int(ev_user[idx[0]])
            if u not in starts:
                continue
            s, e = starts[u], ends[u]
            # number of this user's positives strictly before each event
            cut = s + np.searchsorted(p_ts[s:e], ev_ts[idx], side="left")
            lo = np.maximum(cut - history_len, s)
            hist_len[idx] = cut - lo
            for j in range(history_len):  # position j = (j+1)-th most recent
                src = cut - 1 - j
                ok = src >= lo
                hist[idx[ok], j] = p_rows[src[ok]]
    prior_events, prior_positives = prior_counts(events, positives if log is None else log)
    return Examples(user=users.rows(ev_user), user_id=ev_user, item=items.rows(events["item_id"].to_numpy(np.int64)),
                    label=events["label"].to_numpy(np.float32), ts=ev_ts, hist=hist, hist_len=hist_len,
                    prior_events=prior_events, prior_positives=prior_positives)


def sample_negatives(positives: Examples, n_item_rows: int, cfg: NegativeConfig,
                     popularity: np.ndarray | None = None, salt: int = 0) -> Examples:
    """Negatives for implicit feedback: each positive event is copied `per_positive` times with a
    sampled item (same user, ts, history) and label 0. Deterministic in (cfg.seed, salt).

    Args:
        positives: events with label 1.
        n_item_rows: item rows incl. unknown row 0 (row 0 is never sampled).
        popularity: (n_item_rows,) positive counts per item row that the "popularity" / "window" samplers
            weight by and the "live" sampler takes its support from (the caller passes the training window's
            counts for "popularity", the sampled window's own counts for "window" / "live").
        salt: distinguishes splits so train and test draw different negatives.
    """
    k = cfg.per_positive
    if k == 0 or len(positives) == 0:
        return positives.take(np.zeros(0, np.int64))
    rng = np.random.default_rng([cfg.seed, salt])
    n = len(positives) * k
    if cfg.sampler == "uniform":
        weights = np.ones(n_item_rows, np.float64)
    else:
        if popularity is None:
            raise ValueError(f"the {cfg.sampler} sampler needs per-item positive counts")
        weights = np.asarray(popularity, np.float64).copy()
        if cfg.sampler == "live":
            weights = (weights > 0).astype(np.float64)
    weights[0] = 0.0
    if weights.sum() == 0:  # an empty window: fall back to uniform over the catalog
        weights[1:] = 1.0
    p = weights / weights.sum()
    items = rng.choice(n_item_rows, size=n, p=p)
    src = np.repeat(np.arange(len(positives)), k)
    clash = items == positives.item[src]
    # re-draw collisions with the positive item from the same distribution; a rare leftover takes the next item
    # of the distribution's support (so negatives never leave the window's items), or the next row if the
    # support is that single item
    items[clash] = rng.choice(n_item_rows, size=int(clash.sum()), p=p)
    clash = items == positives.item[src]
    support = np.flatnonzero(p > 0)
    if len(support) > 1:
        items[clash] = support[(np.searchsorted(support, items[clash]) + 1) % len(support)]
    else:
        items[clash] = items[clash] % (n_item_rows - 1) + 1
    neg = positives.take(src)
    neg.item = items.astype(np.int64)
    neg.label = np.zeros(n, np.float32)
    return neg
