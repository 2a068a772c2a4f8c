"""Res-KmeansFSQ: the FSQ level lowers error, fills its grid, round-trips through save/load."""
import numpy as np
import pytest

from quant import ResKMeansFSQ, ResKMeansFSQConfig, RQKMeans, load_quantizer, metrics as M
from quant.fsq import ScalarGrid, default_fsq_levels

from .conftest import planted_clusters


@pytest.fixture(scope="module")
def data():
    return planted_clusters(3000, 16, 8, noise=1.0, seed=2)[0]


def test_default_fsq_levels():
    assert default_fsq_levels(256) == (4, 4, 4, 4)
    assert default_fsq_levels(4096) == (8, 8, 8, 8)
    assert default_fsq_levels(1024) == (8, 8, 4, 4)
    with pytest.raises(ValueError, match="give fsq_levels explicitly"):
        default_fsq_levels(100)


def test_scalar_grid_mixed_radix_round_trip():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4000, 6)).astype(np.float32)
    grid = ScalarGrid((4, 2, 3)).fit(r)
    codes = grid.encode(r)
    assert codes.min() >= 0 and codes.max() < 24
    digits = grid.digits(r)
    np.testing.assert_array_equal(codes, digits[:, 0] + 4 * digits[:, 1] + 8 * digits[:, 2])
    # quantile bins are equal-mass: every bin of every dimension holds about 1/L of the rows
    for j, bins in enumerate((4, 2, 3)):
        share = np.bincount(digits[:, j], minlength=bins) / len(r)
        np.testing.assert_allclose(share, 1 / bins, atol=0.01)
    # decoding is the PCA reconstruction from per-bin means: better than the mean alone
    assert M.rel_mse(r, grid.decode(codes)) < 1.0


def test_fsq_level_reduces_error_and_uses_its_grid(data):
    head = RQKMeans(levels=2, codebook_size=8, seed=0).fit(data)
    q = ResKMeansFSQ(levels=3, codebook_size=8, fsq_levels=(4, 4), seed=0).fit(data)
    codes = q.encode(data)
    assert codes.shape == (3000, 3) and codes[:, 2].max() < 16
    np.testing.assert_array_equal(codes[:, :2], head.encode(data))  # same k-means levels for the same seed
    assert M.rel_mse(data, q.decode(codes)) < M.rel_mse(data, head.decode(head.encode(data)))
    assert M.utilization(codes[:, 2:], 16) == [1.0]
    assert [c.shape for c in q.codebooks] == [(8, 16), (8, 16), (16, 16)]


def test_save_load_round_trip(tmp_path, data):
    for grid in ("quantile", "uniform"):
        q = ResKMeansFSQ(levels=2, codebook_size=16, fsq_grid=grid, seed=1).fit(data)
        q.save(tmp_path / grid)
        loaded = load_quantizer(tmp_path / grid)
        assert isinstance(loaded, ResKMeansFSQ)
        np.testing.assert_array_equal(loaded.encode(data), q.encode(data))
        np.testing.assert_array_equal(loaded.decode(q.encode(data)), q.decode(q.encode(data)))


def test_bad_input_and_config(data):
    with pytest.raises(ValueError, match="levels must be an int >= 2"):
        ResKMeansFSQConfig(levels=1)
    with pytest.raises(ValueError, match="fsq_grid"):
        ResKMeansFSQConfig(fsq_grid="log")
    with pytest.raises(ValueError, match="only 16"):
        ResKMeansFSQ(levels=2, codebook_size=8, fsq_levels=(2,) * 17).fit(data)
    bad = data.copy()
    bad[11, 3] = np.inf
    with pytest.raises(ValueError, match="row 11"):
        ResKMeansFSQ(levels=2, codebook_size=16).fit(bad)
    q = ResKMeansFSQ(levels=2, codebook_size=16, fsq_levels=(4, 4)).fit(data)
    with pytest.raises(ValueError, match="level 1 has code 16"):
        q.decode(np.array([[0, 16]]))
