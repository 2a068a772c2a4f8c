"""quant.metrics against hand-computed values."""
import math

import numpy as np
import pytest

from quant import metrics as M

# 5 items, 2 levels. Full codes: (0,1) x2, (0,2), (1,1) x2  -> items 0,1,3,4 collide.
CODES = np.array([[0, 1], [0, 1], [0, 2], [1, 1], [1, 1]])


def test_collision_rate_and_items_per_code():
    assert M.collision_rate(CODES) == pytest.approx(4 / 5)
    assert M.n_unique_codes(CODES) == 3
    assert M.items_per_code(CODES) == pytest.approx(5 / 3)
    assert M.max_items_per_code(CODES) == 2
    unique = np.array([[0, 0], [0, 1], [1, 0]])
    assert M.collision_rate(unique) == 0.0
    assert M.items_per_code(unique) == 1.0


def test_utilization_and_entropy():
    assert M.utilization(CODES, 4) == [pytest.approx(2 / 4), pytest.approx(2 / 4)]
    assert M.utilization(CODES, (2, 3)) == [1.0, pytest.approx(2 / 3)]
    # level 0: p = (3/5, 2/5); level 1: p = (4/5, 1/5)
    h0 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    h1 = -(0.8 * math.log2(0.8) + 0.2 * math.log2(0.2))
    assert M.entropy(CODES) == [pytest.approx(h0), pytest.approx(h1)]
    assert M.entropy(CODES, 4, normalized=True) == [pytest.approx(h0 / 2), pytest.approx(h1 / 2)]
    assert M.entropy(np.zeros((3, 1), dtype=int)) == [0.0]
    with pytest.raises(ValueError, match="2 entries for 1 levels"):
        M.utilization(np.zeros((3, 1), dtype=int), (2, 2))


def test_rel_mse():
    x = np.array([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0); total variance sum = 2
    x_hat = np.array([[1.0, 0.0], [2.0, 1.0]])  # errors 1 + 1 = 2
    assert M.rel_mse(x, x_hat) == pytest.approx(1.0)
    assert M.rel_mse(x, x) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        M.rel_mse(x, x[:1])


def test_hr_at_k_inner_product():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    x_hat = np.array([[0.1, 1.0], [0.0, 1.0], [0.7, 0.7]])
    # scores for q0=(0.1,1): x0 .1, x1 1.0, x2 .77 -> two better -> rank 2
    # q1=(0,1): x0 0, x1 1, x2 .7 -> rank 0 ; q2: x0 .7, x1 .7, x2 .98 -> rank 0
    assert M.hr_at_k(x, x_hat, 1) == pytest.approx(2 / 3)
    assert M.hr_at_k(x, x_hat, (1, 3)) == {1: pytest.approx(2 / 3), 3: 1.0}
    assert M.hr_at_k(x, x_hat, 1, queries=[0]) == 0.0


def test_hr_at_k_l2_differs_from_ip():
    x = np.array([[1.0, 0.0], [3.0, 0.0]])
    x_hat = np.array([[1.0, 0.0], [3.0, 0.0]])
    # IP: q0 = (1,0) scores x0 1, x1 3 -> item 0 misses; L2 retrieves both exactly
    assert M.hr_at_k(x, x_hat, 1, metric="ip") == 0.5
    assert M.hr_at_k(x, x_hat, 1, metric="l2") == 1.0


def test_hr_at_k_duplicates_count_as_hits():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert M.hr_at_k(x, x.copy(), 1) == 1.0


def test_prefix_consistency():
    # level 1 groups: {a, b, c} (prefix 0) and {d} ; level 2 groups: {a, b}, {c}, {d}
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]])
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 0]])
    s = 1 / math.sqrt(2)
    # level 1 pairs: ab 0, ac s, bc s -> mean 2s/3 ; level 2 pairs: ab 0 -> 0
    assert M.prefix_consistency(x, codes) == [pytest.approx(2 * s / 3), pytest.approx(0.0)]
    lone = M.prefix_consistency(x, np.arange(4)[:, None])
    assert math.isnan(lone[0])


def test_prefix_consistency_many_groups_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    codes = rng.integers(0, 12, size=(300, 2))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    got = M.prefix_consistency(x, codes)
    for length in (1, 2):
        same = (codes[:, None, :length] == codes[None, :, :length]).all(axis=2)
        iu = np.triu_indices(300, 1)
        cos = (u @ u.T)[iu][same[iu]]
        assert got[length - 1] == pytest.approx(cos.mean())


def test_churn():
    a = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    b = a.copy()
    assert M.churn(a, b) == 0.0
    b[1, 1] = 9
    b[3, 0] = 9
    assert M.churn(a, b) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        M.churn(a, b[:2])


def test_nmi_hand_computed():
    assert M.nmi([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)  # a relabelling
    assert M.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent
    # a = (0,0,1,1), b = (0,0,0,1): H(a) = ln2, H(b) = -(.75 ln .75 + .25 ln .25),
    # I = sum p log p/(pa pb) = .5 ln(.5/(.5*.75)) + .25 ln(.25/(.5*.75)) + .25 ln(.25/(.5*.25))
    ha = math.log(2)
    hb = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125)
    assert M.nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(mi / ((ha + hb) / 2))
