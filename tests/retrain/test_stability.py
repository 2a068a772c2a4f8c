"""Code stability: who keeps its code, when codebooks are refit, churn by data-defined item group."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.jobs.retrain.stability import StabilityConfig, churn_by_group, item_groups, stable_codes

BOOKS = [np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32),
         np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)]


def _parent():
    ids = np.array([1, 2, 3], np.int64)
    emb = np.array([[10.0, 1.0], [0.0, 10.0], [10.0, 0.2]], np.float32)
    rq = np.array([[1, 2], [2, 0], [1, 0]], np.int32)  # the codes of emb; item 3 is 0.2 off its code
    return ids, emb, rq


def test_unmoved_items_keep_their_code_moved_and_new_ones_are_encoded_against_the_parent_books():
    p_ids, p_emb, p_rq = _parent()
    c_ids = np.array([1, 2, 3, 4], np.int64)
    # item 1 moves 1% (keeps [1, 2] although [1, 2] is still right); item 2 moves to (10, 1) -> [1, 2];
    # item 3 stays; item 4 is new at (0, 11) -> [2, 2]
    c_emb = np.array([[10.1, 1.0], [10.0, 1.0], [10.0, 0.2], [0.0, 11.0]], np.float32)
    refit_rq = np.zeros((4, 2), np.int32)  # what a refit would publish (never used below the drift threshold)
    out = stable_codes(p_ids, p_emb, p_rq, BOOKS, c_ids, c_emb, refit_rq, BOOKS,
                       StabilityConfig(move_threshold=0.05, refit_drift=0.5))
    assert not out["refit"]
    assert out["kept"].tolist() == [True, False, True, False]
    assert out["rq"].tolist() == [[1, 2], [1, 2], [1, 0], [2, 2]]
    assert out["summary"]["moved_share"] == pytest.approx(1 / 3)


def test_drift_past_the_threshold_publishes_the_refit():
    p_ids, p_emb, p_rq = _parent()
    c_emb = p_emb + np.array([[3.0, 3.0]], np.float32)  # every item moved far from every centroid sum
    refit_rq = np.array([[0, 1], [0, 2], [1, 1]], np.int32)
    common = dict(parent_ids=p_ids, parent_emb=p_emb, parent_rq=p_rq, parent_books=BOOKS, cand_ids=p_ids,
                  cand_emb=c_emb, cand_rq=refit_rq, cand_books=BOOKS)
    out = stable_codes(**common, cfg=StabilityConfig(move_threshold=0.05, refit_drift=0.5))
    # hand-computed: the parent's only error is item 3's 0.2 -> 0.04 / (101 + 100 + 100.04)
    assert out["summary"]["parent_rel_mse"] == pytest.approx(0.04 / 301.04, rel=1e-4)
    assert out["refit"] and out["rq"].tolist() == refit_rq.tolist() and not out["kept"].any()
    never = stable_codes(**common, cfg=StabilityConfig(move_threshold=0.05, refit_drift=None))
    assert not never["refit"] and never["rq"].tolist() != refit_rq.tolist()


def test_groups_come_from_the_data_and_churn_is_per_group():
    inter = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [1, 2, 2, 4], "ts": [5, 15, 20, 30],
                          "label": [1.0, 1.0, 0.0, 1.0]})
    groups = item_groups(np.array([1, 2, 3]), np.array([1, 2, 3, 4]), inter, since=10, until=30)
    assert groups["unchanged"].tolist() == [1, 3]  # item 1's only event is before the watermark
    assert groups["touched"].tolist() == [2] and groups["new"].tolist() == [4]
    old_rq = np.array([[0, 0], [1, 1], [2, 2]], np.int32)
    new_rq = np.array([[0, 1], [1, 1], [2, 2], [0, 0]], np.int32)
    churn = churn_by_group(np.array([1, 2, 3]), old_rq, np.array([1, 2, 3, 4]), new_rq, groups)
    assert churn["unchanged"] == {"items": 2, "code_churn": 0.5, "level0_churn": 0.0}
    assert churn["touched"] == {"items": 1, "code_churn": 0.0, "level0_churn": 0.0}
    assert churn["new"]["items"] == 1 and churn["new"]["code_churn"] is None


def test_stability_config_validates():
    with pytest.raises(ValueError, match="move_threshold"):
        StabilityConfig(move_threshold=-1)
