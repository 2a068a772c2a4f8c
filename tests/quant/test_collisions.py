"""Collision resolution: unique codes, priority order, overflow errors; sort path vs lexsort path."""
import numpy as np
import pytest

from quant import CollisionOverflowError, resolve_collisions
from quant import metrics as M


def test_suffix_makes_codes_unique_in_row_order():
    codes = np.array([[0, 1], [2, 2], [0, 1], [0, 1], [2, 2]], dtype=np.int32)
    out = resolve_collisions(codes)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :2], codes)
    np.testing.assert_array_equal(out[:, 2], [0, 0, 1, 2, 1])
    assert M.collision_rate(out) == 0.0


def test_priority_orders_suffixes():
    codes = np.array([[3], [3], [3]])
    out = resolve_collisions(codes, priority=np.array([0.5, 0.1, 0.9]))
    np.testing.assert_array_equal(out[:, 1], [1, 0, 2])


def test_overflow_names_the_code():
    codes = np.array([[1, 2]] * 5 + [[0, 0]])
    with pytest.raises(CollisionOverflowError, match=r"code \[1, 2\] is shared by 5 items but suffix_size is 4"):
        resolve_collisions(codes, suffix_size=4)
    assert resolve_collisions(codes, suffix_size=5)[:, 2].max() == 4


def test_bad_codes():
    with pytest.raises(ValueError, match="row 1 has a negative code"):
        resolve_collisions(np.array([[0, 1], [-1, 0]]))
    with pytest.raises(ValueError, match="integers"):
        resolve_collisions(np.zeros((2, 2)))


def test_wide_codes_use_lexsort_path_with_same_result():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 4, size=(2000, 3))
    wide = small.astype(np.int64) * (1 << 40)  # 3 x 42 bits: no packed key, lexsort path
    a = resolve_collisions(small)
    b = resolve_collisions(wide)
    np.testing.assert_array_equal(a[:, 3], b[:, 3])
    assert M.collision_rate(b) == 0.0


def test_million_items_vectorised():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, size=(1_000_000, 3)).astype(np.int32)  # 262k codes: heavy collisions
    out = resolve_collisions(codes)
    assert M.n_unique_codes(out) == 1_000_000
