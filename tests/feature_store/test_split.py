"""Time-based splits: no test event earlier than train, every row exactly once."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from feature_store.split import SplitConfig, global_cuts, time_split


def _events(n=500, users=20, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user_id": rng.integers(0, users, n), "item_id": rng.integers(0, 50, n),
                         "ts": rng.integers(0, 200, n), "label": rng.random(n).astype("float32")})


def test_global_cut_orders_parts_in_time():
    df = _events()
    train, valid, test = time_split(df, "global", valid_frac=0.1, test_frac=0.2)
    assert len(train) + len(valid) + len(test) == len(df)
    assert train["ts"].max() < valid["ts"].min() and valid["ts"].max() < test["ts"].min()
    assert 0.2 <= len(test) / len(df) < 0.25  # ties at the cut go later, so at least 20%


def test_global_cuts_by_hand():
    ts = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert global_cuts(ts, 0.1, 0.2) == (8, 9)   # sorted[10 - 3] and sorted[10 - 2]
    assert global_cuts(ts, 0.0, 0.04) == (11, 11)  # 0.4 rows round to none: both parts empty
    train, valid, test = time_split(pd.DataFrame({"user_id": 0, "ts": ts}), "global", valid_frac=0.1, test_frac=0.2)
    assert list(test["ts"]) == [9, 10] and list(valid["ts"]) == [8]


def test_user_last_n():
    df = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2, 3], "ts": [4, 1, 3, 2, 9, 8, 5], "item_id": range(7)})
    train, valid, test = time_split(df, "user_last_n", n_valid=1, n_test=1, min_train=1)
    assert sorted(zip(test["user_id"], test["ts"])) == [(1, 4)]        # user 2 has 2 events < 1+1+1: all train
    assert sorted(zip(valid["user_id"], valid["ts"])) == [(1, 3)]
    assert sorted(zip(train["user_id"], train["ts"])) == [(1, 1), (1, 2), (2, 8), (2, 9), (3, 5)]


def test_user_last_frac_never_puts_a_users_test_before_their_train():
    df = _events(2000, users=30)
    train, valid, test = time_split(df, "user_last_frac", valid_frac=0.1, test_frac=0.1)
    assert len(train) + len(valid) + len(test) == len(df)
    last_train = train.groupby("user_id")["ts"].max()
    first_test = test.groupby("user_id")["ts"].min()
    assert (first_test >= last_train.reindex(first_test.index)).all()
    assert 0.05 < len(test) / len(df) < 0.12


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        SplitConfig(method="random")
    with pytest.raises(ValueError, match="valid_frac \\+ test_frac"):
        SplitConfig(valid_frac=0.5, test_frac=0.5)


def test_user_last_frac_counts_by_hand():
    # 15 events * 0.1 = 1.5 -> 2 (ties to even); 5 * 0.1 = 0.5 -> 0 -> at least 1; 25 * 0.1 = 2.5 -> 2; 1 -> 1
    sizes = {1: 15, 2: 5, 3: 25, 4: 1}
    df = pd.DataFrame([(u, t) for u, n in sizes.items() for t in range(n)], columns=["user_id", "ts"])
    _, _, test = time_split(df, "user_last_frac", valid_frac=0.0, test_frac=0.1)
    assert test.groupby("user_id").size().to_dict() == {1: 2, 2: 1, 3: 2, 4: 1}
    assert test.groupby("user_id")["ts"].min().to_dict() == {1: 13, 2: 4, 3: 23, 4: 0}
    _, _, warm = time_split(df, "user_last_frac", valid_frac=0.0, test_frac=0.1, min_train=1)
    assert 4 not in set(warm["user_id"])  # min_train=1 keeps the one-event user in train


def test_data_digest_is_a_combine_over_any_order_and_sees_every_value():
    from feature_store.split import (fingerprint_hex, fingerprint_merge, fingerprint_partial,
                                     interactions_fingerprint)

    rng = np.random.default_rng(5)
    n = 500
    log = pd.DataFrame({"user_id": rng.integers(0, 9, n), "item_id": rng.integers(0, 50, n),
                        "ts": rng.integers(0, 10**9, n), "label": rng.random(n).astype(np.float32)})
    whole = interactions_fingerprint(log)
    assert interactions_fingerprint(log.sample(frac=1.0, random_state=2)) == whole
    blocks = [fingerprint_partial(log.iloc[a:b]) for a, b in ((0, 120), (120, 121), (121, n))]
    assert fingerprint_hex(fingerprint_merge(blocks)) == whole
    for col in ("user_id", "item_id", "ts"):
        changed = log.copy()
        changed.loc[7, col] += 1
        assert interactions_fingerprint(changed) != whole, col
    assert interactions_fingerprint(pd.concat([log, log.iloc[[3]]])) != whole  # a repeated row counts


def test_chunked_millisecond_rule_equals_the_loader_s_median():
    from pipelines.data.rules import MS_THRESHOLD, merge_ms_stats, ms_decision, ms_stats

    for values in ([1.0, 2e12], [1e9, 2e12, 3e12], [1e11 - 10, 1e11 + 30], [1e11 - 30, 1e11 + 10], [5.0]):
        frame = pd.DataFrame({"ts": [str(v) for v in values] + ["", "x"]})
        parts = [ms_stats(frame.iloc[i:i + 1], "ts") for i in range(len(frame))]
        assert ms_decision(merge_ms_stats(parts)) == (np.median(values) > MS_THRESHOLD), values
