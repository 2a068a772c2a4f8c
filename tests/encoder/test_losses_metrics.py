import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.encoder.retrieval_eval import pair_retrieval
from pipelines.encoder.losses import false_negative_mask, symmetric_info_nce
from pipelines.encoder.rank_metrics import mean_reciprocal_rank, ranks_of_targets, recall_at_k


def test_info_nce_matches_hand_computation():
    left = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    right = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits (t = 0.5): [[2, 1.2], [0, 1.6]]
    row0 = -2 + math.log(math.exp(2) + math.exp(1.2))
    row1 = -1.6 + math.log(math.exp(0) + math.exp(1.6))
    col0 = -2 + math.log(math.exp(2) + math.exp(0))
    col1 = -1.6 + math.log(math.exp(1.2) + math.exp(1.6))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert symmetric_info_nce(left, right, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_masked_candidates_do_not_count_as_negatives():
    left = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    right = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    everything_masked = torch.tensor([[False, True], [True, False]])
    # only the positive is left in every row / column -> zero loss
    assert symmetric_info_nce(left, right, 0.5, everything_masked).item() == pytest.approx(0.0, abs=1e-6)


def test_false_negative_mask_hand_example():
    left = torch.tensor([1, 1, 3, 5])
    right = torch.tensor([2, 4, 2, 1])
    mask = false_negative_mask(left, right)
    expected = torch.tensor([
        [False, True, True, True],   # pair1 shares left=1; pair2 shares right=2; right_3 == left_0 (=1)
        [True, False, False, True],  # shares left with pair0; right_3 is item 1 = its query
        [True, False, False, False],  # shares right=2 with pair0
        [False, False, False, False],
    ])
    assert torch.equal(mask, expected)
    assert not mask.diagonal().any()


def test_ranks_recall_mrr_by_hand():
    scores = np.array([[0.9, 0.5, 0.7, 0.1],
                       [0.2, 0.3, 0.3, 0.9]])
    ranks = ranks_of_targets(scores, targets=np.array([2, 1]), exclude=np.array([0, 3]))
    # row 0: query col 0 excluded; target 0.7 is best of the rest -> 1
    # row 1: query col 3 excluded; target 0.3 ties with col 2 -> pessimistic rank 2
    assert ranks.tolist() == [1, 2]
    assert recall_at_k(ranks, 1) == 0.5
    assert mean_reciprocal_rank(ranks) == pytest.approx(0.75)


def test_pair_retrieval_both_directions_and_skips_unknown_items():
    ids = np.array([10, 11, 12])
    emb = np.array([[1, 0], [0.9, 0.436], [0, 1]], dtype=np.float32)
    pairs = pd.DataFrame({"left": [10, 10, 99], "right": [11, 12, 10]})
    out = pair_retrieval(ids, emb, pairs, ks=(1,))
    assert out["n_pairs_skipped"] == 1 and out["n_queries"] == 4
    # 10->11 rank1, 11->10 rank1, 10->12 rank2, 12->10 rank2 (11 is closer to 12 than 10 is)
    assert out["recall@1"] == 0.5
    assert out["mrr"] == pytest.approx(0.75)


def test_next_item_queries_and_recall_by_hand():
    from pipelines.encoder.retrieval_eval import next_item_queries, next_item_recall

    pos = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 3], "item_id": [10, 11, 12, 12, 12, 10],
                        "ts": [1, 2, 3, 1, 2, 5]})
    test = np.array([False, True, True, False, True, True])
    queries = next_item_queries(pos, test)
    # user 1: 10 -> 11, 11 -> 12; user 2 repeats 12 (left out); user 3 has no earlier positive
    assert queries.values.tolist() == [[10, 11], [11, 12]]
    ids = np.array([10, 11, 12, 13])
    emb = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], dtype=np.float32)
    # 10 -> 11: 11 is the nearest other item (rank 1); 11 -> 12: 13 (0.96) and 10 (0.8) beat 12 (0.6): rank 3
    assert next_item_recall(ids, emb, queries, k=1)["recall@1"] == 0.5
    assert next_item_recall(ids, emb, queries, k=3)["recall@3"] == 1.0
    out = next_item_recall(ids[:2], emb[:2], queries, k=1)
    assert out["n_skipped"] == 1 and out["n_queries"] == 1
