"""Bounded, distributed pair mining: exact distributed quantiles, capped Swing, the collaborative trigger
similarity with the encoder fallback, and Beam == pandas for each."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from feature_store.split import global_cuts
from pipelines.mining.collab import CollabConfig, fit_item_vectors
from pipelines.mining.pairs import (PairConfig, cap_users, mine_pairs, pick_triggers, positives, quantile_index,
                             swing_row, swing_scores, time_cutoff, user_sample_key)
from pipelines.beam.collab_vectors import CollabItemVectors
from pipelines.beam.mine_pairs import MinePairs, SwingPairs
from pipelines.beam.quantiles import ExactQuantile


def _frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"]).astype(
        {"user_id": "int64", "item_id": "int64", "ts": "int64", "label": "float32"})


def _clusters(n_users=60, n_items=40, per_user=7, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        pool = np.arange(0, n_items // 2) if u % 2 else np.arange(n_items // 2, n_items)
        for k, i in enumerate(rng.choice(pool, per_user, replace=False)):
            rows.append((u, int(i), 5000 + 37 * k + 3 * u, 1.0))
    return _frame(rows)


def test_quantile_index_is_numpys():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 10, 99, 1000):
        values = np.arange(n)
        for q in (0.0, 0.1, 0.25, 0.5, 0.8, 0.9, 0.95, 1.0, float(rng.random())):
            assert quantile_index(n, q) == int(np.quantile(values, q, method="higher")), (n, q)


def test_exact_quantile_equals_sorting():
    rng = np.random.default_rng(1)
    ts = (1_600_000_000 + rng.integers(0, 40 * 86_400, 500)).tolist() + [1_600_000_000] * 30  # ties
    n = len(ts)
    valid_cut, test_cut = global_cuts(np.asarray(ts), 0.1, 0.1)
    with TestPipeline() as p:
        col = p | beam.Create(ts)
        assert_that(col | "Q90" >> ExactQuantile(lambda m: quantile_index(m, 0.9)),
                    equal_to([time_cutoff(np.asarray(ts), 0.1)]), label="Q90")
        assert_that(col | "Valid" >> ExactQuantile(lambda m: m - int(round(0.2 * m))), equal_to([valid_cut]),
                    label="ValidCut")
        assert_that(col | "Test" >> ExactQuantile(lambda m: m - int(round(0.1 * m))), equal_to([test_cut]),
                    label="TestCut")
        assert_that(col | "Past" >> ExactQuantile(lambda m: m), equal_to([max(ts) + 1]), label="PastEnd")
        assert_that(col | "Min" >> ExactQuantile(lambda m: 0, bucket=7), equal_to([min(ts)]), label="Min")
    assert n == 530


def test_swing_under_caps_is_the_uncapped_reference_exactly():
    inter = _clusters()
    big = PairConfig(min_support=1, heldout_frac=0.0, swing_max_users=10**9, swing_max_history=10**9)
    under = PairConfig(min_support=1, heldout_frac=0.0, swing_max_users=60, swing_max_history=7)
    a, b = swing_scores(inter, big), swing_scores(inter, under)
    pd.testing.assert_frame_equal(a, b)  # bit-identical: the caps drop nothing here
    capped = swing_scores(inter, PairConfig(min_support=1, heldout_frac=0.0, swing_max_users=5))
    assert not capped.equals(a)


def test_users_per_item_cap_is_a_seeded_sample():
    hot = [(u, 0, u, 1.0) for u in range(40)] + [(u, 1 + u % 3, 100 + u, 1.0) for u in range(40)]
    inter = _frame(hot)
    cfg = PairConfig(min_support=1, heldout_frac=0.0, swing_max_users=6, seed=3)
    hist = {u: np.sort(g.item_id.to_numpy()) for u, g in positives(inter, cfg).groupby("user_id")}
    users = [(u, h) for u, h in hist.items() if 0 in h]
    kept = cap_users(0, users, cfg)
    assert len(kept) == 6
    want = sorted(range(40), key=lambda u: user_sample_key(3, 0, u))[:6]
    assert sorted(u for u, _ in kept) == sorted(want)
    # another seed samples other users; the row of item 0 only ever sees the sampled users
    other = cap_users(0, users, PairConfig(swing_max_users=6, seed=4))
    assert sorted(u for u, _ in other) != sorted(want)
    row = swing_row(0, kept, cfg)
    from collections import Counter
    partner_users = Counter(int(i) for _, h in kept for i in h if i != 0)
    expected = {i: c for i, c in partner_users.items() if c >= 2}  # one user alone makes no Swing pair
    assert dict(zip(row.partners.tolist(), row.support.tolist())) == expected
    assert sum(expected.values()) <= 6 < 40
    got = swing_scores(inter, cfg)
    assert got[got.item == 0].set_index("partner")["support"].to_dict() == expected
    beam_cfg = PairConfig(min_support=1, heldout_frac=0.0, swing_max_users=6, seed=3)
    from pipelines.mining.pairs import swing_pairs
    want_rows = [tuple(r) for r in swing_pairs(inter, beam_cfg).itertuples(index=False)]
    assert any(r[0] == 0 for r in want_rows)
    with TestPipeline() as p:
        out = p | beam.Create(inter.to_dict("records")) | SwingPairs(beam_cfg)
        assert_that(out, equal_to(want_rows))


def test_collab_vectors_beam_equal_reference_and_separate_clusters():
    inter = _clusters(seed=2)
    ui = inter[["user_id", "item_id"]].to_numpy(np.int64)
    cfg = CollabConfig(dim=8, iterations=3, min_count=2, seed=1)
    ref = fit_item_vectors(ui, cfg)
    assert len(ref) == inter.item_id.nunique()
    ids = sorted(ref)
    v = np.stack([ref[i] for i in ids])
    sim = v @ v.T
    same = np.equal.outer(np.asarray(ids) < 20, np.asarray(ids) < 20)
    off = ~np.eye(len(ids), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.3  # the model learned the two taste clusters

    def check(got):
        got = dict(got)
        assert sorted(got) == ids
        for i in ids:
            assert np.array_equal(got[i], ref[i]), i  # bit-identical: exact fixed-point sums

    with TestPipeline() as p:
        ui_pc = p | beam.Create([tuple(r) for r in ui.tolist()])
        assert_that(ui_pc | "OneShard" >> CollabItemVectors(cfg), check, label="OneShard")
        assert_that(ui_pc | "Shards" >> CollabItemVectors(cfg, rows_per_shard=50), check, label="Shards")


def test_pick_triggers_sources_and_fallback():
    collab = {1: np.array([1.0, 0.0]), 2: np.array([0.8, 0.6]), 3: np.array([0.0, 1.0])}
    encoder = {4: np.array([1.0, 0.0]), 1: np.array([0.6, 0.8]), 3: np.array([1.0, 0.0])}
    cfg = PairConfig(trigger_similarity="collab", history=50)
    items, ts = np.array([1, 3, 2, 4]), np.array([1, 2, 3, 4])
    rows, counts = pick_triggers(7, items, ts, cfg, collab=collab, encoder=encoder)
    # target 3: collab candidates {1}: trigger 1; target 2: 1 (cos .8) beats 3 (.6); target 4 has no collab
    # vector: the encoder picks 3 (cos 1) over 1 (.6)
    assert [(r[0], r[1], r[5]) for r in rows] == [(1, 3, "collab"), (1, 2, "collab"), (3, 4, "encoder")]
    assert counts == {"collab": 2, "swing": 0, "encoder": 1, "none": 0}
    rows, counts = pick_triggers(7, items, ts, PairConfig(trigger_similarity="collab", trigger_fallback="none"),
                                 collab=collab, encoder=encoder)
    assert counts["none"] == 1 and len(rows) == 2
    # ties go to the most recent candidate
    tie = {1: np.array([1.0, 0.0]), 3: np.array([1.0, 0.0]), 2: np.array([1.0, 0.0])}
    rows, _ = pick_triggers(7, np.array([1, 3, 2]), np.array([1, 2, 3]), cfg, collab=tie)
    assert rows[-1][:2] == (3, 2)


@pytest.mark.parametrize("similarity,events_per_shard", [("collab", 45), ("swing", 100_000)])
def test_beam_pairs_equal_pandas_with_fallback(similarity, events_per_shard):
    inter = _clusters(n_users=50, n_items=60, per_user=6, seed=5)
    rng = np.random.default_rng(0)
    enc = {i: (v / np.linalg.norm(v)).astype(np.float32) for i, v in
           ((i, rng.standard_normal(4)) for i in range(60))}
    cfg = PairConfig(min_support=2, heldout_frac=0.2, swing_top_n=4, history=5, trigger_similarity=similarity,
                     collab=CollabConfig(dim=4, iterations=2, min_count=3))
    ps = mine_pairs(inter, cfg, encoder_vectors=enc)
    counts = ps.stats["trigger_sources"]
    assert counts["encoder"] > 0 and counts[similarity] > 0  # both sources are exercised
    with TestPipeline() as p:
        rows = p | "Create" >> beam.Create(inter.to_dict("records"))
        enc_pc = p | "Enc" >> beam.Create(sorted(enc.items()))
        out = rows | "Mine" >> MinePairs(cfg, encoder=enc_pc, events_per_shard=events_per_shard)
        assert_that(out["train"], equal_to([tuple(r) for r in ps.train.itertuples(index=False)]), label="Train")
        assert_that(out["heldout"], equal_to([tuple(r) for r in ps.heldout.itertuples(index=False)]),
                    label="Heldout")

