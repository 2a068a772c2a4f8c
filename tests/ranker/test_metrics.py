import math

import numpy as np
import pytest

from ranker.metrics import auc, gauc, logloss, ranking_metrics


def test_auc_by_hand():
    # positives 0.4, 0.8; negatives 0.1, 0.35 -> pairs (0.4>0.1, 0.4>0.35, 0.8>0.1, 0.8>0.35) = 4/4
    assert auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 1.0
    # positives 0.3, 0.8; negatives 0.5, 0.1: (0.3<0.5, 0.3>0.1, 0.8>0.5, 0.8>0.1) = 3/4
    assert auc(np.array([1, 0, 1, 0]), np.array([0.3, 0.5, 0.8, 0.1])) == 0.75


def test_auc_ties_count_half():
    # one positive, two negatives, all tied -> 0.5; positive tied with one negative, above the other -> 0.75
    assert auc(np.array([1, 0, 0]), np.array([0.2, 0.2, 0.2])) == 0.5
    assert auc(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.1])) == 0.75


def test_auc_single_class_is_nan_and_shape_checked():
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    with pytest.raises(ValueError, match="shape"):
        auc(np.array([1, 0]), np.array([0.1]))


def test_gauc_weights_users_by_samples():
    users = np.array([1, 1, 1, 1, 2, 2, 3])
    labels = np.array([1, 0, 1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.1, 0.9, 0.5])
    # user 1: pos {0.9, 0.2}, neg {0.1, 0.3}: 0.9>0.1, 0.9>0.3, 0.2>0.1, 0.2<0.3 -> 3/4 (4 samples)
    # user 2: 0.1 < 0.9 -> 0 (2 samples); user 3 has one class -> skipped
    assert gauc(users, labels, scores) == pytest.approx((4 * 0.75 + 2 * 0.0) / 6)
    assert gauc(users, labels, scores, weight="uniform") == pytest.approx((0.75 + 0.0) / 2)
    with pytest.raises(ValueError):
        gauc(users, labels, scores, weight="clicks")


def test_logloss_by_hand():
    # -(ln 0.8 + ln(1 - 0.4)) / 2
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert np.isfinite(logloss(np.array([1]), np.array([0.0])))  # clipped, not inf


def test_ranking_metrics_from_logits():
    out = ranking_metrics(np.array([1, 1]), np.array([1, 0]), np.array([0.0, -100.0]))
    assert out["auc"] == 1.0 and out["n"] == 2
    assert out["logloss"] == pytest.approx(-math.log(0.5) / 2, rel=1e-4)


def test_undefined_metrics_are_null_with_a_reason():
    # a per-user last-1 split of an explicit log: every test user has one event, so no user has both classes
    users, labels = np.array([1, 2, 3, 4]), np.array([1, 0, 1, 0])
    out = ranking_metrics(users, labels, np.array([0.3, -0.2, 0.1, 0.4]))
    assert out["gauc"] is None and "no user has both" in out["undefined"]["gauc"]
    # pooled AUC still exists: positives 0.3, 0.1 vs negatives -0.2, 0.4 win 2 of 4 pairs
    assert out["auc"] == 0.5 and "auc" not in out["undefined"]
    one_class = ranking_metrics(np.array([1, 1, 2]), np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))
    assert one_class["auc"] is None and one_class["gauc"] is None
    assert "only one class among the 3 events" in one_class["undefined"]["auc"]
    assert set(ranking_metrics(users[:0], labels[:0], labels[:0].astype(float))["undefined"]) == {"auc", "gauc",
                                                                                                   "logloss"}
