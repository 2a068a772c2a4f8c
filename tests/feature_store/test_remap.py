import numpy as np
import pytest

from feature_store.remap import RemapConfig, code_churn, optimal_one_to_one, item_vote_mapping, remap_code_tables
from feature_store.tables import CodeTable


def _codes(ids, rq, vq=None):
    ids = np.asarray(ids, np.int64)
    vq = np.zeros((len(ids), 0), np.int64) if vq is None else np.asarray(vq, np.int64)
    return CodeTable(ids, np.asarray(rq, np.int32), vq)


OLD_C = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
# new centroid 0 ~ old 2, new 1 ~ old 0, new 2 ~ old 1 (a permutation plus a little drift)
NEW_C = np.array([[-0.9, 0.1], [1.0, 0.1], [0.1, 1.0]], np.float32)
OLD_T = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [-1.0, -1.0]], np.float32)  # last row: padding


def test_permuted_centroids_take_their_rows_with_padding_carried():
    result = remap_code_tables([OLD_C], [NEW_C], [OLD_T])
    assert result.mapping[0].tolist() == [2, 0, 1]
    np.testing.assert_array_equal(result.tables[0], [[30, 30], [10, 10], [20, 20], [-1, -1]])
    stats = result.levels[0]
    assert stats["share_matched"] == 1.0 and stats["reused_old_rows"] == 0
    # hand-computed: cos((-0.9,0.1),(-1,0)) = 0.9/|(-0.9,0.1)| = 0.99388; cos((1,0.1),(1,0)) = cos((0.1,1),(0,1)) = 0.99504
    assert stats["mean_cosine"] == pytest.approx((0.99388 + 2 * 0.99504) / 3, abs=1e-4)
    assert result.summary()["share_matched"] == 1.0


def test_one_to_one_vs_nearest_when_two_new_centroids_want_the_same_old_one():
    old_c = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    new_c = np.array([[0.1, 0.0], [0.3, 0.0], [9.0, 0.0]], np.float32)
    old_t = np.array([[1.0], [2.0]], np.float32)
    nearest = remap_code_tables([old_c], [new_c], [old_t], RemapConfig(method="nearest"))
    assert nearest.mapping[0].tolist() == [0, 0, 1]
    assert nearest.levels[0]["reused_old_rows"] == 1
    one = remap_code_tables([old_c], [new_c], [old_t], RemapConfig(method="one_to_one", unmatched_init="zeros"))
    assert one.mapping[0].tolist() == [0, -1, 1]  # the closer one wins old row 0; the other is fresh
    assert one.tables[0][:, 0].tolist() == [1.0, 0.0, 2.0]
    assert one.levels[0]["share_matched"] == pytest.approx(2 / 3)
    mean_init = remap_code_tables([old_c], [new_c], [old_t], RemapConfig(unmatched_init="mean"))
    assert mean_init.tables[0][1, 0] == pytest.approx(1.5)


def test_one_to_one_is_the_optimal_assignment():
    import itertools

    rng = np.random.default_rng(0)
    sim = rng.normal(size=(6, 5))
    mapping = optimal_one_to_one(sim)
    # reference: every way to give 5 of the 6 rows a distinct column
    best = max(itertools.permutations(range(6), 5), key=lambda rows: sum(sim[r, c] for c, r in enumerate(rows)))
    ref = np.full(6, -1)
    for c, r in enumerate(best):
        ref[r] = c
    assert mapping.tolist() == ref.tolist()
    # a case where greedy (take the best pair first) is not optimal: 0.9 + 0.1 < 0.8 + 0.8
    assert optimal_one_to_one(np.array([[0.9, 0.8], [0.8, 0.1]])).tolist() == [1, 0]


def test_min_cosine_threshold_and_validation():
    far = np.array([[0.0, 1.0]], np.float32)
    res = remap_code_tables([np.array([[1.0, 0.0]], np.float32)], [far], [np.array([[5.0]], np.float32)],
                            RemapConfig(min_cosine=0.5, unmatched_init="zeros"))
    assert res.mapping[0].tolist() == [-1] and res.tables[0].tolist() == [[0.0]]
    with pytest.raises(ValueError, match="level counts differ"):
        remap_code_tables([OLD_C], [NEW_C, NEW_C], [OLD_T])
    with pytest.raises(ValueError, match="old centroids have d=2, new d=3"):
        remap_code_tables([OLD_C], [np.zeros((3, 3))], [OLD_T])
    with pytest.raises(ValueError, match="old table has 2 rows"):
        remap_code_tables([OLD_C], [NEW_C], [OLD_T[:2]])
    with pytest.raises(ValueError, match="RemapConfig.method"):
        RemapConfig(method="hungarian")


def test_item_votes_follow_the_items():
    old = _codes([1, 2, 3, 4, 5], [[0], [0], [1], [1], [2]])
    new = _codes([1, 2, 3, 4, 6], [[1], [1], [0], [2], [0]])
    mapping, support = item_vote_mapping(old, new, level=0, k_new=4)
    # new 1 <- items 1,2 (old 0, 0); new 0 <- item 3 (old 1); new 2 <- item 4 (old 1); new 3 <- nobody
    assert mapping.tolist() == [1, 0, 1, -1]
    assert support.tolist() == [1, 2, 1, 0]
    old_c = np.eye(3, dtype=np.float32)
    new_c = np.array([[0, 1, 0], [1, 0, 0], [0, 0.9, 0.1], [0, 0, 1]], np.float32)
    old_t = np.array([[0.0], [1.0], [2.0]], np.float32)
    res = remap_code_tables([old_c], [new_c], [old_t], RemapConfig(method="items"), old_codes=old, new_codes=new)
    assert res.mapping[0].tolist() == [1, 0, 1, 2]  # new 3 falls back to centroid matching (old 2)
    assert res.levels[0]["voted"] == 3
    with pytest.raises(ValueError, match="needs old_codes and new_codes"):
        remap_code_tables([old_c], [new_c], [old_t], RemapConfig(method="items"))


def test_code_churn_hand_computed():
    old = _codes([1, 2, 3, 4], [[0, 0], [0, 1], [1, 1], [2, 2]], [[2, 3], [1, 3], [1, 2], [1, 2]])
    new = _codes([2, 3, 4, 5], [[0, 1], [1, 0], [3, 2], [0, 0]], [[3, 1], [1, 4], [1, 2], [1, 2]])
    churn = code_churn(old, new)
    assert churn["common_items"] == 3 and churn["added_items"] == 1 and churn["removed_items"] == 1
    # common items 2, 3, 4: level0 changed only for item 4; level1 changed only for item 3
    assert churn["rq_level_churn"] == pytest.approx([1 / 3, 1 / 3])
    assert churn["rq_prefix_churn"] == pytest.approx([1 / 3, 2 / 3])
    assert churn["rq_code_churn"] == pytest.approx(2 / 3)
    # vq sets: item 2 same set (order ignored), item 3 keeps 1 of 2, item 4 same
    assert churn["vq_churn"] == pytest.approx(1 / 3)
    assert churn["vq_overlap"] == pytest.approx((1 + 0.5 + 1) / 3)
    with pytest.raises(ValueError, match="2 and 1 RQ levels"):
        code_churn(old, _codes([1], [[0]]))
    assert code_churn(old, _codes([9], [[0, 0]]))["rq_code_churn"] is None


def test_remap_between_store_versions(store, fill):
    from feature_store.remap import remap_between_versions, version_churn
    from feature_store.tables import write_codebooks, write_codes

    with store.stage() as st:
        fill(st.path, seed=0)
        write_codebooks(st.path / "codebooks.safetensors", {"rq.level0": OLD_C})
        write_codes(st.path / "item_codes.parquet", [1, 2, 3], [[0], [1], [2]])
        old = st.publish(config={})
    with store.stage() as st:
        fill(st.path, seed=1)
        write_codebooks(st.path / "codebooks.safetensors", {"rq.level0": NEW_C})
        write_codes(st.path / "item_codes.parquet", [1, 2, 3], [[1], [2], [0]])  # old 0 -> new 1, 1 -> 2, 2 -> 0
        new = st.publish(config={})
    res = remap_between_versions(old, new, [OLD_T])
    assert res.mapping[0].tolist() == [2, 0, 1]
    votes = remap_between_versions(old, new, [OLD_T], RemapConfig(method="items"))
    assert votes.mapping[0].tolist() == [2, 0, 1] and votes.levels[0]["voted"] == 3
    churn = version_churn(old, new)
    assert churn["rq_code_churn"] == 1.0 and churn["old_version"] == old.id  # every raw id changed...
    assert version_churn(old, new, mappings=res.mapping)["rq_code_churn"] == 0.0  # ...but no item lost its row
    partial = code_churn(old.codes(), new.codes(), mappings=[np.array([2, 0, -1])])
    assert partial["rq_code_churn"] == pytest.approx(1 / 3)  # item 2's new code 2 got a fresh row


@pytest.mark.slow
def test_remap_undoes_a_cold_refit_reshuffle_of_real_rq_kmeans_codes():
    """Two RQ-Kmeans fits with different seeds number the same clusters differently: raw churn is high, but
    after remapping almost every item keeps the learned level-0 row it had."""
    quant = pytest.importorskip("quant")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 8)) * 4
    x = (centers[rng.integers(0, 12, 1500)] + rng.normal(size=(1500, 8))).astype(np.float32)
    old_q = quant.RQKMeans(levels=2, codebook_size=12, seed=0).fit(x)
    new_q = quant.RQKMeans(levels=2, codebook_size=12, seed=1).fit(x)
    ids = np.arange(1500)
    old, new = _codes(ids, old_q.encode(x)), _codes(ids, new_q.encode(x))
    tables = [rng.normal(size=(13, 4)).astype(np.float32) for _ in range(2)]  # K + 1 rows (unknown row)
    raw = code_churn(old, new)["rq_level_churn"][0]
    assert raw > 0.5  # different seeds: cluster ids reshuffled
    for method in ("one_to_one", "items"):
        res = remap_code_tables(old_q.codebooks, new_q.codebooks, tables, RemapConfig(method=method),
                                old_codes=old, new_codes=new)
        assert code_churn(old, new, res.mapping)["rq_level_churn"][0] < 0.15, method
        assert res.levels[0]["share_matched"] == 1.0
        np.testing.assert_array_equal(res.tables[0][-1], tables[0][-1])  # the unknown row is carried over


def test_warm_keeps_surviving_rows_and_sends_the_others_to_their_items_previous_codes():
    old_c = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    # code 0 stayed, code 1 drifted onto old centroid 2's place, code 2 moved next to old centroid 1
    new_c = np.array([[0.5, 0.0], [0.0, 9.0], [9.5, 0.5]], np.float32)
    old_t = np.array([[1.0], [2.0], [3.0], [-1.0]], np.float32)
    # without item codes: code 0 survives (own row), codes 1 and 2 take their nearest old centroid's row
    plain = remap_code_tables([old_c], [new_c], [old_t], RemapConfig(method="warm"))
    assert plain.mapping[0].tolist() == [0, 2, 1]
    assert plain.levels[0]["survived"] == 1
    assert plain.tables[0][:, 0].tolist() == [1.0, 3.0, 2.0, -1.0]
    # with item codes: new code 1's items all had old code 0 -> vote wins over the centroid
    old_codes = _codes([1, 2, 3], [[0], [0], [1]])
    new_codes = _codes([1, 2, 3], [[1], [1], [2]])
    voted = remap_code_tables([old_c], [new_c], [old_t], RemapConfig(method="warm"), old_codes=old_codes,
                              new_codes=new_codes)
    assert voted.mapping[0].tolist() == [0, 0, 1]
    assert voted.levels[0]["voted"] == 2 and voted.levels[0]["survived"] == 1


def test_warm_on_identical_codebooks_is_the_identity():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(8, 4)).astype(np.float32)
    t = rng.normal(size=(9, 3)).astype(np.float32)
    result = remap_code_tables([c], [c.copy()], [t], RemapConfig(method="warm"))
    assert result.mapping[0].tolist() == list(range(8))
    np.testing.assert_array_equal(result.tables[0], t)
