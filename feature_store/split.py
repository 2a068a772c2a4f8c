"""Time-based train / valid / test splits. There is deliberately no random split: recommendation models are
used on the future, so they are evaluated on it.

Methods:
- "global": two timestamp cuts at quantiles of all timestamps. Every valid event is at or after every train
  event, every test event at or after every valid event; users and items may be new in later parts (cold start
  is part of the test). Events sharing the cut timestamp all go to the later part, so no timestamp is split.
- "user_last_n": per user, the last `n_test` events go to test and the `n_valid` before them to valid. Models
  see each test user's earlier history (a warm-user evaluation). Ties in ts are broken by the input order.
- "user_last_frac": per user, the last max(1, round(test_frac * n_user)) events go to test and likewise
  `valid_frac` before them to valid; users with fewer than min_train + held-out events stay entirely in train.

On the MovieLens poster subset (58,498 ratings) `global` with test_frac=0.1 gives the 5,850 test rows and
`user_last_frac` with test_frac=0.1 the 5,860 test rows of the reference baselines in ../shared/data/movielens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

METHODS = ("global", "user_last_n", "user_last_frac")


@dataclass(frozen=True)
class SplitConfig:
    """How to split; see the module docstring.

    Args:
        method: "global", "user_last_n" or "user_last_frac".
        valid_frac, test_frac: global and user_last_frac: shares of events (global: by timestamp quantile).
        n_valid, n_test: user_last_n: events per user.
        min_train: user_last_*: a user keeps at least this many events in train; users with fewer events
            than min_train + held-out stay wholly in train. The default 0 lets a one-event user be a test-only
            (cold) user, as in the reference MovieLens baselines; 1 makes every test user a warm one.
    """

    method: str = "global"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    n_valid: int = 1
    n_test: int = 1
    min_train: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SplitConfig.method: {self.method!r} is not one of {METHODS}")
        for name in ("valid_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"SplitConfig.{name}: must be in [0, 1), got {v}")
        if self.valid_frac + self.test_frac >= 1.0:
            raise ValueError(f"SplitConfig: valid_frac + test_frac must be < 1, got {self.valid_frac + self.test_frac}")
        for name in ("n_valid", "n_test", "min_train"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"SplitConfig.{name}: must be an int >= 0, got {v!r}")


def time_split(interactions: pd.DataFrame, method: str = "global", **kwargs):
    """Split interactions by time.

    Args:
        interactions: contract interactions (user_id, item_id, ts, label, ...).
        method: see the module docstring; other keyword arguments are SplitConfig fields.
    Returns:
        (train, valid, test) DataFrames, each sorted by ts with a fresh index; together they hold every input
        row exactly once.
    """
    cfg = kwargs.pop("config", None) or SplitConfig(method=method, **kwargs)
    if "ts" not in interactions or "user_id" not in interactions:
        raise ValueError(f"time_split: interactions need columns ts and user_id; got {list(interactions.columns)}")
    part = split_labels(interactions, cfg)
    return tuple(interactions.loc[part == p].sort_values("ts", kind="stable").reset_index(drop=True)
                 for p in (0, 1, 2))


def split_labels(interactions: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Part of each row, aligned with the input: 0 train, 1 valid, 2 test. (N,) int8."""
    ts = interactions["ts"].to_numpy()
    part = np.zeros(len(interactions), dtype=np.int8)
    if len(interactions) == 0:
        return part
    if cfg.method == "global":
        valid_cut, test_cut = global_cuts(ts, cfg.valid_frac, cfg.test_frac)
        part[ts >= valid_cut] = 1
        part[ts >= test_cut] = 2
        return part
    # Per user: position from the end in time order (0 = last event); ties in ts keep input order.
    order = np.lexsort((np.arange(len(ts)), ts, interactions["user_id"].to_numpy()))
    users = interactions["user_id"].to_numpy()[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    count_per_row = np.repeat(counts, counts)
    from_end = count_per_row - 1 - (np.arange(len(users)) - np.repeat(starts, counts))
    if cfg.method == "user_last_n":
        n_test = np.full(len(users), cfg.n_test)
        n_valid = np.full(len(users), cfg.n_valid)
    else:
        n_test = _share(count_per_row, cfg.test_frac)
        n_valid = _share(count_per_row, cfg.valid_frac)
    eligible = count_per_row >= cfg.min_train + n_test + n_valid
    sorted_part = np.zeros(len(users), dtype=np.int8)
    sorted_part[eligible & (from_end < n_test + n_valid)] = 1
    sorted_part[eligible & (from_end < n_test)] = 2
    part[order] = sorted_part
    return part


def _share(counts: np.ndarray, frac: float) -> np.ndarray:
    """Events per user for a fraction: rounded to nearest (ties to even), at least 1 when frac > 0."""
    if frac <= 0:
        return np.zeros(len(counts), dtype=np.int64)
    return np.maximum(1, np.round(counts * frac)).astype(np.int64)


def global_cuts(ts: np.ndarray, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """Timestamps (valid_cut, test_cut): rows with ts >= valid_cut are valid or test, ts >= test_cut test.

    With the n timestamps sorted, test_cut is the one at index n - round(test_frac * n) (so about test_frac of
    the rows are at or after it; more when the cut timestamp is shared), likewise valid_cut with
    valid_frac + test_frac. A part that rounds to zero rows gets a cut past the last event (it is empty).
    """
    ts = np.sort(np.asarray(ts))
    n = len(ts)

    def cut(frac: float) -> int:
        idx = n - int(round(frac * n))
        return int(ts[idx]) if idx < n else int(ts[-1]) + 1

    return cut(valid_frac + test_frac), cut(test_frac)
