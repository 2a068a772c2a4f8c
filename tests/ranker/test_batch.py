import numpy as np
import pandas as pd
import pytest
import torch

from ranker.batch import build_batch, cross_features, similarity_features
from ranker.config import NegativeConfig, RankerConfig
from ranker.data import SplitConfig, prepare_examples
from ranker.examples import UserIndex, build_examples, sample_negatives
from ranker.features import ItemFeatures, build_schema, table_configs

CATALOG = np.array([10, 20, 30, 40])  # rows 1..4


def _items():
    # item 40 has no codes; rq sizes 3 and 2 -> unknown codes 3 and 2
    return ItemFeatures.build(CATALOG, code_item_ids=np.array([10, 20, 30]), rq=np.array([[0, 1], [0, 0], [2, 1]]),
                              vq=np.array([[20, 30], [10, 30], [10, 20]]), rq_sizes=[3, 2])


def _events():
    #         user 7 positives at t=1 (10), t=2 (20); event at t=3 on 30; user 8 has no history
    return pd.DataFrame({"user_id": [7, 7, 7, 8], "item_id": [10, 20, 30, 40], "ts": [1, 2, 3, 3],
                         "label": [1.0, 1.0, 0.0, 1.0]})


def test_item_rows_and_unknown_codes():
    items = _items()
    assert items.rows(np.array([10, 40, 99])).tolist() == [1, 4, 0]
    assert items.rq[4].tolist() == [3, 2]  # no codes -> unknown rows
    assert items.vq[1].tolist() == [2, 3]  # neighbour ids mapped to rows
    cov = items.coverage(np.array([[1, 4, -1], [0, 2, -1]]))
    assert cov == {"items": 4, "unknown_item": 1, "without_codes": 2}


def test_bad_codes_are_named():
    with pytest.raises(ValueError, match="rq level 1 code 5 outside"):
        ItemFeatures.build(CATALOG, code_item_ids=np.array([10]), rq=np.array([[0, 5]]), vq=np.array([[20]]),
                           rq_sizes=[3, 2], source="item_codes.parquet")
    with pytest.raises(ValueError, match="not catalog item ids"):
        ItemFeatures.build(CATALOG, code_item_ids=np.array([10, 20]), rq=np.array([[0, 0], [0, 0]]),
                           vq=np.array([[0], [1]]), rq_sizes=[3, 2])


def test_history_is_strictly_before_the_event():
    items = _items()
    ex = build_examples(_events(), _events()[lambda d: d.label > 0], items, UserIndex.from_ids([7, 8]), history_len=3)
    # event 0 (t=1): nothing before; event 1 (t=2): [10]; event 2 (t=3): [20, 10] most recent first
    assert ex.hist.tolist() == [[-1, -1, -1], [1, -1, -1], [2, 1, -1], [-1, -1, -1]]
    assert ex.hist_len.tolist() == [0, 1, 2, 0]
    # prior counters over the full log (negatives included): event 2 of user 7 has 2 earlier events
    ex3 = build_examples(_events(), _events()[lambda d: d.label > 0], items, UserIndex.from_ids([7, 8]), history_len=1,
                         log=_events())
    assert ex3.prior_events.tolist() == [0, 1, 2, 0] and ex3.prior_positives.tolist() == [0, 1, 2, 0]
    # same-second positives never leak: a positive at t=3 is not in the history of the t=3 event
    ev = pd.concat([_events(), pd.DataFrame({"user_id": [7], "item_id": [40], "ts": [3], "label": [1.0]})])
    ex2 = build_examples(ev, ev[ev.label > 0], items, UserIndex.from_ids([7, 8]), history_len=3)
    assert ex2.hist[2].tolist() == [2, 1, -1]


def test_kjt_layout_by_hand():
    items = _items()
    ex = build_examples(_events(), _events()[lambda d: d.label > 0], items, UserIndex.from_ids([7, 8]), history_len=2)
    cfg = RankerConfig(features="vq+rq+cross", history_len=2)
    schema = build_schema(cfg, n_users=3, items=items)
    assert schema.seq_keys == ["item_id", "hist_item_id", "rq_l0", "hist_rq_l0", "rq_l1", "hist_rq_l1"]
    assert schema.bag_keys == ["user_id", "vq"]
    batch = build_batch(ex.take(np.array([2, 3])), schema, items)  # user 7 @ t=3 on 30 (row 3); user 8 on 40 (row 4)
    seq = batch.seq
    assert seq.keys() == schema.seq_keys
    # key-major: item_id [3, 4] | hist [2, 1] , [] | rq_l0 [2, 3] | hist rq_l0 of rows 2,1 = [0, 0] | rq_l1 [1, 2] | [0, 1]
    assert seq.values().tolist() == [3, 4, 2, 1, 2, 3, 0, 0, 1, 2, 0, 1]
    assert seq.lengths().tolist() == [1, 1, 2, 0, 1, 1, 2, 0, 1, 1, 2, 0]
    bag = batch.bag
    # user rows [1, 2]; vq: row 3 -> neighbours (10, 20) = rows [1, 2]; row 4 has no codes -> [0]
    assert bag.values().tolist() == [1, 2, 1, 2, 0]
    assert bag.lengths().tolist() == [1, 1, 2, 1]
    assert batch.labels.tolist() == [0.0, 1.0]
    # dense: log1p(hist_len), then cross: target 30 = (2, 1); history 20 = (0, 0), 10 = (0, 1): no prefix match
    assert batch.dense.shape == (2, 3 + 4)
    # user 7 at t=3: history 2, prior events 2 (both positive) -> rate (2+1)/(2+2); user 8: nothing before
    assert batch.dense[0, :3].tolist() == pytest.approx([np.log1p(2), np.log1p(2), 0.75])
    assert batch.dense[1, :3].tolist() == pytest.approx([0.0, 0.0, 0.5])
    assert batch.dense[:, 3:].abs().sum().item() == 0


def test_table_configs_share_tables_between_target_and_history():
    items = _items()
    schema = build_schema(RankerConfig(features="rq", history_len=2), n_users=3, items=items)
    seq_cfgs, bag_cfgs = table_configs(schema, 8)
    by_name = {c.name: c for c in seq_cfgs}
    assert by_name["rq_l0"].num_embeddings == 4 and by_name["rq_l0"].feature_names == ["rq_l0", "hist_rq_l0"]
    assert by_name["item"].num_embeddings == 5
    assert [c.name for c in bag_cfgs] == ["user"]
    with pytest.raises(ValueError, match="needs item embeddings"):
        build_schema(RankerConfig(features="frozen"), n_users=3, items=items)


def test_frozen_sim_feature_is_the_hand_computed_similarity():
    # item vectors: 10 -> (1, 0), 20 -> (0, 2), 30 -> (1, 1); item 40 has none (zeros, similarity 0)
    items = ItemFeatures.build(CATALOG, frozen_item_ids=np.array([10, 20, 30]),
                               frozen=np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    ex = build_examples(_events(), _events()[lambda d: d.label > 0], items, UserIndex.from_ids([7, 8]), history_len=3)
    schema = build_schema(RankerConfig(features="frozen+sim", history_len=3), n_users=3, items=items)
    assert schema.dense_parts == ("sim",) and schema.n_dense == 3 + 3
    batch = build_batch(ex.take(np.array([1, 2, 3])), schema, items)
    # event 1: target 20 (0, 2), history [10]: cos 0 -> soft count 0, max 0
    # event 2: target 30 (1, 1), history [20, 10]: cos = 1/sqrt2 each -> soft 2/sqrt2, share (2/sqrt2)/2, max 1/sqrt2
    # event 3: user 8, no history -> zeros
    c = 1 / np.sqrt(2)
    assert batch.dense[:, 3:].numpy() == pytest.approx(np.array(
        [[0.0, 0.0, 0.0], [np.log1p(2 * c), c, c], [0.0, 0.0, 0.0]]), abs=1e-6)
    # the same features without "sim", and a negative similarity stays out of the soft count but sets the max
    assert build_schema(RankerConfig(features="frozen", history_len=3), n_users=3, items=items).n_dense == 3
    out = similarity_features(np.array([[1.0, 0.0]]), np.array([[[-1.0, 0.0], [0.0, 0.0]]]),
                              np.array([[True, False]]), np.array([1]))
    assert out.tolist() == [[0.0, 0.0, -1.0]]


def test_cross_features_count_prefix_matches():
    target = np.array([[1, 2]])
    hist = np.array([[[1, 2], [1, 0], [0, 2], [1, 2]]])
    known = np.array([[True, True, True, False]])  # last one has no codes: never counts
    out = cross_features(target, hist, np.array([True]), known, np.array([4]))
    # prefix 1: rows 0, 1 -> 2; prefix 2: row 0 -> 1
    assert out[0].tolist() == pytest.approx([np.log1p(2), np.log1p(1), 2 / 4, 1 / 4])


def test_examples_follow_the_time_split_and_users_come_from_train():
    df = pd.DataFrame({"user_id": [1] * 10 + [2] * 10, "item_id": np.tile(CATALOG, 5),
                       "ts": list(range(10)) + list(range(100, 110)), "label": 1.0})
    data = prepare_examples(df, CATALOG, history_len=2, split=SplitConfig("global", 0.1, 0.1),
                            negatives=NegativeConfig(1, "uniform", 0))
    assert data.train.ts.max() < data.valid.ts.min() <= data.valid.ts.max() < data.test.ts.min()
    # global cut: user 1 has no train events after ts 9? it does; both users are in train
    assert set(data.users.user_ids) == {1, 2}
    data = prepare_examples(df, CATALOG, history_len=2, split=SplitConfig("user_last_frac", 0.1, 0.2),
                            negatives=NegativeConfig(1, "uniform", 0))
    pos = data.test.label > 0
    assert sorted(data.test.ts[pos]) == [8, 9, 108, 109] and data.info["users"]["test_users_seen_in_train"] == 1.0


def test_negatives_are_deterministic_and_never_the_positive():
    items = _items()
    ev = _events().assign(label=1.0)
    ex = build_examples(ev, ev, items, UserIndex.from_ids([7, 8]), history_len=1)
    cfg = NegativeConfig(per_positive=3, sampler="uniform", seed=5)
    a = sample_negatives(ex, items.n_rows, cfg)
    b = sample_negatives(ex, items.n_rows, cfg)
    assert np.array_equal(a.item, b.item) and len(a) == 12 and (a.label == 0).all()
    assert (a.item != np.repeat(ex.item, 3)).all() and (a.item >= 1).all()
    assert np.array_equal(a.hist, np.repeat(ex.hist, 3, axis=0))
    pop = np.array([0, 100, 0, 0, 0])  # popularity puts everything on row 1 except collisions
    c = sample_negatives(ex, items.n_rows, NegativeConfig(2, "popularity", 0), popularity=pop)
    assert ((c.item == 1) | (np.repeat(ex.item, 2) == 1)).all()


def test_implicit_data_gets_negatives_in_every_split():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": rng.integers(0, 5, 200), "item_id": rng.choice(CATALOG, 200),
                       "ts": np.arange(200), "label": 1.0})
    data = prepare_examples(df, CATALOG, history_len=3, negatives=NegativeConfig(2, "uniform", 1))
    assert data.info["implicit"]
    for part in (data.train, data.valid, data.test):
        assert part.label.mean() == pytest.approx(1 / 3)
    again = prepare_examples(df, CATALOG, history_len=3, negatives=NegativeConfig(2, "uniform", 1))
    assert np.array_equal(again.test.item, data.test.item)
