"""Recall@K / NDCG@K, the faiss index's exclusion, the paired bootstrap and the cascade re-ranking, by hand."""
import math

import numpy as np
import pandas as pd
import pytest

from ranker.retrieval.cascade import rerank_candidates
from ranker.retrieval.index import ItemIndex
from ranker.retrieval.metrics import ndcg_at_k, paired_bootstrap_ci, recall_at_k


def test_recall_and_ndcg_by_hand():
    ranked = np.array([[3, 1, 7], [9, 1, 2], [5, 6, 8]])
    relevant = [{1, 9}, {9}, {1}]
    assert recall_at_k(ranked, relevant, 3).tolist() == [0.5, 1.0, 0.0]
    nd = ndcg_at_k(ranked, relevant, 3)
    assert nd[0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))   # hit at rank 2 of 2 relevant
    assert nd[1] == pytest.approx(1.0)
    assert nd[2] == 0.0
    # the cut-off: at k=1 the first user's hit (rank 2) no longer counts
    assert recall_at_k(ranked, relevant, 1).tolist() == [0.0, 1.0, 0.0]
    # more relevant items than k: IDCG uses only k positions
    assert ndcg_at_k(np.array([[1, 2]]), [{1, 2, 3}], 2)[0] == pytest.approx(1.0)
    assert recall_at_k(np.array([[1, 2]]), [{1, 2, 3}], 2)[0] == pytest.approx(2 / 3)
    assert np.isnan(recall_at_k(np.array([[1, 2]]), [set()], 2)[0])


def test_index_excludes_seen_items():
    items = np.array([[1.0, 0], [0.9, 0], [0.5, 0], [0.1, 0]], dtype=np.float32)
    users = np.array([[1.0, 0], [1.0, 0]], dtype=np.float32)
    rows, scores = ItemIndex().fit(items).topk(users, 2, exclude=[{0}, set()])
    assert rows.tolist() == [[1, 2], [0, 1]]
    assert scores[0].tolist() == pytest.approx([0.9, 0.5])
    rows, _ = ItemIndex().fit(items).topk(users[:1], 3, exclude=[{0, 1}])
    assert rows.tolist() == [[2, 3, -1]]                                  # padded when items run out


def test_paired_bootstrap():
    assert paired_bootstrap_ci(np.full((3, 50), 0.2)) == pytest.approx([0.2, 0.2])
    rng = np.random.default_rng(0)
    diff = 0.1 + 0.05 * rng.standard_normal((2, 400))
    lo, hi = paired_bootstrap_ci(diff)
    assert 0.09 < lo < 0.1 < hi < 0.11
    noisy = 0.05 * rng.standard_normal((2, 400))
    lo, hi = paired_bootstrap_ci(noisy)
    assert lo < 0 < hi
    with_nan = np.array([[0.1, np.nan], [0.1, 0.5]])
    assert paired_bootstrap_ci(with_nan) == pytest.approx([0.1, 0.1])    # the NaN user is dropped


def test_rerank_candidates_by_hand():
    cands = pd.DataFrame({"user_id": [7, 7, 7, 8, 8, 8], "item_id": [1, 2, 3, 4, 5, 6], "rank": [1, 2, 3, 1, 2, 3],
                          "score": [0.9, 0.8, 0.7, 0.9, 0.8, 0.7]})
    ranker_scores = {1: 0.1, 2: 0.2, 3: 0.9, 4: 0.9, 5: 0.1, 6: 0.0}
    score_fn = lambda u, i: np.array([ranker_scores[x] for x in i])  # noqa: E731
    out = rerank_candidates(cands, score_fn, {7: {3}, 8: {4, 99}}, k=1)
    # retrieval alone: user 7 misses (3 is at rank 3), user 8 hits 4 of {4, 99}: recall (0 + 0.5) / 2
    assert out["retrieval"]["recall@1"] == pytest.approx(0.25)
    # cascade: the ranker lifts 3 to the top for user 7, keeps 4 first for user 8
    assert out["cascade"]["recall@1"] == pytest.approx(0.75)
    assert out["cascade"]["ndcg@1"] == pytest.approx(1.0)
    assert out["candidate_recall"] == pytest.approx(0.75)                 # 99 was never retrieved
    assert out["users"] == 2 and out["candidates_per_user"] == 3
    with pytest.raises(ValueError, match="non-finite"):
        rerank_candidates(cands, lambda u, i: np.full(len(u), np.nan), {7: {3}}, k=1)
